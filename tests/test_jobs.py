"""Async jobs on the embedded SQLite queue: the queue contract, the worker, the CLI and /v1/jobs.

The backend-independent scenarios live in tests/jobs_support.py; test_jobs_redis.py runs them on Redis.
"""

from __future__ import annotations

import csv
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import jobs_support as js
from tests.helpers import image_bytes
from wanwu.cli.main import main
from wanwu.errors import MissingExtraError, UsageError
from wanwu.jobs.base import (
    JobInput,
    JobQueue,
    JobSpec,
    UnknownJobError,
    open_queue,
    parse_queue_url,
)
from wanwu.records import RecordOptions

STOPPING = "stopping after the tasks in hand"  # what `wanwu worker` logs on its first SIGTERM

TinyModel = tuple[Path, Path]


@pytest.fixture
def queue_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'queue' / 'jobs.sqlite3'}"


# --- the scenarios both backends pass -----------------------------------------------------------------------


@pytest.mark.slow
def test_worker_killed_mid_job_every_input_exactly_once(queue_url: str, tiny_model: TinyModel) -> None:
    js.scenario_worker_killed_mid_job(js.add_query(queue_url, lease="2"), tiny_model)


@pytest.mark.slow
@pytest.mark.extra("server")
def test_pending_jobs_survive_service_and_worker_restarts(queue_url: str, tiny_model: TinyModel) -> None:
    js.scenario_pending_jobs_survive_restarts(queue_url, tiny_model)


def test_cancel_stops_remaining_tasks(queue_url: str, tiny_model: TinyModel) -> None:
    js.scenario_cancel(queue_url, tiny_model)


def test_delete_forgets_a_job_even_mid_run(queue_url: str, tiny_model: TinyModel) -> None:
    js.scenario_delete(queue_url, tiny_model)


def test_redelivered_task_written_once(queue_url: str) -> None:
    js.scenario_redelivery_is_idempotent(queue_url)


def test_poison_task_abandoned_after_attempts(queue_url: str) -> None:
    js.scenario_poison_task_is_abandoned(queue_url)


# --- worker: inputs, options, records ----------------------------------------------------------------------


def test_job_records_match_plain_recognize(queue_url: str, tiny_model: TinyModel) -> None:
    """Each input gets its own image's answer (nothing shifted between tasks), as the plain CLI gives it."""
    inputs = js.uploads(23)
    queue = open_queue(queue_url)
    job_id = queue.submit(JobSpec(inputs, RecordOptions(top_k=3, score="logit"), task_size=5))
    stats = js.work(queue, tiny_model, tasks_per_claim=2)
    assert stats.tasks == 5 and stats.records == 23
    got = {r.input: r for r in queue.results(job_id)}
    with js.recognizer(tiny_model) as rec:
        from wanwu.sources import InputItem

        items = [InputItem.from_bytes(i.name, js.colour(n)) for n, i in enumerate(inputs)]
        expected = list(rec.recognize(items, RecordOptions(top_k=3, score="logit")))
    assert [got[e.input].predictions for e in expected] == [e.predictions for e in expected]
    assert len({r.predictions[0].label for r in got.values()}) > 1, "the images differ, so must the answers"
    queue.close()


