"""What the command line says to a person, in one language at a time: a small message catalogue.

The rule: ``WANWU_LANG`` (``zh`` or ``en``) if set; else the locale, the first set of ``LC_ALL``,
``LC_MESSAGES``, ``LANG`` (POSIX precedence): a value starting with ``zh`` (``zh_CN.UTF-8``, ``zh_TW``...)
means Chinese, anything else English. Records (JSONL/CSV/JSON) and error texts raised by the library are
not translated; only what the CLI itself prints around them (progress, summaries, table headings, job
messages) and the help of ``wanwu``, ``wanwu recognize`` and ``wanwu report`` (with click's own headings) are.
"""

from __future__ import annotations

import os

LANGUAGES = ("en", "zh")

MESSAGES: dict[str, dict[str, str]] = {
    "en": {
        "progress.recognize": "recognizing",
        "progress.job": "job {job}",
        "progress.rate": "{rate:.1f} img/s",
        "progress.failed": "{n} failed",
        "summary": "{total} input(s): {ok} ok{failed} in {elapsed:.1f}s ({rate:.1f}/s){cached}{resumed}",
        "summary.failed": ", [red]{n} failed[/red]",
        "summary.cached": "; {n} from the cache",
        "summary.unchanged": ", {n:,} unchanged (not read)",
        "summary.skipped": "; {n} already recorded, skipped",
        "summary.retried": " ({n} earlier error record(s) retried)",
        "summary.kept": " ([red]{n} earlier error record(s) kept[/red])",
        "interrupted": "interrupted",
        "interrupted.count": "interrupted: {done} of {total} done",
        "interrupted.count_open": "interrupted: {done} done",
        "interrupted.resume": "; rerun with --resume to finish",
        "interrupted.no_file": " (write to a file with -o to be able to --resume)",
        "table.input": "input",
        "table.label": "label",
        "table.score": "score",
        "table.more": "more",
        "jobs.queued": "queued {n} input(s) as job {job}",
        "jobs.unexpanded": "not queued: {input}: {reason}",
        "jobs.unexpanded_count": "{n} input(s) could not be expanded and were not queued",
        "jobs.none": "nothing to queue: no input could be expanded",
        "jobs.wait_done": "job {job}: {state}: {ok} ok, {failed} failed of {total}",
        "jobs.retried": "job {job}: {n} failed input(s) queued again",
        "jobs.not_retried": "{n} failed input(s) not queued again: uploaded files are not kept once a job is "
        "over (and inputs that failed on the submitting side never reached the queue); submit them again",
        "jobs.wait_unreachable": "gave up waiting for job {job}: the queue stayed unreachable for {s:g} s "
        "(the job goes on; wait again later)",
        "jobs.lapsed": "{n} task(s) wait for a lapsed lease (their worker went silent); another worker takes "
        "them over",
        "jobs.no_workers": "no worker holds any of its tasks: start one with  wanwu worker --queue URL --model M"
        "  (plus --allow-root FOLDER for inputs sent as paths: workers without it leave those tasks)",
        "worker.start": "worker {worker}: model {model}, queue {queue}",
        "worker.progress": "worker {worker}: {tasks} task(s), {records} record(s) ({failed} failed), "
        "{rate:.1f} img/s",
        "worker.stop": "worker {worker}: stopped after {tasks} task(s), {records} record(s)",
    },
    "zh": {
        "progress.recognize": "识别中",
        "progress.job": "任务 {job}",
        "progress.rate": "{rate:.1f} 张/秒",
        "progress.failed": "{n} 失败",
        "summary": "{total} 个输入：{ok} 个成功{failed}，用时 {elapsed:.1f} 秒（{rate:.1f} 张/秒）{cached}{resumed}",
        "summary.failed": "，[red]{n} 个失败[/red]",
        "summary.cached": "；{n} 个来自缓存",
        "summary.unchanged": "，其中 {n:,} 个未变化（未读取）",
        "summary.skipped": "；{n} 个已有记录，跳过",
        "summary.retried": "（重做了 {n} 条先前的错误记录）",
        "summary.kept": "（[red]保留了 {n} 条先前的错误记录[/red]）",
        "interrupted": "已中断",
        "interrupted.count": "已中断：{total} 个中完成了 {done} 个",
        "interrupted.count_open": "已中断：完成了 {done} 个",
        "interrupted.resume": "；加 --resume 重新运行即可完成",
        "interrupted.no_file": "（用 -o 写入文件，才能以 --resume 继续）",
        "table.input": "输入",
        "table.label": "标签",
        "table.score": "分数",
        "table.more": "其他",
        "jobs.queued": "已将 {n} 个输入排入任务 {job}",
        "jobs.unexpanded": "未排入：{input}：{reason}",
        "jobs.unexpanded_count": "{n} 个输入无法展开，未排入",
        "jobs.none": "没有可排入的输入：没有一个输入能展开",
        "jobs.wait_done": "任务 {job}：{state}：共 {total} 个，{ok} 个成功，{failed} 个失败",
        "jobs.retried": "任务 {job}：已重新排入 {n} 个失败的输入",
        "jobs.not_retried": "{n} 个失败的输入未重新排入：任务结束后不保留上传的文件"
        "（提交端已失败的输入从未进入队列）；请重新提交",
        "jobs.wait_unreachable": "不再等待任务 {job}：队列已 {s:g} 秒无法连接（任务仍在继续，稍后再等）",
        "jobs.lapsed": "{n} 个子任务在等待过期的租约（其工作进程已无响应），将由其他工作进程接手",
        "jobs.no_workers": "没有工作进程持有它的子任务：用  wanwu worker --queue URL --model M  启动一个"
        "（以路径提交的输入还需 --allow-root 目录：没有它的工作进程会留下这些子任务）",
        "worker.start": "工作进程 {worker}：模型 {model}，队列 {queue}",
        "worker.progress": "工作进程 {worker}：{tasks} 个子任务，{records} 条记录（{failed} 个失败），{rate:.1f} 张/秒",
        "worker.stop": "工作进程 {worker}：已停止，共 {tasks} 个子任务，{records} 条记录",
    },
}


