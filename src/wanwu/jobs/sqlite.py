"""The embedded job queue: one SQLite file (WAL), shared safely by the processes of one machine.

Tables: ``jobs`` (metadata and counters), ``tasks`` (unfinished slices of jobs, each with a lease owner and
expiry; a task is deleted when its results are written), ``results`` (one row per (job, input index), written
with INSERT OR IGNORE, so a task finished twice changes nothing) and ``blobs`` (uploaded files, deleted when
the job finishes or is cancelled). Every change is one ``BEGIN IMMEDIATE`` transaction, so a worker killed
at any instant leaves either all of a task's results and its deletion, or none.

The file gives space back: it is created with ``auto_vacuum = INCREMENTAL``, and the pages a finished,
cancelled or deleted job freed are returned to the file system (an older file is converted by a full
``VACUUM`` on the first ``delete``); the WAL is truncated after each. Another process holding the write lock
past the busy timeout (``?timeout=SECONDS``, default 60) is a :class:`QueueUnavailableError`: retried by
workers and submissions, not fatal.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from wanwu.errors import QueueError, QueueStorageError, QueueUnavailableError, UsageError
from wanwu.jobs.base import (
    STALE_SUBMISSION_S,
    JobActivity,
    JobSpec,
    JobStatus,
    QueueURL,
    RetryPlan,
    SubmitBatch,
    Task,
    UnknownJobError,
    abandoned_records,
    check_job_id,
    chunk_tasks,
    decode_inputs,
    new_job_id,
    record_json,
    redact_url,
    register_queue,
)
from wanwu.jobs.retry import retrying
from wanwu.records import Record, RecordOptions

log = logging.getLogger("wanwu")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL, started REAL,
    options TEXT NOT NULL, total INTEGER NOT NULL DEFAULT 0, sealed INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    abandoned INTEGER NOT NULL DEFAULT 0, upload_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, start INTEGER NOT NULL, inputs TEXT NOT NULL,
    owner TEXT, lease_until REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_job ON tasks(job_id);
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, ok INTEGER NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failed_inputs (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, input TEXT NOT NULL, PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    job_id TEXT NOT NULL, sha256 TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (job_id, sha256)
) WITHOUT ROWID;
"""
JOB_COLUMNS = "id, created, updated, started, options, total, sealed, cancelled, done, failed, abandoned"
COMMIT_EVERY_TASKS = 64
COMMIT_EVERY_BYTES = 64 * 1024 * 1024
RESULT_PAGE = 1000
DEFAULT_MAX_UPLOAD_MB = 16384.0  # uploads held on disk at once, over all unfinished jobs
DEFAULT_BUSY_S = 60.0


