"""--resume and --retry-errors: a killed run is finished with exactly one record per input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import wanwu
from tests.helpers import image_bytes, wait_for_lines
from wanwu.cli.main import main
from wanwu.errors import UsageError
from wanwu.resume import prepare_resume
from wanwu.sinks import csv_header

SRC = Path(wanwu.__file__).resolve().parents[1]
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (120, 120, 120)]


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:04d}.png"
        path.write_bytes(image_bytes(COLORS[i % len(COLORS)], size=(40 + i % 97, 30 + i // 97), fmt="PNG"))
        paths.append(path)
    return paths


def _line(input: str, status: str = "ok") -> bytes:
    record: dict[str, Any] = {"input": input, "status": status}
    if status == "ok":
        record.update(predictions=[{"index": 1, "label": "绿", "score": 0.5}], sha256="ab", width=1, height=1)
    else:
        record["error"] = {"type": "not_found", "message": "no such file"}
    return json.dumps(record, ensure_ascii=False).encode() + b"\n"


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- reading an existing output ---------------------------------------------------------------------------


def test_missing_file_is_a_fresh_start(tmp_path: Path) -> None:
    state = prepare_resume(tmp_path / "none.jsonl", "jsonl", top_k=5)
    assert not state.exists and not state.done and not (tmp_path / "none.jsonl").exists()


def test_jsonl_torn_tail_is_cut_and_inputs_counted(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    whole = _line("a.jpg") + _line("b.jpg", "error") + _line("c.jpg") + _line("a.jpg")
    out.write_bytes(whole + _line("d.jpg")[:17])  # killed mid-write: no line end
    state = prepare_resume(out, "jsonl", top_k=5)
    assert out.read_bytes() == whole
    assert state.torn_bytes == 17 and state.kept == 4 and state.errors_kept == 1
    assert state.done == {"a.jpg": 2, "b.jpg": 1, "c.jpg": 1}
    from wanwu.sources import InputItem

    items = [InputItem(n, "file", n) for n in ("a.jpg", "b.jpg", "a.jpg", "a.jpg", "d.jpg", "c.jpg")]
    assert [i.input for i in state.pending(items)] == ["a.jpg", "d.jpg"]  # a third a.jpg is still to do
    assert state.skipped == 4


def test_retry_errors_rewrites_without_error_records(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(_line("a.jpg") + _line("b.jpg", "error") + _line("c.jpg") + b'{"input":"x')
    os.chmod(out, 0o640)
    state = prepare_resume(out, "jsonl", top_k=5, retry_errors=True)
    assert out.read_bytes() == _line("a.jpg") + _line("c.jpg")
    assert state.errors_removed == 1 and state.done == {"a.jpg": 1, "c.jpg": 1}
    assert out.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left behind


def test_a_file_that_is_not_wanwu_output_is_refused_untouched(tmp_path: Path) -> None:
    out = tmp_path / "notes.jsonl"
    content = b"my precious notes\nsecond line"
    out.write_bytes(content)
    with pytest.raises(UsageError, match="not wanwu output"):
        prepare_resume(out, "jsonl", top_k=5, retry_errors=True)
    assert out.read_bytes() == content
    with pytest.raises(UsageError, match="json"):
        prepare_resume(out, "json", top_k=5)


def _csv_bytes(rows: list[list[object]], top_k: int = 1, bom: bool = True) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_header(top_k))
    writer.writerows(rows)
    return (("\ufeff" if bom else "") + buf.getvalue()).encode()


def test_csv_torn_row_inside_quotes_is_cut(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    ok = ["a,1.jpg", "ok", "ab", 1, 1, "红", 0, 0.9, "", ""]
    err = ["b.jpg", "error", "", "", "", "", "", "", "decode_error", "bad\nfile, really"]
    whole = _csv_bytes([ok, err])
    out.write_bytes(whole + b'c.jpg,error,,,,,,,decode_error,"half a\nmessage')
    state = prepare_resume(out, "csv", top_k=1)
    assert out.read_bytes() == whole and state.exists
    assert state.done == {"a,1.jpg": 1, "b.jpg": 1} and state.errors_kept == 1
    prepare_resume(out, "csv", top_k=1, retry_errors=True)
    assert out.read_bytes() == _csv_bytes([ok])  # header (and BOM) kept, error row gone
    with pytest.raises(UsageError, match="header"):
        prepare_resume(out, "csv", top_k=5)
    out.write_bytes(b"input,sta")  # killed before the header was complete: start afresh
    state = prepare_resume(out, "csv", top_k=1)
    assert not state.exists and out.read_bytes() == b""


# --- the CLI ----------------------------------------------------------------------------------------------


def _model_args(model: tuple[Path, Path]) -> list[str]:
    return ["-m", str(model[0]), "-l", str(model[1]), "-b", "8", "-q"]


def test_resume_needs_a_resumable_output(tmp_path: Path, tiny_model: tuple[Path, Path]) -> None:
    images = _images(tmp_path / "img", 2)
    args = ["recognize", str(images[0]), *_model_args(tiny_model), "-j", "0"]
    assert main([*args, "--resume"]) == 2
    assert main([*args, "--resume", "-o", str(tmp_path / "o.json")]) == 2
    assert main([*args, "--retry-errors", "-f", "table", "-o", str(tmp_path / "o.txt")]) == 2
    out = tmp_path / "new.jsonl"
    assert main([*args, "--resume", "-o", str(out)]) == 0  # nothing to resume: a fresh run
    assert [r["input"] for r in _records(out)] == [str(images[0])]


def test_resume_and_retry_errors_end_to_end(tmp_path: Path, tiny_model: tuple[Path, Path]) -> None:
    folder = tmp_path / "img"
    images = _images(folder, 12)
    late = folder / "late.png"
    for fmt in ("jsonl", "csv"):
        late.unlink(missing_ok=True)
        out = tmp_path / f"out.{fmt}"
        args = ["recognize", *_model_args(tiny_model), "-j", "0", "-o", str(out)]
        # The first run saw only half the photos, and one input was missing.
        assert main([*args[:1], *map(str, images[:6]), str(late), *args[1:]]) == 3
        everything = [*map(str, images), str(late)]
        assert main([*args[:1], *everything, *args[1:], "--resume"]) == 3  # the error is kept
        late.write_bytes(image_bytes((1, 2, 3), size=(50, 50), fmt="PNG"))
        assert main([*args[:1], *everything, *args[1:], "--resume"]) == 3  # still kept: no retry
        assert main([*args[:1], *everything, *args[1:], "--retry-errors"]) == 0
        if fmt == "jsonl":
            rows = [(r["input"], r["status"]) for r in _records(out)]
        else:
            lines = list(csv.reader(out.read_text(encoding="utf-8").splitlines()))
            assert lines[0] == csv_header(5)
            rows = [(r[0], r[1]) for r in lines[1:]]
        assert sorted(rows) == sorted((i, "ok") for i in everything)


def _cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from wanwu.cli.main import main; sys.exit(main())", *args]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):  # its decode workers, orphaned by the kill
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("feed", ["stdin", "folder"])
def test_sigkill_then_resume_gives_one_valid_record_per_input(
    tmp_path: Path, tiny_model: tuple[Path, Path], feed: str
) -> None:
    folder = tmp_path / "img"
    images = _images(folder, 300)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    common = [*_model_args(tiny_model), "-j", "1"]
    reference = tmp_path / "reference.jsonl"
    subprocess.run(_cli_cmd("recognize", str(folder), *common, "--no-cache", "-o", str(reference)),
                   env=env, check=True, timeout=300)

    out = tmp_path / "out.jsonl"
    if feed == "stdin":
        # Half the list, and stdin left open: the run is certainly mid-way when it is killed.
        proc = subprocess.Popen(_cli_cmd("recognize", "-", *common, "-o", str(out)), env=env,
                                stdin=subprocess.PIPE, start_new_session=True)
        assert proc.stdin is not None
        proc.stdin.write("".join(f"{p}\n" for p in images[:150]).encode())
        proc.stdin.flush()
    else:
        proc = subprocess.Popen(_cli_cmd("recognize", str(folder), *common, "-o", str(out)), env=env,
                                start_new_session=True)
    try:
        wait_for_lines(out, 20, proc)
    finally:
        _kill(proc)
        if proc.stdin is not None:
            proc.stdin.close()
    written = out.read_bytes().count(b"\n")
    if feed == "stdin":
        assert 20 <= written < 150
    with out.open("ab") as f:  # as if the kill had come in the middle of writing a line
        f.write(_line(str(images[-1]))[:25])

    subprocess.run(_cli_cmd("recognize", str(folder), *common, "-o", str(out), "--resume"),
                   env=env, check=True, timeout=300)
    records = _records(out)  # every line parses
    assert len(records) == 300
    assert sorted(r["input"] for r in records) == sorted(map(str, images))
    expected = {r["input"]: r for r in _records(reference)}
    assert all(r == expected[r["input"]] for r in records)  # same predictions, sizes and hashes
    assert records[:written] == _records(reference)[:written]  # the first run's part, untouched, in order