def test_paths_only_under_allowed_roots(queue_url: str, tiny_model: TinyModel, tmp_path: Path) -> None:
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir()
    other.mkdir()
    (allowed / "a.jpg").write_bytes(image_bytes())
    (other / "b.jpg").write_bytes(image_bytes())
    (allowed / "escape.jpg").symlink_to(other / "b.jpg")
    queue = open_queue(queue_url)
    names = [str(p) for p in (allowed / "a.jpg", other / "b.jpg", allowed / "escape.jpg", allowed / "no.jpg")]
    job_id = queue.submit(JobSpec([JobInput.path(n) for n in names]))
    js.work(queue, tiny_model, allow_roots=(allowed,))
    records = list(queue.results(job_id))
    assert [r.input for r in records] == names
    assert records[0].ok
    assert [r.error.type for r in records[1:] if r.error] == ["fetch_error", "fetch_error", "not_found"]
    assert records[1].error is not None and "--allow-root" in records[1].error.message
    status = queue.status(job_id)
    assert (status.state, status.done, status.failed) == ("done", 1, 3)

    # A worker with no roots reads no paths: it leaves such tasks (undelivered) to a worker that has roots,
    # and does the rest of the queue meanwhile.
    job_id = queue.submit(JobSpec([JobInput.path(names[0])], task_size=1))
    other_job = queue.submit(JobSpec(js.uploads(2), task_size=1))
    stats = js.work(queue, tiny_model, poll_s=0.2)
    assert stats.tasks == 2 and queue.status(other_job).state == "done"
    status = queue.status(job_id)
    assert (status.finished, status.state) == (0, "running"), "no fetch_error for a path it may not read"
    js.work(queue, tiny_model, allow_roots=(allowed,))
    (record,) = queue.results(job_id)
    assert record.ok and queue.outstanding() == 0
    queue.close()


def test_urls_uploads_and_bad_inputs_in_one_job(queue_url: str, tiny_model: TinyModel) -> None:
    queue = open_queue(queue_url)
    with js.image_server() as server:
        inputs = [JobInput.url(f"{server.url}/img/1.jpg"), JobInput.upload("bad.jpg", b"not an image"),
                  JobInput.url(f"{server.url}/nothing.jpg"),
                  JobInput.missing("gone.jpg", "not_found", "no file"),
                  *js.uploads(2)]
        job_id = queue.submit(JobSpec(inputs, task_size=4))
        js.work(queue, tiny_model)
    records = list(queue.results(job_id))
    assert [r.status for r in records] == ["ok", "error", "error", "error", "ok", "ok"]
    assert [r.error.type for r in records if r.error] == ["unsupported", "not_found", "not_found"]
    status = queue.status(job_id)
    assert (status.total, status.done, status.failed, status.state) == (6, 3, 3, "done")
    d = status.to_dict()
    assert set(d) >= {"id", "state", "total", "succeeded", "failed", "pending", "rate_per_s", "eta_s", "created",
                      "updated"}
    assert "done" not in d and d["succeeded"] + d["failed"] + d["pending"] == d["total"]
    assert d["created"].endswith("Z") and d["pending"] == 0 and d["eta_s"] is None
    queue.close()


def test_uploads_are_deleted_when_the_job_is_done(queue_url: str, tiny_model: TinyModel) -> None:
    queue = open_queue(queue_url)
    job_id = queue.submit(JobSpec(js.uploads(3)))
    key = JobInput.upload("x", js.colour(0)).ref
    assert queue.blobs(job_id, [key]) != {}
    js.work(queue, tiny_model)
    assert queue.blobs(job_id, [key]) == {}
    queue.close()


# --- queue URLs and errors ---------------------------------------------------------------------------------