class SqliteQueue:
    def __init__(self, path: Path, parsed: QueueURL, busy_s: float = DEFAULT_BUSY_S) -> None:
        self.url = redact_url(parsed.url)
        self.settings = parsed.settings
        budget = parsed.settings.max_upload_mb
        self.max_upload_bytes = int((DEFAULT_MAX_UPLOAD_MB if budget is None else budget) * 1024 * 1024)
        self.path = path
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=busy_s, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_s * 1000)}")
            if self._db.execute("PRAGMA page_count").fetchone()[0] == 0:  # a new file (no lock needed else)
                self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA journal_size_limit = 67108864")
            if not self._schema_ready():  # else no write at open: readers open a queue whose lock is held
                with self._tx():
                    for statement in _statements():
                        self._db.execute(statement)
                    if not self._schema_ready():  # a file from before the upload budget
                        self._db.execute("ALTER TABLE jobs ADD COLUMN upload_bytes INTEGER NOT NULL DEFAULT 0")
        except QueueError:
            raise
        except (OSError, sqlite3.Error) as e:
            raise _queue_error(f"cannot open the job queue {path}", e) from None

    def _schema_ready(self) -> bool:
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        return {"jobs", "tasks", "results", "blobs", "failed_inputs"} <= tables and "upload_bytes" in columns

    def health(self) -> list[str]:
        return []

    # -- plumbing ----------------------------------------------------------------------------------------

    def _tx(self) -> _Transaction:
        return _Transaction(self)

    def _read(self) -> _Read:
        return _Read(self)

    def _job_row(self, job_id: str) -> tuple[Any, ...]:
        check_job_id(job_id)
        row = self._db.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,),
        ).fetchone()
        if row is None:
            raise UnknownJobError(job_id)
        return tuple(row)

    @staticmethod
    def _status(row: tuple[Any, ...]) -> JobStatus:
        job_id, created, updated, started, options, total, sealed, cancelled, done, failed, abandoned = row
        return JobStatus.of(
            job_id, created=created, updated=updated, started=started, options=options, total=total,
            sealed=bool(sealed), cancelled=bool(cancelled), done=done, failed=failed, abandoned=abandoned,
        )

    # -- front ends ---------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        job_id = new_job_id()
        retrying(lambda: self._insert_job(job_id, spec), "submitting a job", deadline_s=self.settings.retry_s)
        try:
            for batch in chunk_tasks(spec, max_tasks=COMMIT_EVERY_TASKS, max_bytes=COMMIT_EVERY_BYTES):
                retrying(lambda b=batch: self._add_tasks(job_id, b), f"submitting job {job_id}",  # type: ignore[misc]
                         deadline_s=self.settings.retry_s)
        except BaseException:
            self._abort(job_id)
            raise
        return job_id

    def _insert_job(self, job_id: str, spec: JobSpec) -> None:
        now = time.time()
        with self._tx():
            self._db.execute("INSERT OR IGNORE INTO jobs (id, created, updated, options) VALUES (?, ?, ?, ?)",
                             (job_id, now, now, json.dumps(spec.options.to_dict())))

    def _add_tasks(self, job_id: str, batch: SubmitBatch) -> None:
        """One transaction (all or nothing: safe to repeat after a failure)."""
        with self._tx():
            blobs = dict(batch.blobs)
            if blobs:
                held = self._db.execute("SELECT COALESCE(SUM(upload_bytes), 0) FROM jobs").fetchone()[0]
                wanted = sum(len(d) for d in blobs.values())
                if held + wanted > self.max_upload_bytes:
                    raise QueueStorageError(
                        f"the queue {self.path} holds {held / 2**20:.0f} MB of uploaded files and its budget is "
                        f"{self.max_upload_bytes / 2**20:.0f} MB (max_upload_mb= in the queue URL): wait for jobs "
                        "to finish or delete finished ones, or submit files by reference (--by-reference)")
                cur = self._db.executemany("INSERT OR IGNORE INTO blobs (job_id, sha256, data) VALUES (?, ?, ?)",
                                           [(job_id, ref, data) for ref, data in blobs.items()])
                if cur.rowcount > 0:
                    added = sum(len(d) for d in blobs.values())  # new in this transaction, bar rare repeats
                    self._db.execute("UPDATE jobs SET upload_bytes = upload_bytes + ? WHERE id = ?", (added, job_id))
            self._db.executemany("INSERT INTO tasks (job_id, start, inputs) VALUES (?, ?, ?)",
                                 [(job_id, start, inputs) for start, inputs in batch.tasks])
            self._db.execute("UPDATE jobs SET total = ?, sealed = ?, updated = ? WHERE id = ?",
                             (batch.total, int(batch.last), time.time(), job_id))
            if batch.last:
                self._maybe_finish(job_id)

    def _abort(self, job_id: str) -> None:
        """A submission that failed half-way is cancelled, so no worker spends time on a partial job."""
        try:
            with self._tx():
                self._cancel(job_id)
        except (sqlite3.Error, QueueError):
            pass

    def status(self, job_id: str) -> JobStatus:
        with self._read():
            return self._status(self._job_row(job_id))

    def jobs(self, limit: int = 50) -> list[JobStatus]:
        with self._read():
            rows = self._db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY created DESC LIMIT ?", (limit,),
            ).fetchall()
        return [self._status(tuple(r)) for r in rows]

    def results(self, job_id: str) -> Iterator[Record]:
        self.status(job_id)  # raises UnknownJobError now, not on first iteration
        return self._results(job_id)

    def _results(self, job_id: str) -> Iterator[Record]:
        last = -1
        while True:
            with self._read():
                rows = self._db.execute(
                    "SELECT idx, record FROM results WHERE job_id = ? AND idx > ? ORDER BY idx LIMIT ?",
                    (job_id, last, RESULT_PAGE),
                ).fetchall()
            for idx, text in rows:
                last = idx
                yield Record.from_dict(json.loads(text))
            if len(rows) < RESULT_PAGE:
                return

    def cancel(self, job_id: str) -> JobStatus:
        with self._tx():
            self._job_row(job_id)
            self._cancel(job_id)
            status = self._status(self._job_row(job_id))
        self._reclaim()
        return status

    def delete(self, job_id: str) -> None:
        with self._tx():
            self._job_row(job_id)
            for table in ("tasks", "blobs", "results", "failed_inputs"):
                self._db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        self._reclaim(convert=True)

    def retry(self, job_id: str) -> RetryPlan:
        with self._tx():
            status = self._status(self._job_row(job_id))
            rows = self._db.execute(  # failed inputs whose record is (still) an error
                "SELECT f.idx, f.input FROM failed_inputs f JOIN results r ON r.job_id = f.job_id AND r.idx = f.idx "
                "WHERE f.job_id = ? AND r.ok = 0", (job_id,)).fetchall()
            plan = RetryPlan.of(status, dict(rows))
            if plan.inputs:
                indexes = [(job_id, i) for i, _ in plan.inputs]
                self._db.executemany("DELETE FROM results WHERE job_id = ? AND idx = ?", indexes)
                self._db.executemany("DELETE FROM failed_inputs WHERE job_id = ? AND idx = ?", indexes)
                self._db.execute("UPDATE jobs SET failed = failed - ?, abandoned = 0, updated = ? WHERE id = ?",
                                 (len(plan.inputs), time.time(), job_id))
                self._db.executemany("INSERT INTO tasks (job_id, start, inputs) VALUES (?, ?, ?)",
                                     [(job_id, start, inputs) for start, inputs in plan.tasks()])
            return plan

    def _reclaim(self, convert: bool = False) -> None:
        """Give free pages back to the file system and checkpoint the WAL. Best effort: a busy queue is left
        as it is (the next reclaim catches up). ``convert`` (an explicit delete): an older file without
        incremental vacuum is converted by a full VACUUM (once), and the WAL is truncated, which waits for
        other writers; otherwise the checkpoint is passive (never waits) and ``journal_size_limit`` trims
        the WAL."""
        with self._lock:
            try:
                mode = self._db.execute("PRAGMA auto_vacuum").fetchone()[0]
                if mode == 0 and convert:
                    self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
                    self._db.execute("VACUUM")
                elif mode == 2:  # executescript steps it to the end (one step frees one page)
                    self._db.executescript("PRAGMA incremental_vacuum;")
                checkpoint = "TRUNCATE" if convert else "PASSIVE"
                self._db.execute(f"PRAGMA wal_checkpoint({checkpoint})").fetchall()
            except sqlite3.Error as e:
                log.debug("job queue %s: space not reclaimed now (%s)", self.path, e)

    def _reap_stale_submissions(self, now: float) -> None:
        stale = self._db.execute(
            "SELECT id FROM jobs WHERE sealed = 0 AND cancelled = 0 AND updated < ?", (now - STALE_SUBMISSION_S,)
        ).fetchall()
        for (job_id,) in stale:
            log.warning("job %s: its submission stopped before it was complete; cancelling it", job_id)
            self._cancel(job_id)

    def _cancel(self, job_id: str) -> None:
        _, _, _, _, _, total, sealed, cancelled, done, failed, _ = self._job_row(job_id)
        if cancelled or (sealed and done + failed >= total):
            return  # already over: cancelling changes nothing
        self._db.execute("UPDATE jobs SET cancelled = 1, upload_bytes = 0, updated = ? WHERE id = ?",
                         (time.time(), job_id))
        self._db.execute("DELETE FROM tasks WHERE job_id = ?", (job_id,))
        self._db.execute("DELETE FROM blobs WHERE job_id = ?", (job_id,))

    def activity(self, job_id: str) -> JobActivity:
        now = time.time()
        with self._read():
            self._job_row(job_id)
            rows = self._db.execute("SELECT owner, lease_until FROM tasks WHERE job_id = ?", (job_id,)).fetchall()
        live = [owner for owner, until in rows if owner is not None and until >= now]
        lapsed = sum(owner is not None and until < now for owner, until in rows)
        waiting = sum(owner is None for owner, _ in rows)
        return JobActivity(tuple(sorted(set(live))), len(live), lapsed, waiting)

    # -- workers -----------------------------------------------------------------------------------------

    def claim(self, worker: str, max_tasks: int, lease_s: float, skip: frozenset[str] = frozenset()
              ) -> list[Task]:
        now = time.time()
        claimed: list[Task] = []
        avoid = sorted(skip)[:500]
        with self._tx():
            self._reap_stale_submissions(now)
            rows = self._db.execute(
                "SELECT t.id, t.job_id, t.start, t.inputs, t.attempts, j.options FROM tasks t "
                "JOIN jobs j ON j.id = t.job_id WHERE t.lease_until < ? "
                f"AND t.job_id NOT IN ({','.join('?' * len(avoid))}) ORDER BY t.id LIMIT ?",
                (now, *avoid, max_tasks),
            ).fetchall()
            for task_id, job_id, start, inputs, attempts, options in rows:
                task = Task(job_id, str(task_id), start, decode_inputs(inputs),
                            RecordOptions.from_dict(json.loads(options)), attempts + 1)
                if attempts >= self.settings.max_attempts:
                    self._write(task, abandoned_records(task, self.settings.max_attempts), abandon=True)
                    continue
                self._db.execute(
                    "UPDATE tasks SET owner = ?, lease_until = ?, attempts = attempts + 1 WHERE id = ?",
                    (worker, now + lease_s, task_id),
                )
                self._db.execute("UPDATE jobs SET started = COALESCE(started, ?) WHERE id = ?", (now, job_id))
                claimed.append(task)
        return claimed

    def extend(self, worker: str, tasks: list[Task], lease_s: float) -> None:
        if not tasks:
            return
        with self._tx():
            self._db.executemany(
                "UPDATE tasks SET lease_until = ? WHERE id = ? AND owner = ?",
                [(time.time() + lease_s, int(t.task_id), worker) for t in tasks],
            )

    def release(self, worker: str, tasks: list[Task]) -> None:
        if not tasks:
            return
        with self._tx():
            self._db.executemany("UPDATE tasks SET lease_until = 0, owner = NULL WHERE id = ? AND owner = ?",
                                 [(int(t.task_id), worker) for t in tasks])

    def decline(self, worker: str, tasks: list[Task]) -> None:
        if not tasks:
            return
        with self._tx():
            self._db.executemany("UPDATE tasks SET lease_until = 0, owner = NULL, attempts = MAX(attempts - 1, 0) "
                                 "WHERE id = ? AND owner = ?", [(int(t.task_id), worker) for t in tasks])

    def complete(self, task: Task, records: list[tuple[int, Record]]) -> None:
        with self._tx():
            finished = self._write(task, records)
        if finished:
            self._reclaim()

    def _write(self, task: Task, records: list[tuple[int, Record]], abandon: bool = False) -> bool:
        """Write a task's records; True when that finished its job."""
        row = self._db.execute("SELECT cancelled FROM jobs WHERE id = ?", (task.job_id,)).fetchone()
        if row is None or row[0]:
            self._db.execute("DELETE FROM tasks WHERE id = ?", (int(task.task_id),))
            return False  # job gone or cancelled: its remaining work is dropped
        wires = dict(task.wires())
        self._db.executemany("INSERT OR REPLACE INTO failed_inputs (job_id, idx, input) VALUES (?, ?, ?)",
                             [(task.job_id, i, wires[i]) for i, r in records if not r.ok and i in wires])
        counts = []
        for ok in (True, False):
            rows = [(task.job_id, i, int(ok), record_json(r)) for i, r in records if r.ok is ok]
            cur = self._db.executemany(
                "INSERT OR IGNORE INTO results (job_id, idx, ok, record) VALUES (?, ?, ?, ?)", rows
            )
            counts.append(max(cur.rowcount, 0) if rows else 0)
        self._db.execute(
            "UPDATE jobs SET done = done + ?, failed = failed + ?, abandoned = abandoned + ?, updated = ? "
            "WHERE id = ?", (counts[0], counts[1], int(abandon), time.time(), task.job_id),
        )
        self._db.execute("DELETE FROM tasks WHERE id = ?", (int(task.task_id),))
        return self._maybe_finish(task.job_id)

    def _maybe_finish(self, job_id: str) -> bool:
        _, _, _, _, _, total, sealed, _, done, failed, _ = self._job_row(job_id)
        if sealed and done + failed >= total:
            self._db.execute("DELETE FROM blobs WHERE job_id = ?", (job_id,))
            self._db.execute("UPDATE jobs SET upload_bytes = 0 WHERE id = ?", (job_id,))
            return True
        return False

    def blobs(self, job_id: str, keys: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        wanted = sorted(set(keys))
        with self._read():
            for i in range(0, len(wanted), 500):
                part = wanted[i : i + 500]
                marks = ",".join("?" * len(part))
                query = f"SELECT sha256, data FROM blobs WHERE job_id = ? AND sha256 IN ({marks})"
                for sha, data in self._db.execute(query, (job_id, *part)):
                    out[sha] = bytes(data)
        return out

    def outstanding(self) -> int:
        with self._read():
            return int(self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` under the connection's lock (rollback on any exception)."""

    def __init__(self, queue: SqliteQueue) -> None:
        self.queue = queue

    def __enter__(self) -> None:
        self.queue._lock.acquire()
        try:
            self.queue._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            self.queue._lock.release()
            raise _queue_error(f"job queue {self.queue.path} is not usable", e) from None
        except BaseException:
            self.queue._lock.release()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc_type is None:
                self.queue._db.execute("COMMIT")
            else:
                self.queue._db.execute("ROLLBACK")
        except sqlite3.Error as e:
            if exc_type is None:
                raise _queue_error(f"job queue {self.queue.path}: write failed", e) from None
        finally:
            self.queue._lock.release()
        if isinstance(exc, sqlite3.Error):
            raise _queue_error(f"job queue {self.queue.path}", exc) from exc


class _Read:
    """A read under the connection's lock; SQLite errors become queue errors."""

    def __init__(self, queue: SqliteQueue) -> None:
        self.queue = queue

    def __enter__(self) -> None:
        self.queue._lock.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.queue._lock.release()
        if isinstance(exc, sqlite3.Error):
            raise _queue_error(f"job queue {self.queue.path}", exc) from exc


def _queue_error(what: str, e: Exception) -> QueueError:
    """Another process holding the lock past the busy timeout passes; anything else is the file's fault."""
    text = str(e)
    if isinstance(e, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        return QueueUnavailableError(f"{what}: {text} (another process holds its write lock)")
    return QueueError(f"{what}: {text}")


def _statements() -> list[str]:
    return [s.strip() for s in SCHEMA.split(";") if s.strip()]


@register_queue("sqlite")
def open_sqlite(parsed: QueueURL) -> SqliteQueue:
    parts = urlsplit(parsed.url)
    if parts.netloc:
        raise UsageError(f"queue URL {parsed.url!r}: use sqlite:///absolute/path (three slashes) "
                         "or sqlite:relative/path")
    if not parts.path:
        raise UsageError(f"queue URL {parsed.url!r} names no file")
    path = "/" + parts.path.lstrip("/") if parts.path.startswith("/") else parts.path  # 3 or 4 slashes
    query = dict(parse_qsl(parts.query))
    try:
        busy_s = float(query.get("timeout", DEFAULT_BUSY_S))
    except ValueError:
        raise UsageError(f"queue URL {parsed.url!r}: timeout must be a number of seconds") from None
    return SqliteQueue(Path(path), parsed, busy_s)
