"""Parquet output: nested predictions, row groups, an unknown suffix refused, --resume after a kill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import wanwu
from wanwu import parquet
from wanwu.cli.main import main
from wanwu.parquet import ParquetSink, parts_dir
from wanwu.records import Record
from wanwu.sinks import SinkOptions


def _photos(photos: Path, n: int) -> list[str]:
    return [str(p) for p in sorted(photos.glob("*.JPEG"))[:n]]


def _run(mobilenet: tuple[Path, Path], *args: str) -> int:
    return main(["recognize", *args, "--model", str(mobilenet[0]), "--labels", str(mobilenet[1]), "-q",
                 "--no-cache"])


def test_parquet_matches_jsonl_with_nested_predictions(
    tmp_path: Path, mobilenet: tuple[Path, Path], photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parquet, "ROW_GROUP_SIZE", 4)
    inputs = [*_photos(photos, 10), str(tmp_path / "missing.jpg")]
    assert _run(mobilenet, *inputs, "-o", str(tmp_path / "ref.jsonl")) == 3
    assert _run(mobilenet, *inputs, "-o", str(tmp_path / "out.parquet")) == 3
    ref = [Record.from_dict(json.loads(line)) for line in (tmp_path / "ref.jsonl").read_text().splitlines()]
    pf = pq.ParquetFile(tmp_path / "out.parquet")
    assert pf.metadata.num_row_groups == 3  # 11 records in groups of 4
    assert str(pf.schema_arrow.field("predictions").type) == (
        "list<element: struct<index: int32, label: string, score: double>>"
    )
    rows = pf.read().to_pylist()
    assert [r["input"] for r in rows] == [r.input for r in ref]
    for row, rec in zip(rows, ref, strict=True):
        assert row["status"] == rec.status
        assert row["predictions"] == [p.to_dict() for p in rec.predictions]
        assert (row["sha256"], row["width"], row["height"]) == (rec.sha256, rec.width, rec.height)
    assert rows[-1]["error_type"] == "not_found" and rows[-1]["predictions"] == []
    assert not parts_dir(tmp_path / "out.parquet").exists()


def test_unknown_suffix_is_a_usage_error(tmp_path: Path, mobilenet: tuple[Path, Path], photos: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(mobilenet, *_photos(photos, 1), "-o", str(tmp_path / "out.txt")) == 2
    err = capsys.readouterr().err
    assert "out.txt" in err and ".parquet" in err and ".jsonl" in err
    assert not (tmp_path / "out.txt").exists()


def test_parquet_to_stdout_is_refused(mobilenet: tuple[Path, Path], photos: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(mobilenet, *_photos(photos, 1), "-f", "parquet") == 2
    assert "--output" in capsys.readouterr().err


def test_resume_after_killed_writer_and_after_finished_run(
    tmp_path: Path, mobilenet: tuple[Path, Path], photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parquet, "ROW_GROUP_SIZE", 3)
    inputs = _photos(photos, 12)
    ref = tmp_path / "ref.jsonl"
    assert _run(mobilenet, *inputs, "-o", str(ref)) == 0
    expected = [json.loads(line) for line in ref.read_text().splitlines()]

    # A writer killed mid-run: 7 records written, never closed -> 2 finished parts, 1 record lost in memory,
    # plus a part torn in the middle of its write.
    out = tmp_path / "out.parquet"
    out.touch()  # the CLI opens (creates) the output before writing
    with out.open("a") as stream:
        sink = ParquetSink(stream, SinkOptions())
        for data in expected[:7]:
            sink.write(Record.from_dict(data))
    (parts_dir(out) / ".00000003.parquet.123.tmp").write_bytes(b"PAR1 torn")
    assert len(list(parts_dir(out).glob("*.parquet"))) == 2

    assert _run(mobilenet, *inputs[:8], "-o", str(out), "--resume") == 0  # 6 kept, 2 done now
    assert [r["input"] for r in pq.read_table(out).to_pylist()] == inputs[:8]
    assert not parts_dir(out).exists()

    assert _run(mobilenet, *inputs, "-o", str(out), "--resume") == 0  # a finished file continued
    rows = pq.read_table(out).to_pylist()
    assert [r["input"] for r in rows] == inputs
    assert [r["predictions"] for r in rows] == [e["predictions"] for e in expected]


def test_retry_errors_redoes_error_rows(tmp_path: Path, mobilenet: tuple[Path, Path], photos: Path) -> None:
    good = _photos(photos, 3)
    late = tmp_path / "late.jpg"
    out = tmp_path / "out.parquet"
    assert _run(mobilenet, *good, str(late), "-o", str(out)) == 3
    late.write_bytes(Path(good[0]).read_bytes())
    assert _run(mobilenet, *good, str(late), "-o", str(out), "--retry-errors") == 0
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["input"] for r in rows) == sorted([*good, str(late)])
    assert all(r["status"] == "ok" for r in rows)


def test_resume_refuses_a_foreign_file(tmp_path: Path, mobilenet: tuple[Path, Path], photos: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.parquet"
    out.write_text("not parquet")
    assert _run(mobilenet, *_photos(photos, 1), "-o", str(out), "--resume") == 2
    assert "refusing to resume" in capsys.readouterr().err
    assert out.read_text() == "not parquet"


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path: Path, mobilenet: tuple[Path, Path], photos: Path) -> None:
    """A real process killed with SIGKILL mid-run; --resume ends with one row per input, as a clean run."""
    inputs = _photos(photos, 120)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in inputs))
    code = ("import sys; from wanwu import parquet; parquet.ROW_GROUP_SIZE = 8; "
            "from wanwu.cli.main import main; sys.exit(main())")
    args = ["recognize", "-", "--model", str(mobilenet[0]), "--labels", str(mobilenet[1]), "-q", "--no-cache",
            "-j", "1", "-b", "4"]
    env = {**os.environ, "PYTHONPATH": str(Path(wanwu.__file__).resolve().parents[1])}
    out = tmp_path / "out.parquet"
    with listing.open() as stdin:
        proc = subprocess.Popen([sys.executable, "-c", code, *args, "-o", str(out)], stdin=stdin, env=env,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while len(list(parts_dir(out).glob("*.parquet"))) < 3 and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL  # it really was killed mid-run
    assert not out.exists() or out.stat().st_size == 0
    with listing.open() as stdin:
        assert subprocess.run([sys.executable, "-c", code, *args, "-o", str(out), "--resume"], stdin=stdin,
                              env=env, timeout=300).returncode == 0
    ref = tmp_path / "ref.jsonl"
    assert _run(mobilenet, *inputs, "-o", str(ref)) == 0
    expected = {r["input"]: r["predictions"] for r in map(json.loads, ref.read_text().splitlines())}
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["input"] for r in rows) == sorted(inputs)
    assert all(r["predictions"] == expected[r["input"]] for r in rows)
