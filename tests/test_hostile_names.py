"""Names and folders built to break outputs and walks: file names that are not UTF-8 or hold line breaks and
terminal escapes, and folders holding what cannot be read (an unreadable folder, dangling links, a link loop, a
FIFO named like a photo). Every entry gets its record; every output stays well formed."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import jobs_support as js
from tests.helpers import image_bytes
from wanwu.cli.main import main
from wanwu.sources import escape_name, expand, unescape_name

Model = tuple[Path, Path]
RAW = b"photo-\xff\xfe.jpg"  # Latin-1 bytes: not UTF-8
SHOWN = "photo-\\xff\\xfe.jpg"


def _run(model: Model, *args: str) -> int:
    return main(["recognize", "--model", str(model[0]), "--labels", str(model[1]), "--no-cache", "-j", "0", "-q",
                 "--score", "logit", *args])


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    with open(os.fsencode(folder) + b"/" + RAW, "wb") as f:
        f.write(image_bytes((200, 30, 30)))
    (folder / "plain.jpg").write_bytes(image_bytes((30, 30, 200)))
    return folder


def test_escaping_is_reversible_valid_utf8_and_leaves_ordinary_names_alone() -> None:
    raw = os.fsdecode(RAW)
    assert escape_name(raw) == SHOWN and unescape_name(SHOWN) == raw
    for name in ["猫.jpg", "a b.jpg", "C:\\photos\\cat.jpg", "a\\b", "tail\\"]:
        assert escape_name(name) == name  # no escape to tell apart: nothing changes
    for name in [raw, "a\\xff.jpg", "a\\\\b", "\\" + raw, "x\ud800y", "a\\u00e9", "end\\x"]:
        escaped = escape_name(name)
        escaped.encode("utf-8")  # never raises
        assert unescape_name(escaped) == name, name


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "json", "parquet"])
def test_a_name_that_is_not_utf8_gets_its_record_in_every_format(
    tiny_model: Model, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if suffix == "parquet":
        pytest.importorskip("pyarrow", reason="parquet output needs the parquet extra")
    folder = _folder(tmp_path)
    out = tmp_path / f"out.{suffix}"
    assert _run(tiny_model, str(folder), "-o", str(out)) == 0, capsys.readouterr().err
    if suffix == "parquet":
        import pyarrow.parquet as pq

        inputs = pq.read_table(out).column("input").to_pylist()
    elif suffix == "csv":
        inputs = [row["input"] for row in csv.DictReader(io.StringIO(out.read_text(encoding="utf-8")))]
    elif suffix == "json":
        inputs = [r["input"] for r in json.loads(out.read_text(encoding="utf-8"))]
    else:
        inputs = [json.loads(line)["input"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert inputs == [str(folder / SHOWN), str(folder / "plain.jpg")]


def test_resume_and_the_table_agree_on_the_escaped_name(
    tiny_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _folder(tmp_path)
    out = tmp_path / "out.jsonl"
    assert _run(tiny_model, str(folder), "-o", str(out)) == 0
    first = out.read_text(encoding="utf-8")
    assert _run(tiny_model, str(folder), "-o", str(out), "--resume") == 0  # nothing left to do: no stop, no repeat
    assert out.read_text(encoding="utf-8") == first
    capsys.readouterr()
    assert _run(tiny_model, str(folder), "-f", "table") == 0
    assert SHOWN in capsys.readouterr().out


@pytest.mark.parametrize("by_reference", [False, True])
def test_jobs_submit_queues_the_escaped_name_and_the_worker_reads_the_file(
    tiny_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str], by_reference: bool
) -> None:
    from wanwu.jobs.base import open_queue

    folder = _folder(tmp_path)
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    assert main(["jobs", "submit", "--queue", url, *(["--by-reference"] if by_reference else []), str(folder)]) == 0
    job = capsys.readouterr().out.strip()
    queue = open_queue(url)
    try:
        js.work(queue, tiny_model, allow_roots=(folder,))
        records = list(queue.results(job))
    finally:
        queue.close()
    assert [(r.input, r.ok) for r in records] == [(str(folder / SHOWN), True), (str(folder / "plain.jpg"), True)]


# --- folder walks -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _as_nobody() -> Iterator[None]:
    """Run the block without root's right to read any folder (the test suite may run as root)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_every_image_named_entry_of_a_folder_gets_a_record(tiny_model: Model, tmp_path: Path) -> None:
    """A dangling link, a link loop, a FIFO, a link to a folder and an unreadable subfolder each get an error
    record saying what they are; the FIFO never blocks the walk or the read."""
    folder = tmp_path / "mixed"
    (folder / "locked").mkdir(parents=True)
    (folder / "locked" / "inside.jpg").write_bytes(image_bytes())
    (folder / "ok.jpg").write_bytes(image_bytes())
    (folder / "dangling.jpg").symlink_to("gone.jpg")
    (folder / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "dir.jpg").symlink_to("locked")
    (folder / "notes.txt").write_text("not an image name: skipped, as before")
    expected = {
        "dangling.jpg": "dangling symbolic link", "dir.jpg": "a link to a folder", "loop.jpg": "symbolic link loop",
        "pipe.jpg": "a named pipe (FIFO), not an image file", "locked": "cannot read folder: Permission denied",
    }
    with tempfile.TemporaryDirectory() as shared:  # a folder every user may reach, for the walk as nobody
        os.chmod(shared, 0o755)
        walked = Path(shared) / "mixed"
        os.rename(folder, walked)
        os.chmod(walked, 0o755)
        os.chmod(walked / "locked", 0o000)
        try:
            with _as_nobody():
                items = list(expand([str(walked)]))
        finally:
            os.chmod(walked / "locked", 0o755)
    by_name = {Path(i.input).name: i for i in items}
    assert sorted(by_name) == ["dangling.jpg", "dir.jpg", "locked", "loop.jpg", "ok.jpg", "pipe.jpg"]
    assert by_name["ok.jpg"].kind == "file"
    for name, message in expected.items():
        assert by_name[name].kind == "missing" and message in by_name[name].error, (name, by_name[name].error)


