"""What a person sees on the terminal: the table, the progress bar, the language, the summary, Ctrl-C, help."""

from __future__ import annotations

import io
import re
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from rich.cells import cell_len
from rich.console import Console

from wanwu.cli.main import cli, main
from wanwu.cli.messages import MESSAGES, language, t
from wanwu.cli.progress import RunProgress, say
from wanwu.labels import load_labels
from wanwu.records import ErrorInfo, Prediction, Record
from wanwu.sinks import SinkOptions, create_sink

PHOTOS = ("n01440764_tench.JPEG", "n07753592_banana.JPEG", "n03417042_garbage_truck.JPEG")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _records(shared_data: Path) -> list[Record]:
    """Records with the real labels that are longest on screen, and a long path."""
    labels = load_labels(shared_data / "labels" / "imagenet_zh.txt")
    longest = sorted(range(len(labels)), key=lambda i: -cell_len(labels[i]))[:5]
    deep = "/data/catalogue/2024/spring/" + "子目录/" * 6 + "IMG_20240401_123456.jpg"
    ok = Record(deep, "ok", [Prediction(i, labels[i], 0.5 / (n + 1)) for n, i in enumerate(longest)], "ab", 4, 3)
    short = Record("a.jpg", "ok", [Prediction(0, labels[0], 0.93)], "cd", 4, 3)
    bad = Record("broken.jpg", "error", error=ErrorInfo("decode_error", "cannot decode image: " + "x" * 120))
    return [ok, short, bad]


@pytest.mark.shared
def test_table_rows_fit_80_columns_in_aligned_cells(shared_data: Path) -> None:
    console = Console(file=io.StringIO(), width=80, color_system=None)
    sink = create_sink("table", io.StringIO(), SinkOptions(top_k=5, console=console))
    records = _records(shared_data)
    for record in records:
        sink.write(record)
    sink.close()
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 + len(records)  # a header, then exactly one line per record: nothing wrapped
    assert all(cell_len(line) <= 80 for line in lines)
    assert lines[0].split()[:4] == ["input", "label", "score", "more"]
    assert "IMG_20240401_123456.jpg" in lines[1] and lines[1].split()[1].startswith("…")  # the path's tail
    assert lines[2].split()[1:4] == ["a.jpg", records[1].predictions[0].label, "93.0%"]
    assert "decode_error" in lines[3] and lines[3].rstrip().endswith("…")
    # Columns line up: every row's label cell starts where the header's "label" does.
    at = lines[0].index("label")
    assert all(_cell_at(line, at - 1) == " " and _cell_at(line, at) != " " for line in lines[1:])


def _cell_at(line: str, cell: int) -> str:
    """The character at terminal cell ``cell`` (wide characters take two)."""
    width = 0
    for ch in line:
        if width <= cell < width + cell_len(ch):
            return ch
        width += cell_len(ch)
    return ""


@pytest.mark.shared
def test_table_rows_print_above_the_progress_bar(shared_data: Path) -> None:
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    progress = RunProgress("recognizing", True, console)
    sink = create_sink("table", io.StringIO(), SinkOptions(console=console))
    for record in _records(shared_data):
        sink.write(record)
        progress.advance(record.ok)
    progress.stop()
    text = ANSI.sub("", console.file.getvalue()).replace("\r", "\n")  # type: ignore[attr-defined]
    rows = [line for line in text.splitlines() if "✓" in line or "✗" in line]
    assert len(rows) == 3 and not any("recognizing" in row or "━" in row for row in rows)
    assert "3/?" in text  # the bar itself was drawn, and counted the three records


def test_language_follows_the_locale(monkeypatch: pytest.MonkeyPatch) -> None:
    assert language({"LANG": "zh_CN.UTF-8"}) == "zh"
    assert language({"LANG": "zh_CN.UTF-8", "LC_ALL": "C.UTF-8"}) == "en"  # LC_ALL wins
    assert language({"LC_MESSAGES": "zh_TW.UTF-8", "LANG": "en_US.UTF-8"}) == "zh"
    assert language({"LANG": "zh_CN.UTF-8", "WANWU_LANG": "en"}) == "en"
    assert language({}) == "en"


def test_every_message_exists_in_both_languages_with_the_same_fields() -> None:
    def fields(text: str) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name}

    assert set(MESSAGES["en"]) == set(MESSAGES["zh"])
    for key, text in MESSAGES["en"].items():
        assert fields(text) == fields(MESSAGES["zh"][key]), key