# --help texts: English is the source; a key missing from "zh" falls back to it.
HELP: dict[str, dict[str, str]] = {
    "en": {
        "wanwu": "万物 wanwu — recognize what is in large numbers of images, named in Chinese.",
        "verbose": "More log output on stderr (-vv for debug).",
        "recognize": "Recognize INPUTS: files, folders (recursive), globs, http(s) URLs, or - for a list on "
        "stdin.\n\nRecords come out in input order, one per input, as soon as each is ready. Rerun with --resume "
        "and the same INPUTS to finish an interrupted run.",
        "model": "An .onnx file (with --labels), a model folder, or modelscope:OWNER/NAME[@REV]. Default: the "
        "万物识别 general model from ModelScope.",
        "labels": "Label file, UTF-8: one label per line (line i = class i), or a .tsv/.csv table with a header "
        "(an en column is carried as label_en). Overrides the model folder's.",
        "label_column": "The label column of a .tsv/.csv label file (default: zh, label or name, else the last).",
        "device": "auto, cpu, cuda or cuda:N.",
        "threads": "Inference threads per stream (0 = the cores shared among streams).",
        "streams": "Batches inferred at once (0 = auto: 2 for onnxruntime on a CPU and for torch on CUDA, else 1).",
        "precision": "Precision of the torch backend: auto = bf16 on GPUs that run it natively, else fp16 (fp32 on "
                     "a CPU); the classifier head stays fp32.",
        "int8": "int8 ONNX models: exact integer kernels (auto: on CPUs without VNNI) or the fastest native ones.",
        "top_k": "Labels per image (1-50).",
        "score": "softmax probabilities, or the raw logits (ModelScope's score; the cosine for a CLIP model).",
        "threshold": "Drop predictions scoring below this (with --score logit on a CLIP model: multi-label "
        "tagging on the cosine).",
        "prompt": "Prompt template of a zero-shot (CLIP) model, {} = the label, e.g. \"一张{}的照片\". Repeatable: "
        "the embeddings are averaged. Default: four Chinese photo templates.",
        "batch_size": "Images per batch.",
        "workers": "Decode worker processes (-1 = one per core, 0 = decode in threads).",
        "no_cache": "Neither read nor write the result cache.",
        "rehash": "Read every input again, even those the stat memo knows to be unchanged since they were last "
        "read (same file, size and modification time; same ETag).",
        "cache": "Result cache: a file, or redis://HOST:PORT/DB to share one between machines (default "
                 "$WANWU_CACHE, else $WANWU_HOME/cache.sqlite3).",
        "max_pixels": "Refuse images above this many pixels (too_large).",
        "full_decode": "Decode large JPEGs at full size (slower; by default libjpeg scales them down while "
        "decoding as far as the model's resize allows).",
        "jpeg_decoder": "Decode baseline web-size JPEGs on the GPU: auto = nvJPEG where it can start (the "
        "gpu-decode extra and a CUDA device; else the CPU, said once), or a decoder's name. Other files, and "
        "large photos (cheaper at reduced size on the CPU), stay on the CPU.",
        "max_bytes": "Refuse files/downloads above this many bytes.",
        "decode_timeout": "Seconds one image may take to decode; past it the decoder is stopped and the record "
        "says decode_error (timed out).",
        "decode_budget": "Seconds of decoding one run (with serve: one request) may use in all; what is left to "
        "decode past it is too_large. Default: no budget (serve: 60).",
        "decode_memory_mb": "Memory (MiB of address space) a decode process may take beyond its start; a file "
        "needing more is too_large. Default: 3 x 4 bytes x --max-pixels (1,716 MiB); 0 = no limit.",
        "formats": "Also decode these formats, comma-separated Pillow names (psd,dds,fli,…), or 'all'. "
        "Default: JPEG, PNG, WebP, GIF, BMP, TIFF, PPM, ICO, TGA, AVIF, JPEG 2000, HEIC (with the heif extra).",
        "timeout": "URL fetch deadline (the whole download), seconds.",
        "allow_private_urls": "Also fetch URLs whose host is loopback, private, link-local or reserved (default: "
        "public addresses only).",
        "format": "Output format (default: from --output's suffix .csv/.json/.jsonl/.parquet, else table on a "
        "terminal, else jsonl).",
        "output": "Write records here instead of stdout (- is stdout).",
        "bom": "csv: begin with a UTF-8 BOM (for Excel).",
        "url_column": "URL tables (.parquet/.csv/.tsv inputs): the column holding each row's URL or path.",
        "keep_columns": "URL tables: also carry these columns (comma-separated) into each record's meta.",
        "with_meta": "WebDataset shards (.tar inputs): carry each sample's .json fields into its record's meta.",
        "embeddings": "Also each image's embedding (L2-normalised): an 'embedding' list in jsonl, a fixed-size list "
        "column in parquet. Cached apart from plain results.",
        "embeddings_dir": "Also write the embeddings in clip-retrieval's layout (img_emb/img_emb_N.npy float16 + "
        "metadata/metadata_N.parquet, same row order); implies --embeddings.",
        "embedding_output": "The model's tensor to take as the embedding (default: the global-pool output the "
        "graph's structure shows; a CLIP model's image embedding); implies --embeddings.",
        "resume": "Continue into an existing --output (jsonl, csv or parquet): skip the inputs it already records and "
        "append the rest; a torn last line left by a killed run is repaired.",
        "retry_errors": "With --resume (implied): also redo the inputs recorded as errors, replacing their "
        "records.",
        "quiet": "No progress bar and no summary.",
        "runner": "Where records are computed: this machine, or a Ray cluster (the cluster extra).",
        "ray_address": "--runner ray: the cluster to join (HOST:PORT from `ray start --head`); default: a local "
        "Ray.",
        "ray_actors": "--runner ray: inference actors, one model copy each (with --device cuda, one GPU each).",
        "report": "Write one self-contained HTML report (no network needed) about RESULTS (jsonl or parquet "
        "files).",
        "report.output": "The HTML file to write.",
        "report.top_labels": "Labels that get a grid of samples.",
        "report.per_label": "Best-scoring samples shown per label.",
        "report.max_failures": "Failed inputs listed (all are counted).",
        "report.seconds": "How long the run took, to show its throughput (records do not carry time).",
        "report.title": "The page's title.",
    },
    "zh": {
        "wanwu": "万物 wanwu — 识别大量图片中的内容，用中文命名。",
        "verbose": "在 stderr 输出更多日志（-vv 为调试级）。",
        "recognize": "识别 INPUTS：文件、文件夹（递归）、通配符、http(s) 网址，或用 - 从标准输入读取列表。\n\n"
        "记录按输入顺序输出，每个输入一条，一完成就写出。中断后用 --resume 和相同的 INPUTS 重新运行即可完成。",
        "model": "一个 .onnx 文件（配合 --labels）、一个模型文件夹，或 modelscope:OWNER/NAME[@REV]。"
        "默认：ModelScope 上的万物识别通用模型。",
        "labels": "标签文件，UTF-8：每行一个标签（第 i 行 = 第 i 类），或带表头的 .tsv/.csv 表格"
        "（en 列会作为 label_en 一并输出）。优先于模型文件夹自带的标签。",
        "label_column": ".tsv/.csv 标签文件中的标签列（默认：zh、label 或 name，否则最后一列）。",
        "device": "auto、cpu、cuda 或 cuda:N。",
        "threads": "每个推理流的线程数（0 = 各推理流平分 CPU 核心）。",
        "streams": "同时推理的批次数（0 = 自动：CPU 上的 onnxruntime 与 CUDA 上的 torch 为 2，否则为 1）。",
        "precision": "torch 后端的计算精度：auto = 原生支持 bf16 的 GPU 用 bf16，其他 GPU 用 fp16"
                     "（CPU 上为 fp32）；分类头保持 fp32。",
        "int8": "int8 ONNX 模型：精确的整数内核（auto：在没有 VNNI 的 CPU 上），或最快的原生内核。",
        "top_k": "每张图片的标签数（1-50）。",
        "score": "softmax 概率，或原始 logits（ModelScope 的分数；CLIP 模型为余弦相似度）。",
        "threshold": "丢弃分数低于此值的预测（CLIP 模型配合 --score logit：按余弦相似度多标签打标）。",
        "prompt": "零样本（CLIP）模型的提示模板，{} 代表标签，如 \"一张{}的照片\"。可重复，嵌入取平均。"
        "默认：四个中文照片模板。",
        "batch_size": "每批图片数。",
        "workers": "解码进程数（-1 = 每核一个，0 = 在线程中解码）。",
        "no_cache": "既不读也不写结果缓存。",
        "rehash": "重新读取每个输入，即使状态备忘录知道它自上次读取以来没有变化"
        "（同一文件、大小和修改时间；同一 ETag）。",
        "cache": "结果缓存：一个文件，或 redis://主机:端口/库号（多台机器共用一个）（默认 $WANWU_CACHE，"
                 "否则 $WANWU_HOME/cache.sqlite3）。",
        "max_pixels": "拒绝像素数超过此值的图片（too_large）。",
        "full_decode": "以原尺寸解码大 JPEG（较慢；默认 libjpeg 在模型缩放允许的范围内边解码边缩小）。",
        "jpeg_decoder": "在 GPU 上解码普通（baseline）网页尺寸 JPEG：auto = 能启动时用 nvJPEG（需 gpu-decode "
        "扩展和 CUDA 设备；否则用 CPU，并提示一次），或指定解码器名称。其他文件以及大照片（在 CPU 上缩小解码更省）"
        "仍在 CPU 上解码。",
        "max_bytes": "拒绝超过此字节数的文件或下载。",
        "decode_timeout": "单张图片解码的时限（秒）；超时则停止解码器，记录为 decode_error（超时）。",
        "decode_budget": "一次运行（serve：一个请求）总共可用的解码秒数；超出后其余待解码的输入记为 too_large。"
        "默认：不限（serve：60）。",
        "decode_memory_mb": "解码进程在启动之外可再占用的内存（地址空间，MiB）；需要更多的文件记为 too_large。"
        "默认：3 × 4 字节 × --max-pixels（1,716 MiB）；0 = 不限。",
        "formats": "另外解码这些格式（逗号分隔的 Pillow 格式名，如 psd,dds,fli），或 all。默认：JPEG、PNG、WebP、"
        "GIF、BMP、TIFF、PPM、ICO、TGA、AVIF、JPEG 2000、HEIC（需 heif 扩展）。",
        "timeout": "网址下载的总时限（整个下载），秒。",
        "allow_private_urls": "也下载主机为回环、私有、链路本地或保留地址的网址（默认：只下载公网地址）。",
        "format": "输出格式（默认：按 --output 的后缀 .csv/.json/.jsonl/.parquet，否则终端上为 table，否则为 jsonl）。",
        "output": "把记录写到这里，而不是标准输出（- 即标准输出）。",
        "bom": "csv：以 UTF-8 BOM 开头（供 Excel 使用）。",
        "url_column": "网址表（.parquet/.csv/.tsv 输入）：存放每行网址或路径的列。",
        "keep_columns": "网址表：把这些列（逗号分隔）也带进每条记录的 meta。",
        "with_meta": "WebDataset 分片（.tar 输入）：把每个样本 .json 的字段带进其记录的 meta。",
        "embeddings": "同时输出每张图的嵌入向量（L2 归一化）：jsonl 中为 embedding 列表，parquet 中为定长列表列。"
        "与普通结果分开缓存。",
        "embeddings_dir": "同时按 clip-retrieval 的目录布局写出嵌入（img_emb/img_emb_N.npy float16 + "
        "metadata/metadata_N.parquet，行序一致）；隐含 --embeddings。",
        "embedding_output": "作为嵌入的模型张量名（默认：由图结构找到的全局池化输出；CLIP 模型为其图像嵌入）；"
        "隐含 --embeddings。",
        "resume": "接着写入已有的 --output（jsonl、csv 或 parquet）：跳过其中已有记录的输入，追加其余的；"
        "被杀死的运行留下的残缺末行会被修复。",
        "retry_errors": "配合 --resume（自动启用）：也重做记录为错误的输入，替换其记录。",
        "quiet": "不显示进度条和汇总。",
        "runner": "在哪里计算记录：本机，或 Ray 集群（需 cluster 扩展）。",
        "ray_address": "配合 --runner ray：要加入的集群（`ray start --head` 给出的 HOST:PORT）；默认：本机私有的 Ray。",
        "ray_actors": "配合 --runner ray：推理 actor 数，每个持有一份模型（配合 --device cuda 时每个占一块 GPU）。",
        "report": "为 RESULTS（jsonl 或 parquet 文件）写出一个自包含的 HTML 报告（无需联网）。",
        "report.output": "要写出的 HTML 文件。",
        "report.top_labels": "展示样例网格的标签数。",
        "report.per_label": "每个标签展示的最高分样例数。",
        "report.max_failures": "列出的失败输入数（全部计入统计）。",
        "report.seconds": "这次运行用了多少秒，用来显示吞吐量（记录中不含时间）。",
        "report.title": "页面标题。",
    },
}

