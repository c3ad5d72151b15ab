"""Helpers for the job-queue tests: an image server with a URL that hangs on demand, worker processes,
and the scenarios both queue backends must pass (imported by test_jobs.py and test_jobs_redis.py)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

import wanwu
from tests.helpers import image_bytes, wait_for
from wanwu.config import RecognizeOptions
from wanwu.errors import QueueError
from wanwu.jobs.base import JobInput, JobQueue, JobSpec, Task, UnknownJobError, open_queue
from wanwu.jobs.worker import WorkerConfig, WorkerStats, run_worker
from wanwu.pipeline import Recognizer
from wanwu.records import RecordOptions

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (20, 20, 20), (240, 240, 240), (230, 220, 40),
          (40, 220, 220), (220, 40, 220), (128, 128, 128), (250, 140, 20)]


def colour(i: int) -> bytes:
    return image_bytes(COLORS[i % len(COLORS)], size=(48 + i % 7, 40))


class ImageServer:
    """Serves /img/N.jpg; /slow.jpg hangs until :meth:`release` (``slow_hit`` is set when it is asked)."""

    def __init__(self) -> None:
        self.slow_hit = threading.Event()
        self._released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/slow.jpg":
                    server.slow_hit.set()
                    server._released.wait(60)
                    body = colour(3)
                elif self.path.startswith("/img/"):
                    body = colour(int(self.path.split("/")[-1].split(".")[0]))
                else:
                    self.send_error(404)
                    return
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the worker that asked was killed

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    try:
        yield server
    finally:
        server.close()


@contextmanager
def serve(app: object) -> Iterator[httpx.Client]:
    """Run an ASGI app with uvicorn on a free local port; yield an httpx client for it."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="off")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the test HTTP service")
        with httpx.Client(base_url=f"http://127.0.0.1:{config.port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def recognizer(tiny_model: tuple[Path, Path]) -> Recognizer:
    model, labels = tiny_model
    options = RecognizeOptions(decoders=0, cache=False, batch_size=8, allow_private_urls=True)  # the local server
    return Recognizer(str(model), labels=labels, options=options)


def work(queue: JobQueue, tiny_model: tuple[Path, Path], **config: object) -> WorkerStats:
    """An in-process worker that stops when the queue is empty."""
    settings: dict[str, object] = {"exit_when_idle": True, "poll_s": 0.05, **config}
    with recognizer(tiny_model) as rec:
        return run_worker(queue, rec, WorkerConfig(**settings))  # type: ignore[arg-type]


def uploads(n: int, offset: int = 0) -> list[JobInput]:
    return [JobInput.upload(f"up-{i:04d}.jpg", colour(i)) for i in range(offset, offset + n)]


def worker_process(queue_url: str, tiny_model: tuple[Path, Path], *extra: str,
                   log: Path | None = None) -> subprocess.Popen[bytes]:
    """``wanwu worker`` in its own process, as an operator would start it. ``log``: its stderr goes to that
    file (readable while it runs) instead of a pipe."""
    model, labels = tiny_model
    env = {**os.environ, "PYTHONPATH": str(Path(wanwu.__file__).resolve().parents[1])}
    cmd = [sys.executable, "-c", "from wanwu.cli.main import run; run()", "worker", "--queue", queue_url,
           "--model", str(model), "--labels", str(labels), "-j", "0", "--threads", "1", "--no-cache",
           "--batch-size", "4", "--tasks-per-claim", "4", "--poll", "0.2", "--allow-private-urls", *extra]
    if log is None:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with log.open("wb") as stderr:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def add_query(url: str, **params: str) -> str:
    return url + ("&" if "?" in url else "?") + "&".join(f"{k}={v}" for k, v in params.items())


def claim_once_lapsed(queue: JobQueue, worker: str, n: int) -> list[Task]:
    """Claim (leasing for a minute) until a task whose lease lapsed comes back: a lease's end is waited for as
    a condition, not slept out."""
    tasks: list[Task] = []

    def claimed() -> bool:
        tasks.extend(queue.claim(worker, n, 60.0))
        return bool(tasks)

    wait_for(claimed, 60, "a lease to lapse")
    return tasks


def stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate(timeout=30)
    return err.decode(errors="replace") if err is not None else ""  # None: its stderr went to a log file


def assert_exactly_once(queue: JobQueue, job_id: str, names: list[str]) -> None:
    records = list(queue.results(job_id))
    assert [r.input for r in records] == names, "every input exactly once, in input order"
    status = queue.status(job_id)
    assert status.total == len(names) == status.done + status.failed
    assert status.state == "done"


# --- scenarios every backend must pass ----------------------------------------------------------------------


def scenario_worker_killed_mid_job(queue_url: str, tiny_model: tuple[Path, Path]) -> None:
    """Worker A claims tasks, hangs on one input and is SIGKILLed holding them; worker B, already running,
    takes them over when the lease runs out; the job ends with every input recorded exactly once."""
    queue = open_queue(queue_url)
    with image_server() as server:
        inputs = [*uploads(10), JobInput.url(f"{server.url}/slow.jpg"), *uploads(29, 10),
                  *[JobInput.url(f"{server.url}/img/{i}.jpg") for i in range(10)]]
        names = [i.name for i in inputs]
        job_id = queue.submit(JobSpec(inputs, RecordOptions(top_k=2), task_size=4))
        # A's lease outlasts a stall of its heartbeat (every third of the lease) of more than 3 s on a loaded
        # machine; at 2 s, a 1.3 s stall would have let B take A's tasks before the check below.
        a = worker_process(queue_url, tiny_model, "--lease", "5")
        b = None
        try:
            wait_for(server.slow_hit.is_set, 60, "worker A to reach the hanging input")
            b = worker_process(queue_url, tiny_model, "--lease", "2", "--exit-when-idle")
            # A holds tasks 2 and 3 (inputs 8-15); B finishes everything else, then waits for the lease.
            wait_for(lambda: queue.status(job_id).finished >= len(inputs) - 8, 60, "worker B")
            time.sleep(0.5)
            before = queue.status(job_id)
            assert before.finished == len(inputs) - 8 and before.state == "running"
            a.send_signal(signal.SIGKILL)
            a.wait(timeout=10)
            server.release()
            assert b.wait(timeout=90) == 0, stop(b)
        finally:
            stop(a)
            if b is not None:
                stop(b)
    assert_exactly_once(queue, job_id, names)
    records = list(queue.results(job_id))
    assert all(r.ok for r in records), [r.to_dict() for r in records if not r.ok]
    assert all(len(r.predictions) == 2 for r in records)
    assert queue.outstanding() == 0
    queue.close()


def scenario_pending_jobs_survive_restarts(queue_url: str, tiny_model: tuple[Path, Path],
                                           restart_store: Callable[[], None] | None = None) -> None:
    """Submit through the HTTP API, drop that service; a worker does part and stops; a new service still
    sees the job; a new worker finishes it."""
    from fastapi import FastAPI

    from wanwu.jobs.http import router

    @contextmanager
    def service() -> Iterator[httpx.Client]:
        with closing(open_queue(queue_url)) as queue:
            app = FastAPI()
            app.include_router(router(queue))
            with serve(app) as client:
                yield client

    with service() as client:
        files = [("files", (f"f{i}.jpg", colour(i), "image/jpeg")) for i in range(12)]
        response = client.post("/v1/jobs", files=files, data={"top_k": "3", "task_size": "4"})
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        assert response.json()["state"] == "queued" and response.json()["total"] == 12

    if restart_store is not None:
        restart_store()
    first = worker_process(queue_url, tiny_model, "--max-tasks", "1")
    assert first.wait(timeout=60) == 0, stop(first)
    stop(first)

    with service() as client:
        status = client.get(f"/v1/jobs/{job_id}").json()
        assert status["state"] == "running" and status["succeeded"] == 4 and status["pending"] == 8
        second = worker_process(queue_url, tiny_model, "--exit-when-idle")
        assert second.wait(timeout=60) == 0, stop(second)
        stop(second)
        status = client.get(f"/v1/jobs/{job_id}").json()
        assert status["state"] == "done" and status["succeeded"] == 12 and status["rate_per_s"] > 0
        lines = client.get(f"/v1/jobs/{job_id}/results").text.splitlines()
        assert [json.loads(line)["input"] for line in lines] == [f"f{i}.jpg" for i in range(12)]
        assert all(len(json.loads(line)["predictions"]) == 3 for line in lines)


def scenario_cancel(queue_url: str, tiny_model: tuple[Path, Path]) -> None:
    queue = open_queue(queue_url)
    job_id = queue.submit(JobSpec(uploads(20), task_size=2))
    work(queue, tiny_model, max_tasks=1, tasks_per_claim=1)
    assert queue.status(job_id).state == "running"
    status = queue.cancel(job_id)
    assert status.state == "cancelled" and status.done == 2
    stats = work(queue, tiny_model)
    assert stats.tasks == 0 and queue.outstanding() == 0
    status = queue.status(job_id)
    assert (status.state, status.done, status.failed, status.total) == ("cancelled", 2, 0, 20)
    assert [r.input for r in queue.results(job_id)] == ["up-0000.jpg", "up-0001.jpg"]
    assert queue.cancel(job_id).state == "cancelled"  # cancelling twice is harmless
    queue.close()


# A lease that a test checks is still held: far longer than a call takes on a loaded 2-core machine, so that the
# check is never a race against the clock (a lapse is then waited for as a condition, not slept out).
LEASE_S = 3.0


def scenario_redelivery_is_idempotent(queue_url: str) -> None:
    """A task whose lease ran out is delivered again; both deliveries finishing leaves one record each."""
    from wanwu.records import Record

    queue = open_queue(queue_url)
    job_id = queue.submit(JobSpec(uploads(3), task_size=3))
    (first,) = queue.claim("w1", 4, lease_s=LEASE_S)
    assert queue.claim("w2", 4, lease_s=LEASE_S) == []  # leased
    (again,) = claim_once_lapsed(queue, "w2", 4)
    assert again.attempt == 2 and [i.name for i in again.inputs] == [i.name for i in first.inputs]
    queue.complete(again, [(i, Record.failure(x.name, "internal", "second")) for i, x in again.indexed()])
    queue.complete(first, [(i, Record.failure(x.name, "decode_error", "first")) for i, x in first.indexed()])
    status = queue.status(job_id)
    assert (status.state, status.failed, status.done) == ("done", 3, 0)
    assert {r.error.message for r in queue.results(job_id) if r.error} == {"second"}
    assert queue.outstanding() == 0
    queue.close()


def scenario_poison_task_is_abandoned(queue_url: str) -> None:
    """A task whose every worker dies is given up after ``attempts`` deliveries: internal error records."""
    queue = open_queue(add_query(queue_url, attempts="2"))
    job_id = queue.submit(JobSpec(uploads(2), task_size=2))
    for _ in range(2):
        assert len(queue.claim("w", 1, lease_s=0.05)) == 1
        time.sleep(0.15)
    assert queue.claim("w", 1, lease_s=0.05) == []
    status = queue.status(job_id)
    assert (status.state, status.failed, status.abandoned) == ("failed", 2, 1)
    record = next(iter(queue.results(job_id)))
    assert record.error is not None and record.error.type == "internal"
    assert "2 deliveries" in record.error.message
    queue.close()


def scenario_delete(queue_url: str, tiny_model: tuple[Path, Path]) -> None:
    """A deleted job leaves nothing behind, even mid-run; its neighbours are untouched."""
    queue = open_queue(queue_url)
    running = queue.submit(JobSpec(uploads(12), task_size=2))
    finished = queue.submit(JobSpec(uploads(4), task_size=2))
    kept = queue.submit(JobSpec(uploads(6, offset=50), task_size=2))
    work(queue, tiny_model, max_tasks=1, tasks_per_claim=1)  # one task of `running` done, five left
    assert queue.status(running).state == "running"
    queue.delete(running)
    stats = work(queue, tiny_model)
    assert stats.records == 4 + 6  # nothing more of the deleted job was recognized
    assert queue.status(finished).state == "done"
    queue.delete(finished)
    for gone in (running, finished):
        with pytest.raises(UnknownJobError):
            queue.status(gone)
        with pytest.raises(UnknownJobError):
            list(queue.results(gone))
        with pytest.raises(UnknownJobError):
            queue.delete(gone)
    assert [s.id for s in queue.jobs()] == [kept] and queue.outstanding() == 0
    assert [r.input for r in queue.results(kept)] == [f"up-{i:04d}.jpg" for i in range(50, 56)]
    queue.close()


def scenario_follow_a_job(queue_url: str, tiny_model: tuple[Path, Path], folder: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """What a person following a job sees: the status fields, a lapsed lease named as such, ``jobs wait``
    blocking until the workers finish and exiting 3 for a failed input, and the worker's progress log."""
    from wanwu.cli.main import main

    url = add_query(queue_url, lease="1")
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.jpg").write_bytes(colour(i))
    (folder / "2.jpg").write_bytes(b"not an image at all")
    assert main(["jobs", "submit", "--queue", url, "--task-size", "1", str(folder)]) == 0
    job_id = capsys.readouterr().out.strip()

    def status() -> tuple[dict[str, object], str]:
        assert main(["jobs", "status", "--queue", url, job_id]) == 0
        out, err = capsys.readouterr()
        return json.loads(out), err

    queue = open_queue(url)
    assert len(queue.claim("w-silent", 1, LEASE_S)) == 1
    fields, err = status()
    assert (fields["state"], fields["total"], fields["succeeded"], fields["failed"], fields["pending"]) == \
        ("running", 3, 0, 0, 3)
    assert (fields["workers"], fields["tasks_leased"], fields["tasks_lapsed"]) == (["w-silent"], 1, 0)
    assert err == ""
    wait_for(lambda: not status()[0]["tasks_leased"], 60, "w-silent's lease to lapse")  # it never extends it
    fields, err = status()
    assert (fields["workers_active"], fields["tasks_lapsed"]) == (0, 1)
    assert "1 task(s) wait for a lapsed lease" in err
    queue.close()

    worker = worker_process(url, tiny_model, "--exit-when-idle", "--log-every", "0")
    try:
        assert main(["jobs", "wait", "--queue", url, job_id, "--interval", "0.2"]) == 3
        assert f"job {job_id}: done: 2 ok, 1 failed of 3" in capsys.readouterr().err
        assert worker.wait(timeout=60) == 0
    finally:
        log = stop(worker)
    assert re.search(r"worker \S+: 3 task\(s\), 3 record\(s\) \(1 failed\)", log), log  # no -v needed
    fields, err = status()
    assert (fields["state"], fields["succeeded"], fields["failed"], fields["pending"]) == ("done", 2, 1, 0)
    assert fields["rate_per_s"] > 0 and fields["eta_s"] is None and err == ""


def scenario_killed_submit_is_reaped(queue_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A submitter that stops half-way (killed) leaves an unsealed job; once it is stale, the next claim
    cancels it and frees its uploads, instead of leaving it "running" for ever."""
    import importlib

    backend = importlib.import_module(f"wanwu.jobs.{'redis' if queue_url.startswith('redis') else 'sqlite'}")
    monkeypatch.setattr(backend, "COMMIT_EVERY_TASKS", 1, raising=False)  # sqlite: commit every task
    monkeypatch.setattr(backend, "PIPELINE_TASKS", 1, raising=False)  # redis: the same
    queue = open_queue(queue_url)
    stopped, release = threading.Event(), threading.Event()

    def inputs() -> Iterator[JobInput]:
        yield from uploads(3)
        stopped.set()
        release.wait(60)  # the submitter "dies" here: nothing more, and no clean-up
        raise KeyboardInterrupt

    def submit() -> None:
        with contextlib.suppress(KeyboardInterrupt, QueueError):
            queue.submit(JobSpec(inputs(), RecordOptions(), task_size=1))

    thread = threading.Thread(target=submit, daemon=True)
    thread.start()
    try:
        assert stopped.wait(30)
        (job,) = queue.jobs()
        wait_for(lambda: queue.status(job.id).total >= 2, 30, "the first tasks")
        assert queue.status(job.id).state in ("queued", "running") and not queue.status(job.id).sealed
        assert queue.claim("w", 1, 30) != []  # not stale yet: a worker may work on it
        monkeypatch.setattr(backend, "STALE_SUBMISSION_S", 0.0)
        time.sleep(0.01)
        assert queue.claim("w", 10, 30) == []
        assert queue.status(job.id).state == "cancelled"
        uploaded = [i.ref for i in uploads(3)]
        assert queue.blobs(job.id, uploaded) == {}
    finally:
        release.set()
        thread.join(30)
        queue.close()