def test_an_unreadable_folder_is_an_error_record_not_an_empty_one(tiny_model: Model) -> None:
    with tempfile.TemporaryDirectory() as shared:
        os.chmod(shared, 0o755)
        locked = Path(shared) / "locked"
        locked.mkdir(mode=0o000)
        try:
            with _as_nobody():
                items = list(expand([str(locked)]))
        finally:
            locked.chmod(0o755)
    assert [(i.kind, i.error) for i in items] == [("missing", "cannot read folder: Permission denied")]


def test_a_fifo_named_like_a_photo_never_blocks_a_run(
    tiny_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "ok.jpg").write_bytes(image_bytes())
    out = tmp_path / "out.jsonl"
    assert _run(tiny_model, str(tmp_path), str(tmp_path / "pipe.jpg"), "-o", str(out)) == 3
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(Path(r["input"]).name, r["status"]) for r in records] == [
        ("ok.jpg", "ok"), ("pipe.jpg", "error"), ("pipe.jpg", "error")]
    assert "named pipe" in records[1]["error"]["message"] and "pipe" in records[2]["error"]["message"]


# --- outputs -----------------------------------------------------------------------------------------------------


def test_csv_quotes_line_breaks_and_neutralises_formulas_after_them(
    tiny_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    names = ["cr\r=1+1.jpg", "lf\n@SUM(1).jpg", "crlf\r\n-2.jpg"]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(js.colour(i))
    assert _run(tiny_model, "-f", "csv", "-o", "o.csv", "--", *names) == 0, capsys.readouterr().err
    raw = (tmp_path / "o.csv").read_bytes()
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"), newline="")))
    assert [r["input"] for r in rows] == ["cr\r'=1+1.jpg", "lf\n'@SUM(1).jpg", "crlf\r\n'-2.jpg"]
    assert all(r["status"] == "ok" for r in rows)
    physical = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    assert not any(line.startswith((b"=", b"+", b"-", b"@")) for line in physical)


def test_the_table_shows_terminal_escapes_in_names_escaped(
    tiny_model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    name = "\x1b]0;x\x07\u202e.jpg"  # sets the terminal's title; reverses what follows
    Path(name).write_bytes(image_bytes())
    assert _run(tiny_model, "-f", "table", name) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b]0;x\\x07\\u202e.jpg" in out


def test_paths_on_stdin_that_are_not_utf8_get_their_records(tiny_model: Model, tmp_path: Path) -> None:
    import subprocess
    import sys

    folder = _folder(tmp_path)
    out = tmp_path / "out.jsonl"
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONIOENCODING": "utf-8:strict"}  # as a UTF-8 locale reads it: the bytes are not UTF-8
    listing = os.fsencode(folder) + b"/" + RAW + b"\n" + os.fsencode(folder / "plain.jpg") + b"\n"
    proc = subprocess.run(
        [sys.executable, "-m", "wanwu", "recognize", "--model", str(tiny_model[0]), "--labels", str(tiny_model[1]),
         "--no-cache", "-j", "0", "-q", "-o", str(out), "-"], input=listing, capture_output=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["input"], r["status"]) for r in records] == [(str(folder / SHOWN), "ok"),
                                                            (str(folder / "plain.jpg"), "ok")]