# The one-line summaries in ``wanwu --help`` and ``wanwu jobs|cache --help``, by command path (English: the
# commands' docstrings).
SHORT_HELP_ZH = {
    "cache": "查看和清理结果缓存（按文件内容保存的模型输出）。",
    "cache stats": "条目数、磁盘占用、时间，按模型/预处理命名空间列出。",
    "cache clear": "删除缓存的结果（全部，或某个命名空间的）。",
    "cache prune": "删除过旧或最久未用的结果。",
    "convert": "把 PyTorch 模型转换为 ONNX，并检查两者的 logits 一致。",
    "jobs": "面向大型图库的异步任务：现在提交，由工作进程运行，稍后取回。",
    "jobs submit": "把 INPUTS（文件、文件夹、通配符、网址，或 - 表示标准输入列表）作为一个任务排队，输出任务 id。",
    "jobs status": "以 JSON 输出 JOB_ID 的状态；不带 id 时列出最近的任务。",
    "jobs wait": "带进度条等待 JOB_ID 结束；退出码与 recognize 相同。",
    "jobs results": "按输入顺序写出 JOB_ID 目前的记录。",
    "jobs cancel": "停止 JOB_ID：不再开始它的子任务；已写出的记录保留。",
    "jobs delete": "取消 JOB_IDS 并删除其状态、记录和上传的文件。",
    "recognize": "识别 INPUTS：文件、文件夹、通配符、网址，或 - 表示标准输入列表。",
    "report": "为记录文件写出一个自包含的离线 HTML 报告。",
    "serve": "通过 HTTP 提供识别服务：/ 为网页，/v1 下为 API。",
    "worker": "用一个已加载的模型处理队列中的子任务；可在任意机器上启动任意多个。",
}