@pytest.mark.shared
def test_summary_counts_cache_hits_in_the_locale_language(
    mobilenet: tuple[Path, Path], photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["recognize", *[str(photos / p) for p in PHOTOS], "--model", str(mobilenet[0]), "--labels",
            str(mobilenet[1]), "-j", "0"]
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    monkeypatch.delenv("WANWU_LANG", raising=False)
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_MESSAGES", raising=False)
    assert main(args) == 0
    first = capsys.readouterr().err
    assert "3 input(s): 3 ok" in first and "cache" not in first
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    assert main(args) == 0
    second = capsys.readouterr().err
    assert "3 个输入：3 个成功" in second and "3 个来自缓存" in second and "input" not in second


def test_the_summary_is_coloured_on_a_terminal_and_plain_text_elsewhere(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WANWU_LANG", "en")
    line = "wanwu: 4 input(s): 3 ok" + t("summary.failed", n=1) + " in 0.2s"
    say(line)
    assert capsys.readouterr().err == "wanwu: 4 input(s): 3 ok, 1 failed in 0.2s\n"  # a pipe: no tags, no codes
    monkeypatch.setattr(click.utils, "should_strip_ansi", lambda stream=None, color=None: False)  # a terminal
    say(line)
    assert capsys.readouterr().err == f"wanwu: 4 input(s): 3 ok, {click.style('1 failed', fg='red')} in 0.2s\n"


@pytest.mark.shared
def test_ctrl_c_says_how_far_it_got_and_how_to_finish(mobilenet: tuple[Path, Path], photos: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wanwu", "recognize", str(photos), "--model", str(mobilenet[0]), "--labels",
         str(mobilenet[1]), "--no-cache", "-j", "1", "-b", "8", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**_env(), "LANG": "C.UTF-8"},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 40):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    done = len(out.read_text(encoding="utf-8").splitlines())
    assert 40 <= done < 1000
    assert f"interrupted: {done} of 1000 done; rerun with --resume to finish" in err, err


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LC_MESSAGES", "WANWU_LANG")}


def test_limits_of_zero_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for option in ("--max-pixels", "--timeout", "--max-bytes", "--batch-size", "--top-k"):
        assert main(["recognize", str(tmp_path), option, "0"]) == 2, option
        err = capsys.readouterr().err
        assert "Invalid value for" in err and f"'{option}'" in err


def test_help_shows_defaults_and_verbose_is_accepted_after_every_subcommand(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["recognize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("[default: 5; 1<=x<=50]", "[default: 32; x>=1]", "[default: 150000000; x>=1]",
                    "[default: 30.0; x>0]"):
        assert default in text, default

    def leaves(group: object) -> list[object]:
        commands = getattr(group, "commands", None)
        return [leaf for c in commands.values() for leaf in leaves(c)] if commands is not None else [group]

    for command in leaves(cli):
        assert any("-v" in p.opts for p in command.params), command  # type: ignore[attr-defined]
    assert main(["cache", "stats", "-vv"]) == 0
    import logging

    assert logging.getLogger().getEffectiveLevel() == logging.DEBUG
    logging.getLogger().setLevel(logging.WARNING)
    assert "cache" in capsys.readouterr().out  # the command itself ran as usual


@pytest.mark.parametrize(("lang", "expected", "foreign"), [
    ("zh_CN.UTF-8", ["用法", "选项", "每张图片的标签数", "[默认：5; 1<=x<=50]"], ["Usage", "Labels per image"]),
    ("C.UTF-8", ["Usage", "Options", "Labels per image", "[default: 5; 1<=x<=50]"], ["用法", "每张图片"]),
])
def test_help_is_in_the_locale_language(lang: str, expected: list[str], foreign: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "wanwu", "recognize", "--help"], capture_output=True, text=True,
                          env={**_env(), "LANG": lang, "COLUMNS": "200"}, timeout=60, check=True)
    for text in expected:
        assert text in proc.stdout, text
    for text in foreign:
        assert text not in proc.stdout, text


def test_command_summaries_in_chinese_name_real_commands() -> None:
    from wanwu.cli.messages import SHORT_HELP_ZH

    def paths(group: object, prefix: str = "") -> list[str]:
        out = []
        for name, command in getattr(group, "commands", {}).items():
            out += [prefix + name, *paths(command, f"{prefix}{name} ")]
        return out

    assert set(SHORT_HELP_ZH) <= set(paths(cli))
    proc = subprocess.run([sys.executable, "-m", "wanwu", "jobs", "--help"], capture_output=True, text=True,
                          env={**_env(), "LANG": "zh_CN.UTF-8", "COLUMNS": "200"}, timeout=60, check=True)
    assert "带进度条等待 JOB_ID 结束" in proc.stdout and "Block until" not in proc.stdout


def test_ctrl_c_while_a_record_is_written_lands_after_it_is_counted() -> None:
    import signal as signals

    from wanwu.cli.progress import WholeRecords

    written: list[int] = []
    before = signals.getsignal(signals.SIGINT)  # default_int_handler; SIG_IGN when started in the background
    with WholeRecords() as guard:
        with pytest.raises(KeyboardInterrupt), guard.writing():
            signals.raise_signal(signals.SIGINT)  # Ctrl-C between the write and the count
            written.append(1)  # the count still happens
        assert written == [1]
        with pytest.raises(KeyboardInterrupt):  # outside a write: at once
            signals.raise_signal(signals.SIGINT)
    assert signals.getsignal(signals.SIGINT) is before  # put back
