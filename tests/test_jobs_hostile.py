"""Jobs against careless and hostile callers (issues 20 and 21): an input that breaks the recognizer costs its
record, never a worker; ids other than those the queue issues name nothing; no message shows the queue's
password; folders, NUL bytes and lone surrogates are refused at the HTTP boundary; the upload budget refuses
clearly; a SQLite queue gives space back after ``jobs delete``; CSV results keep the English label columns."""

from __future__ import annotations

import csv
import io
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import jobs_support as js
from tests.redis_server import RedisServer
from wanwu.errors import QueueError, QueueStorageError
from wanwu.jobs.base import JobInput, JobSpec, UnknownJobError, open_queue, redact_url
from wanwu.jobs.worker import WorkerConfig, run_worker
from wanwu.records import Record

TinyModel = tuple[Path, Path]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), js.free_port(), durable=False, password="s3cr3t-pw")
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.extra("queue"))])
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url()


class _Poisoned:
    """A recognizer that raises (as a bug would) whenever one given input is among those it is asked for."""

    def __init__(self, inner: Any, poison: str) -> None:
        self.inner = inner
        self.poison = poison

    def recognize(self, inputs: Iterable[Any], options: Any = None) -> Iterator[Record]:
        items = list(inputs)
        if any(getattr(i, "input", None) == self.poison for i in items):
            raise RuntimeError("a bug met this input")
        return self.inner.recognize(items, options)  # type: ignore[no-any-return]


