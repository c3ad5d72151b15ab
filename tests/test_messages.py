"""What the command line says when something is off: a reason and what to do, never a traceback, in the
locale's language, with the exit status the README gives."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import image_bytes
from wanwu.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANWU_LANG": "en", **extra}
    return {k: v for k, v in env.items() if v}


def _wanwu(*args: str, prelude: str = "", **popen: object) -> subprocess.Popen[str]:
    """``wanwu ARGS`` in a fresh interpreter; ``prelude`` runs first (e.g. to make an extra unimportable)."""
    code = f"{prelude}\nfrom wanwu.cli.main import run\nrun()"
    return subprocess.Popen([sys.executable, "-c", code, *args], text=True, **popen)  # type: ignore[call-overload]


def _model(tiny_model: tuple[Path, Path]) -> list[str]:
    return ["-m", str(tiny_model[0]), "-l", str(tiny_model[1]), "--no-cache", "-j", "0"]


def test_s3_without_the_extra_names_it_and_prints_no_traceback(tiny_model: tuple[Path, Path]) -> None:
    """The background count of the inputs (for the progress bar) met the missing extra too: it stays quiet."""
    blocked = "import sys; sys.modules['s3fs'] = None  # as if the s3 extra were not installed"
    proc = _wanwu("recognize", "s3://bucket/photos/", *_model(tiny_model), prelude=blocked,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "pip install 'wanwu-vision[s3]'" in err
    assert "Traceback" not in err and "Exception in thread" not in err, err


def test_a_refused_private_url_names_the_flag_that_allows_it(
        tiny_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recognize", "http://127.0.0.1:9/a.jpg", *_model(tiny_model), "-q", "-f", "jsonl"]) == 3
    record = json.loads(capsys.readouterr().out)
    assert record["error"]["type"] == "fetch_error"
    assert "--allow-private-urls" in record["error"]["message"]


def test_a_closed_stdout_ends_the_run_quietly_with_the_broken_pipe_status(
        tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    """``wanwu recognize … | head -2``: the records before the reader left were whole, nothing on stderr."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(300):
        (folder / f"{i:03}.jpg").write_bytes(image_bytes((i % 250, 40, 90), size=(40, 30)))
    proc = _wanwu("recognize", str(folder), *_model(tiny_model), "-b", "1", "-f", "jsonl",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    with proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = [json.loads(proc.stdout.readline()) for _ in range(2)]
        proc.stdout.close()  # what head does after its two lines
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, err
    assert [r["status"] for r in first] == ["ok", "ok"]
    assert err == "", err


def test_a_model_folder_without_a_model_lists_the_forms_and_points_at_the_onnx_inside(
        tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "downloaded"
    (folder / "onnx").mkdir(parents=True)
    inside = folder / "onnx" / "model.onnx"
    inside.write_bytes(tiny_model[0].read_bytes())
    assert main(["recognize", str(tmp_path), "-m", str(folder), "-q"]) == 2
    err = capsys.readouterr().err
    for form in (".onnx file", "wanwu.json", "ModelScope folder", "Chinese-CLIP", "hf:OWNER/NAME",
                 "modelscope:OWNER/NAME"):
        assert form in err, err
    assert f"use --model {inside} --labels LABELS" in err


def _zh_help(*command: str, columns: int = 80) -> str:
    proc = subprocess.run([sys.executable, "-m", "wanwu", *command, "--help"], capture_output=True, text=True,
                          env=_env(WANWU_LANG="", LC_ALL="", LC_MESSAGES="", LANG="zh_CN.UTF-8",
                                   COLUMNS=str(columns)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_chinese_help_covers_report_and_the_ray_options_and_never_splits_a_word() -> None:
    report, recognize = _zh_help("report"), _zh_help("recognize")
    assert "为 RESULTS" in report and "要写出的 HTML 文件" in report and "The HTML file" not in report
    for option in ("--runner", "--ray-address", "--ray-actors"):
        (line,) = [x for x in recognize.splitlines() if x.strip().startswith(option)]
        assert re.search(r"[\u4e00-\u9fff]", line), line  # its help starts on the same line, in Chinese
    # Wrapped at any width, the help holds the same Latin words and flags: none was cut in two.
    words = [Counter(re.findall(r"[A-Za-z0-9_]+", page)) for page in
             (_zh_help("recognize", columns=50), recognize, _zh_help("recognize", columns=100))]
    assert words[0] == words[1] == words[2], [w - words[2] for w in words[:2]]


def test_the_text_wrap_breaks_between_chinese_characters_and_keeps_words_whole() -> None:
    from wanwu.cli.helpformat import display_width, wrap

    text = "另外解码这些格式（逗号分隔的 Pillow 格式名，如 psd,dds,fli），或 all。默认：JPEG、PNG、WebP、GIF"
    for width in range(16, 40):  # the longest chunk, 'psd,dds,fli），', is 15 columns
        lines = wrap(text, width)
        assert "".join(lines).replace(" ", "") == text.replace(" ", "")
        assert all(display_width(line) <= width for line in lines), (width, lines)
        words = re.findall(r"[A-Za-z]+", text)
        assert all(w in words for line in lines for w in re.findall(r"[A-Za-z]+", line)), (width, lines)
        assert not any(line.startswith(("，", "。", "）", "、")) for line in lines), lines


def test_lines_printed_on_the_descriptor_go_aside_and_wanwus_keep_stderr(tmp_path: Path) -> None:
    """What --runner ray does with Ray's output: the C level and another logger into the file, wanwu's on
    stderr."""
    log = tmp_path / "logs" / "aside.log"
    script = f"""
import logging, os, sys
from pathlib import Path
from wanwu.cli.aside import stderr_aside
logging.basicConfig(level=logging.INFO, format="wanwu: %(message)s", stream=sys.stderr)
with stderr_aside(Path({str(log)!r})) as aside:
    other = logging.getLogger("ray.thing")
    other.propagate = False
    other.addHandler(logging.StreamHandler(sys.stderr))
    aside.claim_loggers("ray")
    os.write(2, b"E core_worker.cc: from C\\n")
    other.warning("WARNING from another library")
    logging.getLogger("wanwu").info("our message")
    print("wanwu: printed", file=sys.stderr)
print("wanwu: after", file=sys.stderr)
os.write(2, b"wanwu: fd 2 is back\\n")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(),
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["wanwu: our message", "wanwu: printed", "wanwu: after",
                                        "wanwu: fd 2 is back"]
    assert log.read_text().splitlines() == ["E core_worker.cc: from C", "WARNING from another library"]


@pytest.mark.extra("server")
def test_the_page_and_its_icon_are_served(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    import httpx

    from tests.servers import uvicorn_in_thread
    from wanwu.config import RecognizeOptions
    from wanwu.service import ServeConfig, create_app

    config = ServeConfig(model=str(tiny_model[0]), labels=tiny_model[1],
                         options=RecognizeOptions(decoders=0, cache=False))
    with uvicorn_in_thread(create_app(config, cache=None)) as base:
        page = httpx.get(f"{base}/").text
        (icon,) = re.findall(r'<link rel="icon"[^>]*href="([^"]+)"', page)
        linked, default = httpx.get(f"{base}{icon}"), httpx.get(f"{base}/favicon.ico")
    for response in (linked, default):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("image/svg+xml")
        assert response.content.startswith(b"<svg")
