"""The multi-machine job queue: Redis Streams with one consumer group shared by every worker.

Keys (prefix ``wanwu``, or ``?prefix=NAME`` in the URL):

* ``P:tasks`` — the stream of tasks (job id, first input index, inputs); group ``P:workers``. Workers take
  new tasks with XREADGROUP, and take over tasks idle longer than the lease (their worker died) with
  XAUTOCLAIM; a live worker's heartbeat re-claims its own tasks (XCLAIM, which resets the idle time).
* ``P:job:ID`` — a hash: options, counters (total, done, failed, abandoned), flags (sealed, cancelled), times.
* ``P:job:ID:results`` — a hash from input index to the record's JSON. One Lua script writes a task's
  records with HSETNX, counts only the new ones, and XACKs + XDELs the task, all atomically: a task finished
  twice leaves the same single record per input.
* ``P:job:ID:tasks`` — the stream ids of the job's tasks, so cancelling or deleting a job takes its tasks
  out of the stream at once (no worker spends a claim on them, no later job waits behind them).
* ``P:blob:ID:SHA256`` — uploaded files (listed in ``P:job:ID:blobs``), deleted when the job is over;
  ``P:upload_bytes`` counts the bytes held, refused past the queue's budget (``max_upload_mb``).
* ``P:jobs`` — a sorted set of job ids by creation time.
* ``P:epoch`` — when this queue's store was first seen empty. A job id older than that which has no job
  is reported as lost (the store was emptied: Redis restarted without persistence), not as unknown.

Durability is Redis's: run it with the append-only file on if queued jobs must survive a Redis restart
(:meth:`RedisQueue.health` says when it keeps nothing on disk).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from wanwu.errors import MissingExtraError, QueueError, QueueStorageError, QueueUnavailableError
from wanwu.jobs.base import (
    STALE_SUBMISSION_S,
    JobActivity,
    JobSpec,
    JobStatus,
    LostJobError,
    QueueURL,
    RetryPlan,
    SubmitBatch,
    Task,
    UnknownJobError,
    abandoned_records,
    check_job_id,
    chunk_tasks,
    decode_inputs,
    job_created,
    new_job_id,
    record_json,
    redact_url,
    register_queue,
    with_query,
)
from wanwu.jobs.redis_lua import CLAIM_OWN, COMPLETE_LUA, DECLINE
from wanwu.jobs.retry import retrying
from wanwu.records import Record, RecordOptions

log = logging.getLogger("wanwu")

PIPELINE_TASKS = 256
PIPELINE_BYTES = 32 * 1024 * 1024  # uploads buffered for one round trip: submit holds at most about this much
RESULT_PAGE = 1000
DEFAULT_MAX_UPLOAD_MB = 1024.0  # uploads live in Redis's memory: about 9,000 photos of 110 KB at once
DROP_ROUNDS = 20  # claims in a row that found only tasks of cancelled or deleted jobs before pausing
RELEASED_IDLE_MS = 10 * 365 * 86400 * 1000  # a released task looks long abandoned: reclaimed at once
ACTIVITY_SCAN = 10_000  # claimed tasks looked at by activity() (workers x tasks per claim, normally far fewer)



class RedisQueue:
    def __init__(self, parsed: QueueURL) -> None:
        try:
            import redis
        except ImportError:
            raise MissingExtraError("redis", "queue", "the Redis job queue") from None
        x = redis.exceptions
        self._errors_base: type[Exception] = x.RedisError
        self._response_error: type[Exception] = x.ResponseError
        self._transient: tuple[type[Exception], ...] = (
            x.ConnectionError, x.TimeoutError, x.ReadOnlyError, x.TryAgainError, x.ClusterDownError, OSError)
        self._fatal: tuple[type[Exception], ...] = (x.AuthenticationError, x.AuthorizationError)
        self.url = redact_url(parsed.url)  # for messages and logs; the password stays in the client only
        self.settings = parsed.settings
        budget = parsed.settings.max_upload_mb
        self.max_upload_bytes = int((DEFAULT_MAX_UPLOAD_MB if budget is None else budget) * 1024 * 1024)
        url, prefix = _split_prefix(parsed.url)
        self.p = prefix
        self.stream = f"{prefix}:tasks"
        self.group = f"{prefix}:workers"
        self.epoch = 0.0
        with self._errors():
            self.r: Any = redis.Redis.from_url(url, decode_responses=False, socket_connect_timeout=10,
                                          socket_timeout=60, health_check_interval=30)
            self._complete = self.r.register_script(COMPLETE_LUA)
            self.r.ping()
            self._ensure_group()
            self.epoch = self._read_epoch()

    # -- plumbing ----------------------------------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except self._fatal as e:
            raise QueueError(f"Redis job queue {self.url}: {type(e).__name__}: {e}") from None
        except self._transient as e:
            raise QueueUnavailableError(f"Redis job queue {self.url}: {type(e).__name__}: {e}") from None
        except self._errors_base as e:
            if str(e).startswith(("LOADING", "MASTERDOWN", "BUSY ")):
                raise QueueUnavailableError(f"Redis job queue {self.url}: {type(e).__name__}: {e}") from None
            raise QueueError(f"Redis job queue {self.url}: {type(e).__name__}: {e}") from None

    def _read_epoch(self) -> float:
        """When this store was first seen empty of this queue (set now if it is)."""
        key = f"{self.p}:epoch"
        self.r.hsetnx(key, "created", repr(time.time()))
        return float(self.r.hget(key, "created") or 0)

    def _check_epoch(self) -> None:
        """Name a store that was emptied under us (a restart without persistence) as such, once."""
        epoch = self._read_epoch()
        if self.epoch and epoch != self.epoch:
            log.error("the Redis store of queue %s was emptied (restarted without persistence, or flushed): "
                      "every job submitted before %s is lost, records included; run Redis with "
                      "--appendonly yes so that jobs survive a restart", self.url,
                      time.strftime("%H:%M:%S UTC", time.gmtime(epoch)))
        self.epoch = epoch

    def health(self) -> list[str]:
        """What an operator should know: a Redis that keeps nothing on disk loses every job on restart."""
        with self._errors():
            aof = self.r.info("persistence").get("aof_enabled", 0)
            try:
                reply = {_text(k): _text(v) for k, v in self.r.config_get("save").items()}
                save = reply.get("save", "?")
            except self._response_error:  # CONFIG disabled (managed Redis): cannot tell about snapshots
                save = "?"
        if not int(aof) and save == "":
            return [f"Redis at {self.url} keeps nothing on disk (appendonly no, save \"\"): a restart loses "
                    "every queued job and its records; start it with --appendonly yes"]
        if not int(aof):
            return [f"Redis at {self.url} has no append-only file: a crash loses what changed since its last "
                    "snapshot (records and tasks); --appendonly yes keeps every write"]
        return []

    def _ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except self._response_error as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _job_key(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def _job(self, job_id: str) -> dict[str, str]:
        raw = self.r.hgetall(self._job_key(check_job_id(job_id)))
        if not raw:
            epoch = self._read_epoch()  # now, not as this client first saw it: the store may be new since
            if job_created(job_id) < epoch:
                raise LostJobError(job_id, epoch)
            raise UnknownJobError(job_id)
        return {k.decode(): v.decode() for k, v in raw.items()}

    @staticmethod
    def _status(job: dict[str, str]) -> JobStatus:
        return JobStatus.of(
            job["id"], created=float(job["created"]), updated=float(job["updated"]),
            started=float(job["started"]) if job.get("started") else None, options=job["options"],
            total=int(job["total"]), sealed=job["sealed"] == "1", cancelled=job["cancelled"] == "1",
            done=int(job["done"]), failed=int(job["failed"]), abandoned=int(job["abandoned"]),
        )

    # -- front ends ---------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        job_id = new_job_id()
        retrying(lambda: self._create_job(job_id, spec), "submitting a job", deadline_s=self.settings.retry_s)
        with self._errors():
            try:
                self._fill(job_id, spec)
            except BaseException:
                try:
                    self._stop_job(job_id)
                except self._errors_base:
                    pass  # the store is gone: a worker reaps the unsealed job once it is back
                raise
        return job_id

    def _create_job(self, job_id: str, spec: JobSpec) -> None:
        now = time.time()
        with self._errors():
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(self._job_key(job_id), mapping={
                "id": job_id, "created": now, "updated": now, "options": json.dumps(spec.options.to_dict()),
                "total": 0, "sealed": 0, "cancelled": 0, "done": 0, "failed": 0, "abandoned": 0,
            })
            pipe.zadd(f"{self.p}:jobs", {job_id: now})
            pipe.zadd(f"{self.p}:unsealed", {job_id: now})  # the submitter's heartbeat: see _fill
            pipe.execute()

    def _fill(self, job_id: str, spec: JobSpec) -> None:
        for batch in chunk_tasks(spec, max_tasks=PIPELINE_TASKS, max_bytes=PIPELINE_BYTES):
            self._check_budget(batch)
            retrying(lambda b=batch: self._write_batch(job_id, b), f"submitting job {job_id}",  # type: ignore[misc]
                     deadline_s=self.settings.retry_s)
        self._maybe_finish(job_id)

    def _check_budget(self, batch: SubmitBatch) -> None:
        wanted = sum(len(data) for _, data in dict(batch.blobs).items())
        if not wanted:
            return
        with self._errors():
            held = int(self.r.get(f"{self.p}:upload_bytes") or 0)
        if held + wanted > self.max_upload_bytes:
            raise QueueStorageError(
                f"the queue {self.url} holds {held / 2**20:.0f} MB of uploaded files and its budget is "
                f"{self.max_upload_bytes / 2**20:.0f} MB (max_upload_mb= in the queue URL): wait for jobs to "
                "finish or delete finished ones, or submit files by reference (--by-reference)")

    def _write_batch(self, job_id: str, batch: SubmitBatch) -> None:
        """One round trip of uploads and tasks (safe to repeat: blobs are SET NX, a repeated task's records
        are written once), then the bookkeeping that needs the stream ids and which blobs were new."""
        key = self._job_key(job_id)
        with self._errors():
            pipe = self.r.pipeline(transaction=False)
            for ref, data in batch.blobs:  # blobs before their task: a worker never misses one
                pipe.set(f"{self.p}:blob:{job_id}:{ref}", data, nx=True)
                pipe.sadd(f"{key}:blobs", ref)
            for start, inputs in batch.tasks:
                pipe.xadd(self.stream, {"job": job_id, "start": start, "inputs": inputs})
            if batch.last:
                pipe.hset(key, mapping={"total": batch.total, "sealed": 1, "updated": time.time()})
                pipe.zrem(f"{self.p}:unsealed", job_id)
            else:
                pipe.hset(key, "total", batch.total)
                pipe.zadd(f"{self.p}:unsealed", {job_id: time.time()})  # the submitter's heartbeat
            replies = pipe.execute()
            added = sum(len(data) for (_, data), new in zip(batch.blobs, replies[0 : 2 * len(batch.blobs) : 2],
                                                            strict=True) if new)
            ids = replies[2 * len(batch.blobs) : 2 * len(batch.blobs) + len(batch.tasks)]
            pipe = self.r.pipeline(transaction=False)
            if ids:
                pipe.rpush(f"{key}:tasks", *ids)
            if added:
                pipe.hincrby(key, "upload_bytes", added)
                pipe.incrby(f"{self.p}:upload_bytes", added)
            pipe.execute()

    def status(self, job_id: str) -> JobStatus:
        with self._errors():
            return self._status(self._job(job_id))

    def jobs(self, limit: int = 50) -> list[JobStatus]:
        with self._errors():
            ids = [i.decode() for i in self.r.zrevrange(f"{self.p}:jobs", 0, limit - 1)]
            out = []
            for job_id in ids:
                try:
                    out.append(self._status(self._job(job_id)))
                except UnknownJobError:
                    continue
            return out

    def results(self, job_id: str) -> Iterator[Record]:
        total = self.status(job_id).total
        return self._results(job_id, total)

    def _results(self, job_id: str, total: int) -> Iterator[Record]:
        key = f"{self._job_key(job_id)}:results"
        for first in range(0, total, RESULT_PAGE):
            with self._errors():
                values = self.r.hmget(key, list(range(first, min(total, first + RESULT_PAGE))))
            for value in values:
                if value is not None:
                    yield Record.from_dict(json.loads(value))

    def cancel(self, job_id: str) -> JobStatus:
        with self._errors():
            status = self._status(self._job(job_id))
            if status.state in ("done", "failed", "cancelled"):
                return status
            self._stop_job(job_id)
            return self._status(self._job(job_id))

    def delete(self, job_id: str) -> None:
        with self._errors():
            self._job(job_id)
            self._stop_job(job_id)
            key = self._job_key(job_id)
            self.r.delete(key, f"{key}:results", f"{key}:failed")
            self.r.zrem(f"{self.p}:jobs", job_id)

    def retry(self, job_id: str) -> RetryPlan:
        with self._errors():
            status = self._status(self._job(job_id))
            key = self._job_key(job_id)
            failed = {int(k): v.decode() for k, v in self.r.hgetall(f"{key}:failed").items()}
            plan = RetryPlan.of(status, failed)
            if not plan.inputs:
                return plan
            pipe = self.r.pipeline(transaction=True)
            pipe.hdel(f"{key}:results", *[i for i, _ in plan.inputs])
            pipe.hdel(f"{key}:failed", *[i for i, _ in plan.inputs])
            pipe.hincrby(key, "failed", -len(plan.inputs))
            pipe.hset(key, mapping={"abandoned": 0, "updated": time.time()})
            for start, inputs in plan.tasks():
                pipe.xadd(self.stream, {"job": job_id, "start": start, "inputs": inputs})
            ids = pipe.execute()[4:]
            self.r.rpush(f"{key}:tasks", *ids)
            return plan

    def _stop_job(self, job_id: str) -> None:
        """Cancel: flag the job (a worker holding one of its tasks writes nothing more), take its tasks out
        of the stream, free its uploads."""
        key = self._job_key(job_id)
        if self.r.exists(key):
            self.r.hset(key, mapping={"cancelled": 1, "updated": time.time()})
        self._drop_tasks(job_id)
        self._drop_blobs(job_id)

    def _drop_tasks(self, job_id: str) -> None:
        key = f"{self._job_key(job_id)}:tasks"
        while True:
            ids = self.r.lrange(key, 0, 999)
            if not ids:
                break
            pipe = self.r.pipeline(transaction=False)
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)
            pipe.ltrim(key, len(ids), -1)
            pipe.execute()
        self.r.delete(key)

    def _drop_blobs(self, job_id: str) -> None:
        key = self._job_key(job_id)
        members = [m.decode() for m in self.r.smembers(f"{key}:blobs")]
        keys = [f"{self.p}:blob:{job_id}:{sha}" for sha in members]
        for i in range(0, len(keys), 1000):
            self.r.delete(*keys[i : i + 1000])
        self.r.delete(f"{key}:blobs")
        pipe = self.r.pipeline(transaction=True)  # read and zero at once: the bytes are given back once
        pipe.hget(key, "upload_bytes")
        pipe.hdel(key, "upload_bytes")
        held = int(pipe.execute()[0] or 0)
        if held:
            self.r.decrby(f"{self.p}:upload_bytes", held)

    def _maybe_finish(self, job_id: str) -> None:
        status = self._status(self._job(job_id))
        if status.sealed and status.finished >= status.total:
            self._drop_blobs(job_id)
            self.r.delete(f"{self._job_key(job_id)}:tasks")

    def activity(self, job_id: str) -> JobActivity:
        """From the group's pending entries (claimed tasks): their consumer and idle time. Tasks not claimed
        yet are not counted (that would mean reading the whole stream)."""
        lease_ms = self.settings.lease_s * 1000
        with self._errors():
            self._job(job_id)
            pending = self.r.xpending_range(self.stream, self.group, min="-", max="+", count=ACTIVITY_SCAN)
            pipe = self.r.pipeline(transaction=False)
            for entry in pending:
                pipe.xrange(self.stream, min=entry["message_id"], max=entry["message_id"], count=1)
            found = pipe.execute() if pending else []
        live: list[str] = []
        lapsed = 0
        for entry, messages in zip(pending, found, strict=True):
            if not messages or messages[0][1].get(b"job", b"").decode() != job_id:
                continue
            idle = int(entry["time_since_delivered"])
            if idle < lease_ms:
                live.append(entry["consumer"].decode())
            elif idle < RELEASED_IDLE_MS // 2:  # a released task is not a lapsed lease: it is simply free
                lapsed += 1
        return JobActivity(tuple(sorted(set(live))), len(live), lapsed, None)

    # -- workers -----------------------------------------------------------------------------------------

    def _reap_stale_submissions(self) -> None:
        """Cancel jobs whose submitter stopped adding inputs long ago (killed): free their uploads."""
        unsealed = f"{self.p}:unsealed"
        for raw in self.r.zrangebyscore(unsealed, 0, time.time() - STALE_SUBMISSION_S):
            job_id = raw.decode()
            if self.r.zrem(unsealed, job_id):  # one reaper per job, whichever worker gets here first
                log.warning("job %s: its submission stopped before it was complete; cancelling it", job_id)
                self._stop_job(job_id)

    def claim(self, worker: str, max_tasks: int, lease_s: float, skip: frozenset[str] = frozenset()
              ) -> list[Task]:
        """Tasks of cancelled or deleted jobs met on the way are dropped and do not count: the claim goes
        on (up to ``DROP_ROUNDS`` rounds) so that live work is never behind them. Tasks of jobs in ``skip``
        are declined on the way (see :meth:`decline`)."""
        with self._errors():
            self._check_epoch()
            self._reap_stale_submissions()
            for _ in range(DROP_ROUNDS):
                try:
                    tasks, dropped = self._claim(worker, max_tasks, lease_s, skip)
                except self._response_error as e:
                    if "NOGROUP" not in str(e):
                        raise
                    self._ensure_group()  # Redis lost its data (restart without persistence)
                    tasks, dropped = self._claim(worker, max_tasks, lease_s, skip)
                if tasks or not dropped:
                    return tasks
            return []

    def _claim(self, worker: str, max_tasks: int, lease_s: float, skip: frozenset[str]
               ) -> tuple[list[Task], int]:
        messages: list[tuple[bytes, dict[bytes, bytes], int]] = []
        declined: list[bytes] = []
        cursor: bytes | str = "0-0"
        for _ in range(10):  # reclaim tasks whose worker went silent, oldest first
            cursor, found, *_ = self.r.xautoclaim(self.stream, self.group, worker, int(lease_s * 1000),
                                                  start_id=cursor, count=max_tasks - len(messages))
            for msg_id, fields in found:
                if fields and fields[b"job"].decode() in skip:
                    declined.append(msg_id)
                elif fields:
                    messages.append((msg_id, fields, self._deliveries(msg_id)))
            if len(messages) >= max_tasks or cursor in (b"0-0", "0-0"):
                break
        if len(messages) < max_tasks:
            for _stream, found in self.r.xreadgroup(self.group, worker, {self.stream: ">"},
                                                    count=max_tasks - len(messages)) or []:
                for msg_id, fields in found:
                    if fields and fields[b"job"].decode() in skip:
                        declined.append(msg_id)
                    elif fields:
                        messages.append((msg_id, fields, 1))
        if declined:
            self.r.eval(DECLINE, 1, self.stream, self.group, worker, str(RELEASED_IDLE_MS), *declined)
        return self._tasks(messages)

    def _deliveries(self, msg_id: bytes) -> int:
        info = self.r.xpending_range(self.stream, self.group, min=msg_id, max=msg_id, count=1)
        return int(info[0]["times_delivered"]) if info else 1

    def _tasks(self, messages: list[tuple[bytes, dict[bytes, bytes], int]]) -> tuple[list[Task], int]:
        jobs: dict[str, dict[str, str] | None] = {}
        tasks = []
        now = time.time()
        for msg_id, fields, deliveries in messages:
            job_id = fields[b"job"].decode()
            if job_id not in jobs:
                try:
                    jobs[job_id] = self._job(job_id)
                    self.r.hsetnx(self._job_key(job_id), "started", now)
                except UnknownJobError:
                    jobs[job_id] = None
            job = jobs[job_id]
            options = RecordOptions.from_dict(json.loads(job["options"])) if job else RecordOptions()
            inputs = decode_inputs(fields[b"inputs"].decode())
            task = Task(job_id, msg_id.decode(), int(fields[b"start"]), inputs, options, deliveries)
            if job is None or job["cancelled"] == "1":
                self._write(task, [])  # acknowledges and drops it
            elif deliveries > self.settings.max_attempts:
                self._write(task, abandoned_records(task, self.settings.max_attempts), abandon=True)
            else:
                tasks.append(task)
        return tasks, len(messages) - len(tasks)

    def extend(self, worker: str, tasks: list[Task], lease_s: float) -> None:
        self._claim_own(worker, tasks, "")

    def release(self, worker: str, tasks: list[Task]) -> None:
        self._claim_own(worker, tasks, str(RELEASED_IDLE_MS))

    def decline(self, worker: str, tasks: list[Task]) -> None:
        if tasks:
            with self._errors():
                self.r.eval(DECLINE, 1, self.stream, self.group, worker, str(RELEASED_IDLE_MS),
                            *[t.task_id for t in tasks])

    def _claim_own(self, worker: str, tasks: list[Task], idle: str) -> None:
        if tasks:
            with self._errors():
                self.r.eval(CLAIM_OWN, 1, self.stream, self.group, worker, idle, *[t.task_id for t in tasks])

    def complete(self, task: Task, records: list[tuple[int, Record]]) -> None:
        with self._errors():
            self._write(task, records)

    def _write(self, task: Task, records: list[tuple[int, Record]], abandon: bool = False) -> None:
        key = self._job_key(task.job_id)
        args: list[Any] = [self.group, task.task_id, time.time(), int(abandon)]
        wires = dict(task.wires())
        for index, record in records:
            args += [index, int(record.ok), record_json(record), "" if record.ok else wires.get(index, "")]
        if self._complete(keys=[key, f"{key}:results", self.stream, f"{key}:failed"], args=args):
            self._maybe_finish(task.job_id)

    def blobs(self, job_id: str, keys: list[str]) -> dict[str, bytes]:
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        with self._errors():
            values = self.r.mget([f"{self.p}:blob:{job_id}:{sha}" for sha in wanted])
        return {sha: bytes(v) for sha, v in zip(wanted, values, strict=True) if v is not None}

    def outstanding(self) -> int:
        with self._errors():
            return int(self.r.xlen(self.stream))

    def close(self) -> None:
        self.r.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _split_prefix(url: str) -> tuple[str, str]:
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), "wanwu")
    return with_query(url, [(k, v) for k, v in query if k != "prefix"]), prefix


@register_queue("redis")
@register_queue("rediss")
def open_redis(parsed: QueueURL) -> RedisQueue:
    return RedisQueue(parsed)
