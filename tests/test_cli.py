"""The ``wanwu recognize`` command end to end: formats, exit codes, Ctrl-C."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import image_bytes
from wanwu.cli.main import main


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for i, c in enumerate([(230, 20, 20), (20, 230, 20), (20, 20, 230)]):
        (d / f"{i}.jpg").write_bytes(image_bytes(c))
    return d


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _model_args(model: tuple[Path, Path]) -> list[str]:
    return ["--model", str(model[0]), "--labels", str(model[1]), "--no-cache", "-j", "0"]


def test_jsonl_all_ok_exit_0(tiny_model: tuple[Path, Path], folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["recognize", str(folder), *_model_args(tiny_model), "-k", "3"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["input"]).name for r in rows] == ["0.jpg", "1.jpg", "2.jpg"]
    assert all(r["status"] == "ok" and len(r["predictions"]) == 3 for r in rows)
    assert set(rows[0]) == {"input", "status", "predictions", "sha256", "width", "height"}
    assert "3 input(s): 3 ok" in err


def test_dash_output_is_stdout(tiny_model: tuple[Path, Path], folder: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["recognize", str(folder), *_model_args(tiny_model), "-o", "-"], capsys)
    assert code == 0, err
    assert [Path(json.loads(line)["input"]).name for line in out.splitlines()] == ["0.jpg", "1.jpg", "2.jpg"]
    assert not (tmp_path / "-").exists()


def test_recognize_defaults_to_one_blas_thread(tiny_model: tuple[Path, Path], folder: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy's BLAS does nothing in a recognize run worth a thread per core; a user's own setting stands."""
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert _run(["recognize", str(folder / "0.jpg"), *_model_args(tiny_model), "-q"], capsys)[0] == 0
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert _run(["recognize", str(folder / "0.jpg"), *_model_args(tiny_model), "-q"], capsys)[0] == 0
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"


def test_some_failed_exit_3(tiny_model: tuple[Path, Path], folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["recognize", str(folder / "0.jpg"), str(folder / "nope.jpg"), *_model_args(tiny_model),
                         "-q"], capsys)
    assert code == 3
    bad = json.loads(out.splitlines()[1])
    assert bad == {"input": str(folder / "nope.jpg"), "status": "error",
                   "error": {"type": "not_found", "message": "no such file"}}


def test_formats(tiny_model: tuple[Path, Path], folder: Path, tmp_path: Path,
                 capsys: pytest.CaptureFixture[str]) -> None:
    base = ["recognize", str(folder), *_model_args(tiny_model), "-q", "-k", "2"]
    assert _run([*base, "-f", "json", "-o", str(tmp_path / "o.json")], capsys)[0] == 0
    assert len(json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))) == 3
    assert _run([*base, "-f", "csv", "--bom", "-o", str(tmp_path / "o.csv")], capsys)[0] == 0
    raw = (tmp_path / "o.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"))))
    assert len(rows) == 3 and rows[0]["label_1"] and rows[0]["score_2"] and "label_3" not in rows[0]
    code, out, _ = _run([*base, "-f", "table"], capsys)
    assert code == 0 and out.count("✓") == 3


def test_score_logit_and_threshold(tiny_model: tuple[Path, Path], folder: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _run(["recognize", str(folder / "0.jpg"), *_model_args(tiny_model), "-q", "--score", "logit"],
                     capsys)
    logits = [p["score"] for p in json.loads(out)["predictions"]]
    assert logits == sorted(logits, reverse=True) and max(logits) > 1.0  # raw logits, not probabilities
    _, out, _ = _run(["recognize", str(folder / "0.jpg"), *_model_args(tiny_model), "-q", "--threshold", "0.5"],
                     capsys)
    assert all(p["score"] >= 0.5 for p in json.loads(out)["predictions"])


def test_usage_errors_exit_2(tiny_model: tuple[Path, Path], folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["recognize", str(folder), *_model_args(tiny_model), "-k", "0"], capsys)[0] == 2
    assert _run(["recognize", str(folder), "--model", str(tiny_model[0])], capsys)[0] == 2  # no labels
    assert _run(["recognize", str(folder), *_model_args(tiny_model), "-f", "xml"], capsys)[0] == 2
    assert _run(["recognize"], capsys)[0] == 2
    missing = str(folder / "no-such-labels.txt")
    code, _, err = _run(["recognize", str(folder), "--model", str(tiny_model[0]), "--labels", missing], capsys)
    assert code == 2 and "no-such-labels.txt" in err  # a label file that is not there: a usage error


def test_stdin_list(tiny_model: tuple[Path, Path], folder: Path) -> None:
    listing = f"{folder / '1.jpg'}\n{folder / '2.jpg'}\n"
    proc = subprocess.run(
        [sys.executable, "-m", "wanwu", "recognize", "-", *_model_args(tiny_model), "-q"],
        input=listing, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["input"] for x in proc.stdout.splitlines()] == listing.split()


@pytest.mark.shared
def test_ctrl_c_flushes_and_exits_130(tiny_model: tuple[Path, Path], tmp_path: Path, photos: Path) -> None:
    """1,000 distinct real photos, so Ctrl-C lands while files are being decoded (copies of one file would be
    answered by in-run dedupe without decoding)."""
    out = tmp_path / "out.jsonl"
    listing = [str(p) for p in sorted(photos.iterdir())]
    stdin = "\n".join(listing) + "\n"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wanwu", "recognize", "-", *_model_args(tiny_model)[:-2], "--no-cache", "-j", "1",
         "-o", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(stdin)
    proc.stdin.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 2000):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    said = proc.stderr.read() if proc.stderr else ""
    assert code == 130, said
    # one line says how far it got; no second, bare "interrupted" after it
    assert len([line for line in said.splitlines() if "interrupted" in line]) == 1, said
    lines = out.read_text(encoding="utf-8").splitlines()
    assert 0 < len(lines) < len(listing)
    records = [json.loads(line) for line in lines]  # whole lines only
    assert all(r["status"] == "ok" for r in records)
    seen = [r["input"] for r in records]
    assert len(set(seen)) == len(seen) and set(seen) <= set(listing)  # each at most once (finished ones flushed)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


def test_help_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    from wanwu.cli.main import cli

    for name in cli.commands:
        assert main([name, "--help"]) == 0
        assert "Usage" in capsys.readouterr().out
    assert os.environ.get("WANWU_OFFLINE") == "1"