def test_an_input_that_breaks_the_run_costs_its_record_not_the_worker(queue_url: str, tiny_model: TinyModel,
                                                                      tmp_path: Path) -> None:
    """A path holding a NUL byte (ValueError in the worker before) and an input the recognizer raises on:
    each gets an error record, every other input of the same tasks its ok record, and the worker goes on."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.jpg").write_bytes(js.colour(1))
    queue = open_queue(queue_url)
    inputs = [JobInput("nul", "path", f"{allowed}/a\x00b.jpg"), JobInput("ok", "path", str(allowed / "ok.jpg")),
              *js.uploads(3)]
    job_id = queue.submit(JobSpec(inputs, task_size=2))
    with js.recognizer(tiny_model) as rec:
        config = WorkerConfig(allow_roots=(allowed,), exit_when_idle=True, poll_s=0.05)
        stats = run_worker(queue, _Poisoned(rec, "up-0001.jpg"), config)  # type: ignore[arg-type]
    records = {r.input: r for r in queue.results(job_id)}
    assert list(records) == ["nul", "ok", "up-0000.jpg", "up-0001.jpg", "up-0002.jpg"]
    assert records["nul"].error is not None and "NUL" in records["nul"].error.message
    assert records["up-0001.jpg"].error is not None and records["up-0001.jpg"].error.type == "internal"
    assert "a bug met this input" in records["up-0001.jpg"].error.message
    assert all(records[n].ok for n in ("ok", "up-0000.jpg", "up-0002.jpg"))
    assert stats.tasks == 3 and queue.status(job_id).state == "done"
    queue.close()


def test_only_ids_the_queue_issues_name_a_job(queue_url: str) -> None:
    """``ID:results`` or ``ID:blobs`` are other keys of a Redis queue: they must reach nothing."""
    queue = open_queue(queue_url)
    job_id = queue.submit(JobSpec(js.uploads(2)))
    for bad in (f"{job_id}:results", f"{job_id}:blobs", "x", "", "../jobs", job_id.upper(), f"{job_id} "):
        for call in (queue.status, queue.cancel, queue.delete, queue.activity, lambda i: list(queue.results(i))):
            with pytest.raises(UnknownJobError):
                call(bad)
    status = queue.status(job_id)
    assert (status.state, status.total) == ("queued", 2)
    queue.close()


@pytest.mark.extra("queue")
def test_no_message_or_log_line_shows_the_queue_password(redis_server: RedisServer, tiny_model: TinyModel) -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://***@h:1/0"
    assert redact_url("redis://user:pw@h:1/0?prefix=a") == "redis://user:***@h:1/0?prefix=a"
    assert redact_url("rediss://pw@h/0") == "rediss://***@h/0" and redact_url("sqlite:///a/b") == "sqlite:///a/b"
    with pytest.raises(QueueError) as unreachable:
        open_queue(f"redis://:s3cr3t-pw@127.0.0.1:{js.free_port()}/0")
    assert "s3cr3t-pw" not in str(unreachable.value) and "***" in str(unreachable.value)
    url = redis_server.url()
    assert "s3cr3t-pw" in url and "s3cr3t-pw" not in open_queue(url).url
    worker = js.worker_process(url, tiny_model, "--max-tasks", "0")
    assert worker.wait(timeout=120) == 0
    log = js.stop(worker)
    assert "model" in log and "***@127.0.0.1" in log and "s3cr3t-pw" not in log, log


@pytest.mark.extra("server")
def test_http_refuses_folders_nul_bytes_surrogates_and_foreign_ids(tmp_path: Path) -> None:
    from fastapi import FastAPI

    from wanwu.jobs.http import router
    from wanwu.service.contract import ApiError

    queue_url = f"sqlite:///{tmp_path / 'q.sqlite3'}?max_upload_mb=0.01"
    app = FastAPI()
    app.add_exception_handler(ApiError, lambda request, e: e.response())  # type: ignore[arg-type, attr-defined]
    app.include_router(router(queue_url))
    (tmp_path / "photos").mkdir()
    with js.serve(app) as client:
        r = client.post("/v1/jobs", json={"inputs": [str(tmp_path / "photos")]})
        assert r.status_code == 400 and "wanwu jobs submit" in r.text, r.text
        r = client.post("/v1/jobs", json={"inputs": ["/allowed/a\u0000b.jpg"]})
        assert r.status_code == 400 and "NUL" in r.text and r.headers["content-type"] == "application/json"
        r = client.post("/v1/jobs", content=b'{"inputs": ["/a\\ud800.jpg"]}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.text, r.text
        job = client.post("/v1/jobs", json={"inputs": ["/a.jpg"]}).json()["id"]
        for path in (f"/v1/jobs/{job}:results", f"/v1/jobs/{job}:blobs"):
            assert client.get(path).status_code == 404
            assert client.delete(path).status_code == 404
        assert client.get(f"/v1/jobs/{job}").json()["state"] == "queued"
        files = [("files", (f"u{i}.jpg", os.urandom(6000), "image/jpeg")) for i in range(3)]
        r = client.post("/v1/jobs", files=files)
        assert r.status_code == 507 and "budget" in r.text, r.text


def test_the_upload_budget_refuses_clearly_and_frees_with_the_job(queue_url: str, tiny_model: TinyModel) -> None:
    url = js.add_query(queue_url, max_upload_mb="0.02")  # about 20 KB held at once
    queue = open_queue(url)
    first = queue.submit(JobSpec([JobInput.upload(f"{i}.jpg", js.colour(i) + os.urandom(4000)) for i in range(3)]))
    with pytest.raises(QueueStorageError, match="max_upload_mb"):
        queue.submit(JobSpec([JobInput.upload(f"{i}.jpg", os.urandom(5000)) for i in range(3)]))
    js.work(queue, tiny_model)  # the first job finishes: its uploads are given back
    assert queue.status(first).state == "done"
    queue.submit(JobSpec([JobInput.upload(f"{i}.jpg", os.urandom(5000)) for i in range(3)]))
    queue.close()


def test_jobs_delete_gives_sqlite_space_back(tmp_path: Path) -> None:
    from wanwu.cli.main import main

    path = tmp_path / "jobs.sqlite3"
    legacy = tmp_path / "old.sqlite3"  # a queue file made before incremental vacuum
    sqlite3.connect(legacy).close()
    for file in (path, legacy):
        url = f"sqlite:///{file}"
        queue = open_queue(url)
        job_id = queue.submit(JobSpec([JobInput.upload(f"{i}.jpg", os.urandom(20_000)) for i in range(200)]))
        queue.close()
        full = file.stat().st_size + _wal(file)
        assert full > 3_000_000
        assert main(["jobs", "delete", "--queue", url, job_id]) == 0
        assert file.stat().st_size + _wal(file) < full / 4, (file, full, file.stat().st_size, _wal(file))


def _wal(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_jobs_results_csv_keeps_the_english_label_columns(tmp_path: Path, tiny_model: TinyModel,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from wanwu.cli.main import main

    labels = tmp_path / "labels.tsv"
    names = [line for line in tiny_model[1].read_text(encoding="utf-8").splitlines() if line]
    labels.write_text("en\tzh\n" + "".join(f"class {i}\t{n}\n" for i, n in enumerate(names)), encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    queue = open_queue(url)
    job_id = queue.submit(JobSpec(js.uploads(3)))
    js.work(queue, (tiny_model[0], labels))
    queue.close()
    assert main(["jobs", "results", "--queue", url, "-f", "csv", job_id]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3 and rows[0]["label_en_1"].startswith("class ") and rows[0]["label_1"] in names


@pytest.mark.extra("queue")
def test_jobs_wait_rides_out_an_outage_and_says_when_it_persists(tmp_path: Path, tiny_model: TinyModel,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Redis down under ``jobs wait``: within --retry it waits on and exits 0 once the job is done; past it,
    exit 75 (a transient failure), never 1 (which means the job was cancelled)."""
    from wanwu.cli.main import main

    server = RedisServer(tmp_path, js.free_port(), durable=True)
    server.start()
    try:
        url = server.url()
        queue = open_queue(url)
        job_id = queue.submit(JobSpec(js.uploads(4)))
        server.stop()
        assert main(["jobs", "wait", "--queue", url, job_id, "--retry", "2", "--interval", "0.2"]) == 75
        assert "stayed unreachable for 2 s" in capsys.readouterr().err
        codes: list[int] = []
        waiter = threading.Thread(target=lambda: codes.append(
            main(["jobs", "wait", "--queue", url, job_id, "--retry", "300", "--interval", "0.2", "-q"])))
        waiter.start()
        server.start()
        js.work(queue, tiny_model)
        waiter.join(120)
        assert codes == [0]
        queue.close()
    finally:
        server.stop()
