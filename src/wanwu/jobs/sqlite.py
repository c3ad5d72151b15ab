"""The embedded job queue: one SQLite file (WAL), shared safely by the processes of one machine.

Tables: ``jobs`` (metadata and counters), ``tasks`` (unfinished slices of jobs, each with a lease owner and
expiry; a task is deleted when its results are written), ``results`` (one row per (job, input index), written
with INSERT OR IGNORE, so a task finished twice changes nothing) and ``blobs`` (uploaded files, deleted when
the job finishes or is cancelled). Every change is one ``BEGIN IMMEDIATE`` transaction, so a worker killed
at any instant leaves either all of a task's results and its deletion, or none.
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
from urllib.parse import urlsplit

from wanwu.errors import QueueError, UsageError
from wanwu.jobs.base import (
    STALE_SUBMISSION_S,
    JobActivity,
    JobSpec,
    JobStatus,
    QueueURL,
    SubmitBatch,
    Task,
    UnknownJobError,
    abandoned_records,
    chunk_tasks,
    decode_inputs,
    new_job_id,
    record_json,
    register_queue,
)
from wanwu.records import Record, RecordOptions

log = logging.getLogger("wanwu")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL, started REAL,
    options TEXT NOT NULL, total INTEGER NOT NULL DEFAULT 0, sealed INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    abandoned INTEGER NOT NULL DEFAULT 0
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
CREATE TABLE IF NOT EXISTS blobs (
    job_id TEXT NOT NULL, sha256 TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (job_id, sha256)
) WITHOUT ROWID;
"""
JOB_COLUMNS = "id, created, updated, started, options, total, sealed, cancelled, done, failed, abandoned"
COMMIT_EVERY_TASKS = 64
COMMIT_EVERY_BYTES = 64 * 1024 * 1024
RESULT_PAGE = 1000


class SqliteQueue:
    def __init__(self, path: Path, parsed: QueueURL) -> None:
        self.url = parsed.url
        self.settings = parsed.settings
        self.path = path
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=60.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 60000")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            with self._tx():
                for statement in _statements():
                    self._db.execute(statement)
        except (OSError, sqlite3.Error) as e:
            raise QueueError(f"cannot open the job queue {path}: {e}") from None

    # -- plumbing ----------------------------------------------------------------------------------------

    def _tx(self) -> _Transaction:
        return _Transaction(self)

    def _job_row(self, job_id: str) -> tuple[Any, ...]:
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
        now = time.time()
        with self._tx():
            self._db.execute(
                "INSERT INTO jobs (id, created, updated, options) VALUES (?, ?, ?, ?)",
                (job_id, now, now, json.dumps(spec.options.to_dict())),
            )
        try:
            for batch in chunk_tasks(spec, max_tasks=COMMIT_EVERY_TASKS, max_bytes=COMMIT_EVERY_BYTES):
                self._add_tasks(job_id, batch)
        except BaseException:
            self._abort(job_id)
            raise
        return job_id

    def _add_tasks(self, job_id: str, batch: SubmitBatch) -> None:
        with self._tx():
            self._db.executemany("INSERT OR IGNORE INTO blobs (job_id, sha256, data) VALUES (?, ?, ?)",
                                 [(job_id, ref, data) for ref, data in batch.blobs])
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
        except sqlite3.Error:
            pass

    def status(self, job_id: str) -> JobStatus:
        with self._lock:
            return self._status(self._job_row(job_id))

    def jobs(self, limit: int = 50) -> list[JobStatus]:
        with self._lock:
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
            with self._lock:
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
            return self._status(self._job_row(job_id))

    def delete(self, job_id: str) -> None:
        with self._tx():
            self._job_row(job_id)
            for table in ("tasks", "blobs", "results"):
                self._db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

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
        self._db.execute("UPDATE jobs SET cancelled = 1, updated = ? WHERE id = ?", (time.time(), job_id))
        self._db.execute("DELETE FROM tasks WHERE job_id = ?", (job_id,))
        self._db.execute("DELETE FROM blobs WHERE job_id = ?", (job_id,))

    def activity(self, job_id: str) -> JobActivity:
        now = time.time()
        with self._lock:
            self._job_row(job_id)
            rows = self._db.execute("SELECT owner, lease_until FROM tasks WHERE job_id = ?", (job_id,)).fetchall()
        live = [owner for owner, until in rows if owner is not None and until >= now]
        lapsed = sum(owner is not None and until < now for owner, until in rows)
        waiting = sum(owner is None for owner, _ in rows)
        return JobActivity(tuple(sorted(set(live))), len(live), lapsed, waiting)

    # -- workers -----------------------------------------------------------------------------------------

    def claim(self, worker: str, max_tasks: int, lease_s: float) -> list[Task]:
        now = time.time()
        claimed: list[Task] = []
        with self._tx():
            self._reap_stale_submissions(now)
            rows = self._db.execute(
                "SELECT t.id, t.job_id, t.start, t.inputs, t.attempts, j.options FROM tasks t "
                "JOIN jobs j ON j.id = t.job_id WHERE t.lease_until < ? ORDER BY t.id LIMIT ?",
                (now, max_tasks),
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

    def complete(self, task: Task, records: list[tuple[int, Record]]) -> None:
        with self._tx():
            self._write(task, records)

    def _write(self, task: Task, records: list[tuple[int, Record]], abandon: bool = False) -> None:
        row = self._db.execute("SELECT cancelled FROM jobs WHERE id = ?", (task.job_id,)).fetchone()
        if row is None or row[0]:
            self._db.execute("DELETE FROM tasks WHERE id = ?", (int(task.task_id),))
            return  # job gone or cancelled: its remaining work is dropped
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
        self._maybe_finish(task.job_id)

    def _maybe_finish(self, job_id: str) -> None:
        _, _, _, _, _, total, sealed, _, done, failed, _ = self._job_row(job_id)
        if sealed and done + failed >= total:
            self._db.execute("DELETE FROM blobs WHERE job_id = ?", (job_id,))

    def blobs(self, job_id: str, keys: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        wanted = sorted(set(keys))
        with self._lock:
            for i in range(0, len(wanted), 500):
                part = wanted[i : i + 500]
                marks = ",".join("?" * len(part))
                query = f"SELECT sha256, data FROM blobs WHERE job_id = ? AND sha256 IN ({marks})"
                for sha, data in self._db.execute(query, (job_id, *part)):
                    out[sha] = bytes(data)
        return out

    def outstanding(self) -> int:
        with self._lock:
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
            raise QueueError(f"job queue {self.queue.path} is not usable: {e}") from None
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
                raise QueueError(f"job queue write failed: {e}") from None
        finally:
            self.queue._lock.release()
        if isinstance(exc, sqlite3.Error):
            raise QueueError(f"job queue {self.queue.path}: {exc}") from exc


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
    return SqliteQueue(Path(path), parsed)
