"""The multi-machine job queue: Redis Streams with one consumer group shared by every worker.

Keys (prefix ``wanwu``, or ``?prefix=NAME`` in the URL):

* ``P:tasks`` — the stream of tasks (job id, first input index, inputs); group ``P:workers``. Workers take
  new tasks with XREADGROUP, and take over tasks idle longer than the lease (their worker died) with
  XAUTOCLAIM; a live worker's heartbeat re-claims its own tasks (XCLAIM, which resets the idle time).
* ``P:job:ID`` — a hash: options, counters (total, done, failed, abandoned), flags (sealed, cancelled), times.
* ``P:job:ID:results`` — a hash from input index to the record's JSON. One Lua script writes a task's
  records with HSETNX, counts only the new ones, and XACKs + XDELs the task, all atomically: a task finished
  twice leaves the same single record per input.
* ``P:blob:ID:SHA256`` — uploaded files (listed in ``P:job:ID:blobs``), deleted when the job is over.
* ``P:jobs`` — a sorted set of job ids by creation time.

Durability is Redis's: run it with AOF or RDB snapshots if queued jobs must survive a Redis restart.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from wanwu.errors import MissingExtraError, QueueError
from wanwu.jobs.base import (
    STALE_SUBMISSION_S,
    JobActivity,
    JobSpec,
    JobStatus,
    QueueURL,
    Task,
    UnknownJobError,
    abandoned_records,
    chunk_tasks,
    decode_inputs,
    new_job_id,
    record_json,
    register_queue,
    with_query,
)
from wanwu.records import Record, RecordOptions

log = logging.getLogger("wanwu")

PIPELINE_TASKS = 256
PIPELINE_BYTES = 32 * 1024 * 1024  # uploads buffered for one round trip: submit holds at most about this much
# Re-claim (or release) only the tasks this worker still owns: XCLAIM with min-idle 0 would otherwise take a
# task back from the worker that already took it over after this one's lease lapsed.
_CLAIM_OWN = """
local n = 0
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    if ARGV[3] == '' then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    else
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    end
    n = n + 1
  end
end
return n
"""
RESULT_PAGE = 1000
RELEASED_IDLE_MS = 10 * 365 * 86400 * 1000  # a released task looks long abandoned: reclaimed at once
ACTIVITY_SCAN = 10_000  # claimed tasks looked at by activity() (workers x tasks per claim, normally far fewer)

# KEYS: job, results, stream · ARGV: group, message id, now, abandoned (0/1), then (index, ok, json)...
COMPLETE_LUA = """
local function ack()
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[3], ARGV[2])
end
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'cancelled') == '1' then
  ack()
  return 0
end
local done, failed = 0, 0
for i = 5, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 2]) == 1 then
    if ARGV[i + 1] == '1' then done = done + 1 else failed = failed + 1 end
  end
