"""CSV output is safe to open in a spreadsheet: client-chosen names never run as formulas (OWASP rule)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from tests import jobs_support as js
from wanwu.cli.main import main
from wanwu.sinks import csv_cell

HOSTILE = ["=SUM(1,2)*cmd.jpg", "+1+2.jpg", "-3.jpg", "@SUM(1).jpg"]


def test_csv_cell_rule() -> None:
    assert [csv_cell(v) for v in ["=1", "+1", "-1", "@a", "\t=1", "\r=1"]] == [
        "'=1", "'+1", "'-1", "'@a", "'\t=1", "'\r'=1"]
    assert [csv_cell(v) for v in ["cat.jpg", "猫", "", -1.5, 3]] == ["cat.jpg", "猫", "", -1.5, 3]


def test_cli_csv_relative_names(tiny_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(HOSTILE):
        (tmp_path / name).write_bytes(js.colour(i))
    assert main(["recognize", "--model", str(tiny_model[0]), "--labels", str(tiny_model[1]), "--no-cache",
                 "-j", "0", "-q", "-f", "csv", "--score", "logit", "-o", "o.csv", "--", *HOSTILE]) == 0, \
        capsys.readouterr().err
    rows = list(csv.DictReader(io.StringIO((tmp_path / "o.csv").read_text(encoding="utf-8"))))
    assert [r["input"] for r in rows] == ["'" + n for n in HOSTILE]
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.extra("server")
def test_jobs_results_csv_neutralises_upload_names(tmp_path: Path, tiny_model: tuple[Path, Path]) -> None:
    from fastapi import FastAPI

    from wanwu.jobs.base import open_queue
    from wanwu.jobs.http import router

    queue_url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    app = FastAPI()
    app.include_router(router(queue_url))
    with js.serve(app) as client:
        files = [("files", (name, js.colour(i), "image/jpeg")) for i, name in enumerate(HOSTILE)]
        job = client.post("/v1/jobs", files=files).json()["id"]
        queue = open_queue(queue_url)
        js.work(queue, tiny_model)
        queue.close()
        text = client.get(f"/v1/jobs/{job}/results", params={"format": "csv"}).text
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["input"] for r in rows] == ["'" + n for n in HOSTILE]
