"""What the command line says to a person, in one language at a time: a small message catalogue.

The rule: ``WANWU_LANG`` (``zh`` or ``en``) if set; else the locale, the first set of ``LC_ALL``,
``LC_MESSAGES``, ``LANG`` (POSIX precedence): a value starting with ``zh`` (``zh_CN.UTF-8``, ``zh_TW``...)
means Chinese, anything else English. Records (JSONL/CSV/JSON) and error texts raised by the library are
not translated; only what the CLI itself prints around them (progress, summaries, table headings, job
messages) is.
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
        "jobs.lapsed": "{n} task(s) wait for a lapsed lease (their worker went silent); another worker takes "
        "them over",
        "jobs.no_workers": "no worker holds any of its tasks: start one with  wanwu worker --queue URL --model M",
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
        "jobs.lapsed": "{n} 个子任务在等待过期的租约（其工作进程已无响应），将由其他工作进程接手",
        "jobs.no_workers": "没有工作进程持有它的子任务：用  wanwu worker --queue URL --model M  启动一个",
        "worker.start": "工作进程 {worker}：模型 {model}，队列 {queue}",
        "worker.progress": "工作进程 {worker}：{tasks} 个子任务，{records} 条记录（{failed} 个失败），{rate:.1f} 张/秒",
        "worker.stop": "工作进程 {worker}：已停止，共 {tasks} 个子任务，{records} 条记录",
    },
}


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