end
redis.call('HINCRBY', KEYS[1], 'done', done)
redis.call('HINCRBY', KEYS[1], 'failed', failed)
redis.call('HINCRBY', KEYS[1], 'abandoned', tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'updated', ARGV[3])
ack()
return 1
"""


class RedisQueue:
    def __init__(self, parsed: QueueURL) -> None:
        try:
            import redis
        except ImportError:
            raise MissingExtraError("redis", "queue", "the Redis job queue") from None
        self._errors_base: type[Exception] = redis.exceptions.RedisError
        self._response_error: type[Exception] = redis.exceptions.ResponseError
        self.url = parsed.url
        self.settings = parsed.settings
        url, prefix = _split_prefix(parsed.url)
        self.p = prefix
        self.stream = f"{prefix}:tasks"
        self.group = f"{prefix}:workers"
        with self._errors():
            self.r: Any = redis.Redis.from_url(url, decode_responses=False, socket_connect_timeout=10,
                                          health_check_interval=30)
            self.r.ping()
            self._complete = self.r.register_script(COMPLETE_LUA)
            self._ensure_group()

    # -- plumbing ----------------------------------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except self._errors_base as e:
            raise QueueError(f"Redis job queue {self.url}: {type(e).__name__}: {e}") from None

    def _ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except self._response_error as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _job_key(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def _job(self, job_id: str) -> dict[str, str]:
        raw = self.r.hgetall(self._job_key(job_id))
        if not raw:
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
        key = self._job_key(job_id)
        now = time.time()
        with self._errors():
            self.r.hset(key, mapping={
                "id": job_id, "created": now, "updated": now, "options": json.dumps(spec.options.to_dict()),
                "total": 0, "sealed": 0, "cancelled": 0, "done": 0, "failed": 0, "abandoned": 0,
            })
            self.r.zadd(f"{self.p}:jobs", {job_id: now})
            self.r.zadd(f"{self.p}:unsealed", {job_id: now})  # the submitter's heartbeat: see _fill
            try:
                self._fill(job_id, spec)
            except BaseException:
                self.r.hset(key, "cancelled", 1)
                self._drop_blobs(job_id)
                raise
        return job_id

    def _fill(self, job_id: str, spec: JobSpec) -> None:
        key = self._job_key(job_id)
        for batch in chunk_tasks(spec, max_tasks=PIPELINE_TASKS, max_bytes=PIPELINE_BYTES):
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
            pipe.execute()
        self._maybe_finish(job_id)

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
            self.r.hset(self._job_key(job_id), mapping={"cancelled": 1, "updated": time.time()})
            self._drop_blobs(job_id)
            return self._status(self._job(job_id))

    def delete(self, job_id: str) -> None:
        # Tasks still in the stream find no job when a worker claims them, and are dropped then.
        with self._errors():
            self._job(job_id)
            self._drop_blobs(job_id)
            key = self._job_key(job_id)
            self.r.delete(key, f"{key}:results")
            self.r.zrem(f"{self.p}:jobs", job_id)

    def _drop_blobs(self, job_id: str) -> None:
        members = [m.decode() for m in self.r.smembers(f"{self._job_key(job_id)}:blobs")]
        keys = [f"{self.p}:blob:{job_id}:{sha}" for sha in members]
        for i in range(0, len(keys), 1000):
            self.r.delete(*keys[i : i + 1000])
        self.r.delete(f"{self._job_key(job_id)}:blobs")

    def _maybe_finish(self, job_id: str) -> None:
        status = self._status(self._job(job_id))
        if status.sealed and status.finished >= status.total:
            self._drop_blobs(job_id)

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
                if self.r.exists(self._job_key(job_id)):
                    self.r.hset(self._job_key(job_id), mapping={"cancelled": 1, "updated": time.time()})
                self._drop_blobs(job_id)

    def claim(self, worker: str, max_tasks: int, lease_s: float) -> list[Task]:
        with self._errors():
            self._reap_stale_submissions()
            try:
                return self._claim(worker, max_tasks, lease_s)
            except self._response_error as e:
                if "NOGROUP" not in str(e):
                    raise
                self._ensure_group()  # Redis lost its data (restart without persistence)
                return self._claim(worker, max_tasks, lease_s)

    def _claim(self, worker: str, max_tasks: int, lease_s: float) -> list[Task]:
        messages: list[tuple[bytes, dict[bytes, bytes], int]] = []
        cursor: bytes | str = "0-0"
        for _ in range(10):  # reclaim tasks whose worker went silent, oldest first
            cursor, found, *_ = self.r.xautoclaim(self.stream, self.group, worker, int(lease_s * 1000),
                                                  start_id=cursor, count=max_tasks - len(messages))
            for msg_id, fields in found:
                if fields:
                    messages.append((msg_id, fields, self._deliveries(msg_id)))
            if len(messages) >= max_tasks or cursor in (b"0-0", "0-0"):
                break
        if len(messages) < max_tasks:
            for _stream, found in self.r.xreadgroup(self.group, worker, {self.stream: ">"},
                                                    count=max_tasks - len(messages)) or []:
                messages.extend((msg_id, fields, 1) for msg_id, fields in found if fields)
        return self._tasks(messages)

    def _deliveries(self, msg_id: bytes) -> int:
        info = self.r.xpending_range(self.stream, self.group, min=msg_id, max=msg_id, count=1)
        return int(info[0]["times_delivered"]) if info else 1

    def _tasks(self, messages: list[tuple[bytes, dict[bytes, bytes], int]]) -> list[Task]:
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
        return tasks

    def extend(self, worker: str, tasks: list[Task], lease_s: float) -> None:
        self._claim_own(worker, tasks, "")

    def release(self, worker: str, tasks: list[Task]) -> None:
        self._claim_own(worker, tasks, str(RELEASED_IDLE_MS))

    def _claim_own(self, worker: str, tasks: list[Task], idle: str) -> None:
        if tasks:
            with self._errors():
                self.r.eval(_CLAIM_OWN, 1, self.stream, self.group, worker, idle, *[t.task_id for t in tasks])

    def complete(self, task: Task, records: list[tuple[int, Record]]) -> None:
        with self._errors():
            self._write(task, records)

    def _write(self, task: Task, records: list[tuple[int, Record]], abandon: bool = False) -> None:
        key = self._job_key(task.job_id)
        args: list[Any] = [self.group, task.task_id, time.time(), int(abandon)]
        for index, record in records:
            args += [index, int(record.ok), record_json(record)]
        if self._complete(keys=[key, f"{key}:results", self.stream], args=args):
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


def _split_prefix(url: str) -> tuple[str, str]:
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), "wanwu")
    return with_query(url, [(k, v) for k, v in query if k != "prefix"]), prefix


@register_queue("redis")
@register_queue("rediss")
def open_redis(parsed: QueueURL) -> RedisQueue:
    return RedisQueue(parsed)
