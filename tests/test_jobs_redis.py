"""The job scenarios on the Redis Streams queue, against a real ``redis-server`` started here
(:mod:`tests.redis_server`: skipped when it is not installed, except in CI)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import jobs_support as js
from tests.redis_server import RedisServer
from wanwu.errors import QueueError
from wanwu.jobs.base import JobInput, JobSpec, open_queue
from wanwu.records import RecordOptions

TinyModel = tuple[Path, Path]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), js.free_port(), durable=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def queue_url(redis_server: RedisServer) -> str:
    """Each test gets its own key prefix on the shared server."""
    return redis_server.url()


@pytest.mark.slow
def test_worker_killed_mid_job_every_input_exactly_once(queue_url: str, tiny_model: TinyModel) -> None:
    js.scenario_worker_killed_mid_job(js.add_query(queue_url, lease="2"), tiny_model)


@pytest.mark.slow
def test_pending_jobs_survive_restarts_of_service_workers_and_redis(tmp_path: Path,
                                                                  tiny_model: TinyModel) -> None:
    server = RedisServer(tmp_path, js.free_port(), durable=True)
    server.start()
    try:
        js.scenario_pending_jobs_survive_restarts(server.url(), tiny_model, restart_store=server.restart)
    finally:
        server.stop()


def test_cancel_stops_remaining_tasks(queue_url: str, tiny_model: TinyModel) -> None:
    js.scenario_cancel(queue_url, tiny_model)


def test_delete_forgets_a_job_even_mid_run(queue_url: str, tiny_model: TinyModel) -> None:
    js.scenario_delete(queue_url, tiny_model)


def test_redelivered_task_written_once(queue_url: str) -> None:
    js.scenario_redelivery_is_idempotent(queue_url)


def test_poison_task_abandoned_after_attempts(queue_url: str) -> None:
    js.scenario_poison_task_is_abandoned(queue_url)


def test_records_in_input_order_and_uploads_dropped(queue_url: str, tiny_model: TinyModel) -> None:
    queue = open_queue(queue_url)
    inputs = js.uploads(37)
    job_id = queue.submit(JobSpec(inputs, task_size=5))
    assert queue.status(job_id).state == "queued" and queue.outstanding() == 8
    stats = js.work(queue, tiny_model, tasks_per_claim=3)
    assert (stats.tasks, stats.records) == (8, 37)
    js.assert_exactly_once(queue, job_id, [i.name for i in inputs])
    assert queue.blobs(job_id, [inputs[0].ref]) == {}
    assert [s.id for s in queue.jobs()] == [job_id]
    queue.close()


def test_unreachable_redis_is_a_queue_error() -> None:
    started = time.monotonic()
    with pytest.raises(QueueError, match="Redis job queue"):
        open_queue(f"redis://127.0.0.1:{js.free_port()}/0")
    assert time.monotonic() - started < 15


def test_following_a_job_status_wait_and_worker_log(queue_url: str, tiny_model: TinyModel, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    js.scenario_follow_a_job(queue_url, tiny_model, tmp_path / "photos", capsys)


# --- review fixes ---------------------------------------------------------------------------------------------


def test_submit_holds_a_bounded_number_of_upload_bytes(queue_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from wanwu.jobs import redis as redis_queue

    monkeypatch.setattr(redis_queue, "PIPELINE_BYTES", 50_000)
    queue = open_queue(queue_url)
    held: list[int] = []
    real_pipeline = queue.r.pipeline  # type: ignore[attr-defined]

    def spying_pipeline(*args: object, **kwargs: object) -> object:
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        def execute(*a: object, **k: object) -> object:
            held.append(sum(len(x) for cmd, _ in pipe.command_stack for x in cmd if isinstance(x, bytes)))
            return real_execute(*a, **k)

        pipe.execute = execute
        return pipe

    monkeypatch.setattr(queue.r, "pipeline", spying_pipeline)  # type: ignore[attr-defined]
    uploads = [JobInput.upload(f"u{i}.bin", bytes([i % 256]) * 20_000 + str(i).encode()) for i in range(40)]
    job = queue.submit(JobSpec(uploads, RecordOptions(), task_size=16))
    assert queue.status(job).total == 40
    assert max(held) <= 50_000 + 20_010  # the bound plus the one upload that crossed it
    queue.close()


def test_a_heartbeat_does_not_take_a_task_back_from_its_new_owner(queue_url: str) -> None:
    queue = open_queue(queue_url)
    queue.submit(JobSpec(js.uploads(1), RecordOptions(), task_size=16))
    (mine,) = queue.claim("a", 1, 0.05)
    taken: list[Any] = []
    deadline = time.monotonic() + 30
    while not taken and time.monotonic() < deadline:  # a's lease lapses; b takes the task over
        taken = queue.claim("b", 1, 0.05)
        time.sleep(0.02)
    assert [t.task_id for t in taken] == [mine.task_id]
    queue.extend("a", [mine], 0.05)  # a's heartbeat, late
    queue.release("a", [mine])  # and a giving it up
    r: Any = queue.r  # type: ignore[attr-defined]
    (entry,) = r.xpending_range(queue.stream, queue.group, "-", "+", 10)  # type: ignore[attr-defined]
    assert entry["consumer"] == b"b"
    queue.close()


def test_a_killed_submission_is_cancelled_once_stale(queue_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    js.scenario_killed_submit_is_reaped(queue_url, monkeypatch)