def test_queue_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = parse_queue_url("redis://h:1/2?lease=2.5&attempts=3&socket_timeout=5")
    assert parsed.settings.lease_s == 2.5 and parsed.settings.max_attempts == 3
    assert parsed.url == "redis://h:1/2?socket_timeout=5"
    with pytest.raises(UsageError, match="unknown scheme"):
        open_queue("postgres://x/y")
    with pytest.raises(UsageError, match="three slashes"):
        open_queue("sqlite://host/x.db")
    with pytest.raises(UsageError, match="lease"):
        open_queue(f"sqlite:///{tmp_path}/q.db?lease=soon")
    queue = open_queue()  # default: SQLite in $WANWU_HOME
    assert queue.url.endswith("wanwu-home/jobs.sqlite3")
    with pytest.raises(UnknownJobError):
        queue.status("nope")
    with pytest.raises(UsageError, match="at least one input"):
        queue.submit(JobSpec([]))
    with pytest.raises(UsageError, match="absolute"):
        JobInput.parse("relative/a.jpg")
    with pytest.raises(UsageError, match="top_k"):
        RecordOptions(top_k=0)
    queue.close()
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(sys.modules, "wanwu.jobs.redis", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install 'wanwu-vision\[queue\]'"):
        open_queue("redis://127.0.0.1:1/0")


# --- CLI ---------------------------------------------------------------------------------------------------


def test_cli_submit_status_results_cancel(queue_url: str, tiny_model: TinyModel, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        (folder / ("sub" if i % 2 else "") / f"{i}.jpg").write_bytes(js.colour(i))
    q = ["--queue", queue_url]
    assert main(["jobs", "submit", *q, "--top-k", "2", str(folder), str(tmp_path / "no.jpg")]) == 3
    out, err = capsys.readouterr()
    job_id = out.strip()  # stdout: the id alone; stderr: what was queued and what was not
    assert f"queued 5 input(s) as job {job_id}" in err
    assert f"not queued: {tmp_path / 'no.jpg'}: not_found" in err
    assert main(["jobs", "status", "--queue", queue_url, job_id]) == 0
    out, err = capsys.readouterr()
    status = json.loads(out)
    assert (status["id"], status["state"], status["total"], status["succeeded"]) == (job_id, "queued", 5, 0)
    assert (status["workers_active"], status["tasks_waiting"]) == (0, 1) and "no worker holds" in err

    model, labels = tiny_model
    monkeypatch.setattr("wanwu.cli.worker._on_signals", lambda stop: None)
    assert main(["worker", "--queue", queue_url, "--model", str(model), "--labels", str(labels), "-j", "0",
                 "--no-cache", "--exit-when-idle", "--poll", "0.05"]) == 0
    assert main(["jobs", "status", "--queue", queue_url, job_id]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["state"], status["succeeded"], status["failed"]) == ("done", 5, 0)
    assert main(["jobs", "wait", *q, job_id]) == 0
    assert f"job {job_id}: done: 5 ok, 0 failed of 5" in capsys.readouterr().err

    out = tmp_path / "out.jsonl"
    assert main(["jobs", "results", *q, job_id, "--format", "jsonl", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)
    assert sorted(Path(r["input"]).name for r in rows[:5]) == [f"{i}.jpg" for i in range(5)]
    assert all(len(r["predictions"]) == 2 for r in rows[:5])
    out_csv = tmp_path / "out.csv"
    assert main(["jobs", "results", "--queue", queue_url, job_id, "-f", "csv", "-o", str(out_csv)]) == 0
    table = list(csv.DictReader(out_csv.read_text(encoding="utf-8").splitlines()))
    assert [r["input"] for r in table] == [r["input"] for r in rows]
    assert main(["jobs", "submit", *q, str(tmp_path / "no.jpg")]) == 2  # nothing to queue: no job
    assert "nothing to queue" in capsys.readouterr().err
    assert table[0]["label_2"] and "label_3" not in table[0]

    assert main(["jobs", "submit", "--queue", queue_url, "--by-reference", str(folder)]) == 0
    second = capsys.readouterr().out.strip()
    assert main(["jobs", "cancel", "--queue", queue_url, second]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "cancelled"
    assert main(["jobs", "status", "--queue", queue_url]) == 0
    listed = [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]
    assert listed == [second, job_id]
    assert main(["jobs", "status", "--queue", queue_url, "nope"]) == 1
    assert "no job 'nope'" in capsys.readouterr().err
    assert main(["jobs", "status", "--queue", "ftp://x"]) == 2

    assert main(["jobs", "submit", *q, str(folder)]) == 0
    third = capsys.readouterr().out.strip()  # queued: not finished, so --finished-before leaves it
    assert main(["jobs", "delete", *q, "--finished-before", "1"]) == 0  # nothing finished an hour ago
    assert capsys.readouterr().out == ""
    assert main(["jobs", "delete", *q, "--finished-before", "0"]) == 0
    assert sorted(capsys.readouterr().out.split()) == sorted([job_id, second])
    assert main(["jobs", "delete", *q, third]) == 0 and capsys.readouterr().out.split() == [third]
    assert main(["jobs", "status", *q]) == 0 and capsys.readouterr().out == ""
    assert main(["jobs", "delete", *q]) == 2


def test_cli_by_reference_sends_absolute_paths(queue_url: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    monkeypatch.chdir(tmp_path)
    assert main(["jobs", "submit", "--queue", queue_url, "--by-reference", "a.jpg"]) == 0
    job_id = capsys.readouterr().out.strip()
    queue = open_queue(queue_url)
    (task,) = queue.claim("w", 1, 10)
    assert task.job_id == job_id
    assert task.inputs == (JobInput("a.jpg", "path", str(tmp_path / "a.jpg")),)
    queue.close()


# --- HTTP --------------------------------------------------------------------------------------------------


@pytest.mark.extra("server")
def test_http_jobs_api(queue_url: str, tiny_model: TinyModel, tmp_path: Path) -> None:
    from fastapi import FastAPI

    from wanwu.jobs.http import router

    app = FastAPI()
    app.include_router(router(queue_url))
    (tmp_path / "p.jpg").write_bytes(js.colour(2))
    with js.serve(app) as client, js.image_server() as server:
        r = client.post("/v1/jobs", json={"inputs": [f"{server.url}/img/4.jpg", str(tmp_path / "p.jpg")],
                                          "top_k": 1, "score": "logit"})
        assert r.status_code == 201, r.text
        by_json = r.json()
        assert r.headers["location"] == f"/v1/jobs/{by_json['id']}"
        assert (by_json["state"], by_json["total"], by_json["options"]["score"]) == ("queued", 2, "logit")
        files = [("files", (f"u{i}.jpg", js.colour(i), "image/jpeg")) for i in range(3)]
        r = client.post("/v1/jobs", files=files, data={"top_k": "2"})
        assert r.status_code == 201, r.text
        by_upload = r.json()["id"]
        queue = open_queue(queue_url)
        js.work(queue, tiny_model, allow_roots=(tmp_path,))
        queue.close()

        status = client.get(f"/v1/jobs/{by_json['id']}").json()
        assert (status["state"], status["succeeded"], status["failed"]) == ("done", 2, 0)
        lines = client.get(f"/v1/jobs/{by_json['id']}/results").text.splitlines()
        assert [json.loads(x)["input"] for x in lines] == [f"{server.url}/img/4.jpg", str(tmp_path / "p.jpg")]
        r = client.get(f"/v1/jobs/{by_upload}/results", params={"format": "csv"})
        assert r.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(r.text.splitlines()))
        assert [row["input"] for row in rows] == ["u0.jpg", "u1.jpg", "u2.jpg"] and rows[0]["score_2"]
        assert [j["id"] for j in client.get("/v1/jobs").json()] == [by_upload, by_json["id"]]

        assert client.get("/v1/jobs/nope").status_code == 404
        assert client.get("/v1/jobs/nope/results").status_code == 404
        assert client.delete("/v1/jobs/nope").status_code == 404
        assert client.post("/v1/jobs", json={"inputs": ["relative.jpg"]}).status_code == 400
        assert client.post("/v1/jobs", json={"inputs": []}).status_code == 400
        assert client.post("/v1/jobs", json={"inputs": ["/a.jpg"], "top_k": 99}).status_code == 400
        assert client.post("/v1/jobs", content=b"[1]").status_code == 400
        assert client.get(f"/v1/jobs/{by_upload}/results", params={"format": "xml"}).status_code == 422

        r = client.post("/v1/jobs", json={"inputs": ["/x/a.jpg"]})
        assert client.post(f"/v1/jobs/{r.json()['id']}/cancel").json()["state"] == "cancelled"
        assert client.get(f"/v1/jobs/{r.json()['id']}").json()["state"] == "cancelled"  # cancelled, kept
        assert client.post(f"/v1/jobs/{by_upload}/cancel").json()["state"] == "done"  # finished: no-op
        records = client.get(f"/v1/jobs/{by_upload}/results", params={"format": "json"}).json()
        assert [x["input"] for x in records] == ["u0.jpg", "u1.jpg", "u2.jpg"]  # an array, as documented
        assert client.delete(f"/v1/jobs/{by_upload}").status_code == 204  # DELETE removes (no purge flag)
        assert client.get(f"/v1/jobs/{by_upload}").status_code == 404
        assert client.get(f"/v1/jobs/{by_upload}/results").status_code == 404
        assert client.delete(f"/v1/jobs/{by_upload}").status_code == 404
        assert client.post("/v1/jobs/nope/cancel").status_code == 404


@pytest.mark.extra("server")
def test_http_jobs_uploads_above_one_mb_are_read_whole_and_the_limit_holds(
    queue_url: str, tiny_model: TinyModel
) -> None:
    """Uploads above 1 MB are spooled to disk by the form parser; each is read by the size the parser counted
    (asking for the limit at once would allocate it), whole when within the limit, too_large above it."""
    import io
    import tracemalloc

    import numpy as np
    from fastapi import FastAPI
    from PIL import Image

    from wanwu.jobs.http import router

    def noise_png(side: int, seed: int) -> bytes:  # noise does not compress: a PNG of about 3 x side² bytes
        pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG", compress_level=0)
        return out.getvalue()

    within, above = noise_png(640, 1), noise_png(900, 2)  # about 1.2 MB and 2.4 MB
    limit = 2_000_000
    assert 1_048_576 < len(within) <= limit < len(above)
    default = FastAPI()  # the default limit, 100 MiB: what a read of the limit at once would allocate
    default.include_router(router(queue_url))
    with js.serve(default) as client:
        tracemalloc.start()  # every thread's allocations: the server's and the client's
        try:
            r = client.post("/v1/jobs", files=[("files", ("within.png", within, "image/png"))])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status_code == 201, r.text
        assert peak < 50 * 1024 * 1024
    app = FastAPI()
    app.include_router(router(queue_url, max_upload_bytes=limit))
    with js.serve(app) as client:
        files = [("files", ("within.png", within, "image/png")), ("files", ("above.png", above, "image/png"))]
        r = client.post("/v1/jobs", files=files)
        assert r.status_code == 201, r.text
        job = r.json()["id"]
        queue = open_queue(queue_url)
        js.work(queue, tiny_model)
        queue.close()
        records = client.get(f"/v1/jobs/{job}/results", params={"format": "json"}).json()
    # the first job (the same upload, within the default limit) was worked too: this job's records are its own
    assert [(x["input"], x["status"]) for x in records] == [("within.png", "ok"), ("above.png", "error")]
    assert records[0]["width"] == 640  # decoded from all of its bytes
    assert records[1]["error"]["type"] == "too_large" and f"{limit:,} bytes" in records[1]["error"]["message"]


@pytest.mark.slow
def test_sigterm_finishes_tasks_in_hand_twice_gives_them_back(queue_url: str, tiny_model: TinyModel,
                                                               tmp_path: Path) -> None:
    queue = open_queue(queue_url)

    def took_the_signal(log: Path) -> Callable[[], bool]:
        return lambda: STOPPING in log.read_text(encoding="utf-8", errors="replace")

    with js.image_server() as server:
        inputs = [*js.uploads(5), JobInput.url(f"{server.url}/slow.jpg"), *js.uploads(30, 5)]
        job_id = queue.submit(JobSpec(inputs, task_size=4))
        log = tmp_path / "graceful.log"
        graceful = js.worker_process(queue_url, tiny_model, "--lease", "60", log=log)
        try:
            js.wait_for(server.slow_hit.is_set, 60, "the worker to reach the hanging input")
            graceful.send_signal(signal.SIGTERM)
            js.wait_for(took_the_signal(log), 60, "the worker to take the signal")  # before it could claim more
            server.release()
            assert graceful.wait(timeout=30) == 0, log.read_text(errors="replace")
        finally:
            js.stop(graceful)
        status = queue.status(job_id)
        assert status.finished == 16 and status.state == "running"  # its four tasks, then it stopped

    with js.image_server() as server:
        job_id = queue.submit(JobSpec([JobInput.url(f"{server.url}/slow.jpg"), *js.uploads(7)], task_size=4))
        log = tmp_path / "abrupt.log"
        abrupt = js.worker_process(queue_url, tiny_model, "--lease", "60", log=log)
        try:
            js.wait_for(server.slow_hit.is_set, 60, "the worker to reach the hanging input")
            abrupt.send_signal(signal.SIGTERM)
            # a second signal sent before the first was handled would be the same pending signal, not a second
            js.wait_for(took_the_signal(log), 60, "the worker to take the first signal")
            abrupt.send_signal(signal.SIGTERM)
            js.wait_for(lambda: _claimable(queue), 30, "the worker to give its tasks back at once")
            assert queue.status(job_id).finished == 0
            server.release()
            assert abrupt.wait(timeout=30) == 130, log.read_text(errors="replace")
        finally:
            js.stop(abrupt)
        js.work(queue, tiny_model)
    js.assert_exactly_once(queue, job_id, [f"{server.url}/slow.jpg", *(i.name for i in js.uploads(7))])
    queue.close()


def _claimable(queue: JobQueue) -> bool:
    """Whether some task can be claimed now (then handed straight back)."""
    tasks = queue.claim("probe", 10, 60)
    queue.release("probe", tasks)
    return bool(tasks)


def test_following_a_job_status_wait_and_worker_log(queue_url: str, tiny_model: TinyModel, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    js.scenario_follow_a_job(queue_url, tiny_model, tmp_path / "photos", capsys)


# --- review fixes ---------------------------------------------------------------------------------------------


class _StuckRecognizer:
    """Hangs on its first image until released (a stuck decode or backend)."""

    def __init__(self) -> None:
        import threading

        self.entered, self.released = threading.Event(), threading.Event()

    def recognize(self, items: object, options: object) -> object:
        self.entered.set()
        self.released.wait(60)
        return iter(())


def test_a_stuck_worker_stops_renewing_so_its_tasks_go_back(queue_url: str) -> None:
    import threading

    from wanwu.jobs.worker import WorkerConfig, run_worker

    queue = open_queue(queue_url)
    queue.submit(JobSpec(js.uploads(2), RecordOptions(), task_size=16))
    stuck, stop, errors = _StuckRecognizer(), threading.Event(), []

    def work() -> None:
        try:
            run_worker(queue, stuck, WorkerConfig(lease_s=0.3, stall_s=0.6, poll_s=0.05), stop)  # type: ignore[arg-type]
        except RuntimeError as e:  # released with no records: out of step, as expected
            errors.append(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        assert stuck.entered.wait(30)
        taken: list[object] = []
        deadline = time.monotonic() + 30
        while not taken and time.monotonic() < deadline:
            taken = list(queue.claim("healthy", 1, 30))
            time.sleep(0.05)
        assert len(taken) == 1  # the stuck worker's heartbeat let the lease lapse
    finally:
        stop.set()
        stuck.released.set()
        thread.join(30)
        queue.close()


def test_a_killed_submission_is_cancelled_once_stale(queue_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    js.scenario_killed_submit_is_reaped(queue_url, monkeypatch)


def test_a_missing_input_keeps_its_reason_apart_from_any_reference() -> None:
    item = JobInput.missing("gone.jpg", "not_found", "no such file: gone.jpg")
    assert (item.ref, item.failure()) == ("", ("not_found", "no such file: gone.jpg"))
    assert JobInput.from_wire(item.to_wire()) == item  # the queue's wire format round-trips it
    assert JobInput.from_wire(["x.jpg", "missing", "nonsense: but kept"]).failure() == ("internal", "but kept")