# click's own words in --help and usage errors, by click's English text.
CLICK_ZH = {
    "Usage:": "用法：", "Options": "选项", "Commands": "命令", "Positional arguments": "位置参数",
    "default": "默认", "required": "必填",
    "Show this message and exit.": "显示此帮助并退出。", "Show the version and exit.": "显示版本并退出。",
    "Try '{command} {option}' for help.": "用 '{command} {option}' 查看帮助。", "Error: {message}": "错误：{message}",
    "Invalid value for {param_hint}: {message}": "{param_hint} 的值无效：{message}",
}


def short_help(path: str) -> str | None:
    """The one-line summary of command ``path`` (e.g. ``"jobs wait"``) in Chinese; None: keep the docstring's."""
    return SHORT_HELP_ZH.get(path) if language() == "zh" else None


def h(key: str) -> str:
    """The --help text ``key`` in the current language."""
    return HELP[language()].get(key) or HELP["en"][key]


def click_zh(text: str) -> str:
    """click's English ``text`` under a Chinese locale (as it is otherwise)."""
    return CLICK_ZH.get(text, text) if language() == "zh" else text


def language(environ: dict[str, str] | None = None) -> str:
    """``zh`` or ``en``, by the rule in the module docstring."""
    env = os.environ if environ is None else environ
    forced = env.get("WANWU_LANG", "").strip().lower()[:2]
    if forced in LANGUAGES:
        return forced
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = env.get(name, "")
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


def t(key: str, **values: object) -> str:
    """The message ``key`` in the current language, formatted with ``values``."""
    return MESSAGES[language()][key].format(**values)
