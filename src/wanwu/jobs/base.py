"""Jobs: the queue interface every backend implements, the values that cross it, and the URL registry.

A job is a list of inputs plus the options that shape its records (top-k, score kind, threshold); the model
is the worker's. Submission splits the inputs into *tasks* of ``task_size`` inputs, the unit workers claim.
Delivery is at least once: a claimed task carries a lease, a worker that dies lets its lease run out and
another worker reclaims the task. Results are keyed by (job, input index) and written only if absent, so a
task finished twice still leaves exactly one record per input.

Queues are opened by URL (``sqlite:///path``, ``redis://host:port/db``); query parameters ``lease`` (seconds
before a silent worker's task is reclaimed) and ``attempts`` (deliveries before a task is given up, its
inputs recorded as ``internal`` errors) apply to every backend.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from wanwu.errors import ERROR_TYPES, ErrorType, QueueError, UsageError
from wanwu.fetch import FETCHERS
from wanwu.paths import wanwu_home
from wanwu.records import Record, RecordOptions
from wanwu.registry import Registry
from wanwu.sources import InputItem, escape_name, is_url, unescape_name

JobState = Literal["queued", "running", "done", "cancelled", "failed"]
InputKind = str
"""``url``, ``path`` (the ``file`` input kind, by absolute path), ``upload`` (the ``bytes`` kind, its bytes kept in
the queue by sha256), ``missing``, or any other input kind with a reader (:data:`wanwu.fetch.FETCHERS`: ``object``,
a plug-in's), sent by reference as its locator."""
_ITEM_KIND = {"path": "file", "upload": "bytes"}  # the queue's names of two InputItem kinds (its wire keeps them)
DEFAULT_TASK_SIZE = 16
# A submission that has added nothing for this long while unsealed is dead (a killed `jobs submit`): queues
# cancel it and free its uploads when a worker next claims, so it is not "running" for ever.
STALE_SUBMISSION_S = 600.0
QUEUE_ENV = "WANWU_QUEUE"


JOB_ID = re.compile(r"[0-9a-f]{11,16}[0-9a-f]{12}")  # what new_job_id() issues: ms time in hex + 12 hex


class UnknownJobError(QueueError):
    """No job has this id (in this queue)."""

    def __init__(self, job_id: str, message: str | None = None) -> None:
        super().__init__(message or f"no job {job_id!r} in this queue")
        self.job_id = job_id


class LostJobError(UnknownJobError):
    """The job was submitted before the queue's store was emptied (a Redis restart without persistence):
    its status and records are gone, which is not the same as an id that never existed."""

    def __init__(self, job_id: str, reset_at: float) -> None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(reset_at))
        super().__init__(job_id, f"job {job_id!r} was lost: it was submitted before this queue's store was "
                                 f"emptied (first seen empty at {when}; e.g. Redis restarted without "
                                 "persistence), or it was deleted; its records are gone, so submit it again")
        self.reset_at = reset_at


def check_job_id(job_id: str) -> str:
    """``job_id`` if it has the form :func:`new_job_id` issues, else UnknownJobError (so no id can name
    another key of the store, such as ``ID:results``)."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise UnknownJobError(job_id)
    return job_id


def job_created(job_id: str) -> float:
    """When a job was submitted, from its id (seconds since the epoch)."""
    return int(check_job_id(job_id)[:-12], 16) / 1000


@dataclass(frozen=True, slots=True)
class JobInput:
    """One input of a job: an :class:`~wanwu.sources.InputItem` as the queue stores it (``[name, kind, ref]``).
    ``name`` is what its record says; ``ref`` is how a worker finds the bytes.

    url: ``ref`` is the URL · path: ``ref`` is an absolute path, read by workers allowed to read it ·
    upload: ``ref`` is the sha256 of bytes stored in the queue (``data`` only while submitting) ·
    missing: the submitter already knows it fails; ``ref`` is empty, ``error_type`` and ``error`` say why.
    """

    name: str
    kind: InputKind
    ref: str
    data: bytes | None = field(default=None, repr=False, compare=False)
    error_type: ErrorType | None = None
    error: str = ""

    @classmethod
    def url(cls, url: str) -> JobInput:
        return cls(url, "url", url)

    @classmethod
    def path(cls, path: str, name: str | None = None) -> JobInput:
        if not os.path.isabs(path):
            raise UsageError(f"paths in a job must be absolute (workers run elsewhere): {path!r}")
        return cls(name or path, "path", path)

    @classmethod
    def upload(cls, name: str, data: bytes) -> JobInput:
        return cls(name, "upload", hashlib.sha256(data).hexdigest(), data)

    @classmethod
    def missing(cls, name: str, type: ErrorType, message: str) -> JobInput:
        return cls(name, "missing", "", error_type=type, error=message)

    @classmethod
    def parse(cls, text: str) -> JobInput:
        """A URL or an absolute path, as given to the HTTP API."""
        if is_url(text):
            return cls.url(text)
        return cls.path(text)

    @classmethod
    def by_reference(cls, item: InputItem) -> JobInput:
        """``item`` as a reference a worker follows (not for ``bytes`` items: upload those)."""
        if item.kind == "missing":
            return cls.missing(item.input, item.error_type, item.error)
        if item.kind == "file":  # paths travel escaped (sources.escape_name): the queue holds UTF-8
            return cls.path(escape_name(item.locator), name=item.input)
        if item.kind == "url":
            return cls.url(item.input)  # escaped like every name
        return cls(item.input, item.kind, escape_name(item.locator))

    def to_item(self, data: bytes | None = None) -> InputItem:
        """The input item a worker recognizes (``data``: an upload's bytes, fetched from the queue)."""
        if self.kind == "missing":
            type, message = self.failure()
            return InputItem.failed(self.name, message, type)
        if self.kind == "upload":
            if data is None:
                return InputItem.failed(self.name, "the uploaded file is no longer in the queue")
            return InputItem(self.name, "bytes", self.ref, data)
        ref = unescape_name(self.ref) if self.kind == "path" else self.ref
        return InputItem(self.name, _ITEM_KIND.get(self.kind, self.kind), ref)

    def failure(self) -> tuple[ErrorType, str]:
        """For ``missing`` inputs: the error type and message."""
        return self.error_type or "internal", self.error

    def to_wire(self) -> list[str]:
        """``[name, kind, ref]``; a ``missing`` input's third field is ``"<error type>: <message>"``."""
        return [self.name, self.kind, f"{self.error_type}: {self.error}" if self.kind == "missing" else self.ref]

    @classmethod
    def from_wire(cls, wire: list[str]) -> JobInput:
        name, kind, ref = wire
        if kind == "missing":
            type, _, message = ref.partition(": ")
            return cls.missing(name, type if type in ERROR_TYPES else "internal", message)
        if kind not in ("url", "path", "upload") and (kind in ("file", "bytes") or kind not in FETCHERS):
            raise QueueError(f"corrupt task: unknown input kind {kind!r}")
        return cls(name, kind, ref)




@dataclass(frozen=True)
class JobSpec:
    """A job to submit. ``inputs`` may be a generator: queues consume it once, in chunks."""

    inputs: Iterable[JobInput]
    options: RecordOptions = field(default_factory=RecordOptions)
    task_size: int = DEFAULT_TASK_SIZE

    def __post_init__(self) -> None:
        if not 1 <= self.task_size <= 10_000:
            raise UsageError(f"task size must be between 1 and 10000, got {self.task_size}")


@dataclass(frozen=True)
class JobStatus:
    """``done``: inputs with an ok record (``succeeded`` in :meth:`to_dict`) · ``failed``: inputs with an
    error record · ``rate``: records/s since the first task was claimed. ``sealed`` is false while the
    submitter is still adding inputs."""

    id: str
    state: JobState
    total: int
    done: int
    failed: int
    rate: float
    created: float
    updated: float
    options: RecordOptions
    sealed: bool = True
    abandoned: int = 0  # tasks given up after too many deliveries (their inputs have internal errors)

    @classmethod
    def of(
        cls, job_id: str, *, created: float, updated: float, started: float | None, options: str, total: int,
        sealed: bool, cancelled: bool, done: int, failed: int, abandoned: int,
    ) -> JobStatus:
        """A job's status from the counters every queue keeps (``options`` as stored: JSON)."""
        return cls(
            id=job_id,
            state=derive_state(cancelled=cancelled, sealed=sealed, total=total, finished=done + failed,
                               started=started is not None, abandoned=abandoned),
            total=total, done=done, failed=failed, rate=job_rate(done + failed, started, updated),
            created=created, updated=updated, options=RecordOptions.from_dict(json.loads(options)),
            sealed=sealed, abandoned=abandoned,
        )

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def pending(self) -> int:
        return max(0, self.total - self.finished)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None before any record or once nothing runs."""
        if self.state != "running" or self.rate <= 0:
            return None
        return self.pending / self.rate

    def to_dict(self) -> dict[str, Any]:
        """``succeeded`` + ``failed`` + ``pending`` = ``total`` (inputs); ``rate_per_s`` in records per second."""
        eta = self.eta_s
        return {
            "id": self.id, "state": self.state, "total": self.total, "succeeded": self.done,
            "failed": self.failed, "pending": self.pending, "rate_per_s": round(self.rate, 2),
            "eta_s": None if eta is None else round(eta, 1),
            "created": _iso(self.created), "updated": _iso(self.updated), "options": self.options.to_dict(),
            "sealed": self.sealed, "abandoned_tasks": self.abandoned,
        }


@dataclass(frozen=True)
class JobActivity:
    """Who works on a job now. ``workers``: ids of workers holding its tasks under a live lease ·
    ``leased``: tasks held under a live lease · ``lapsed``: tasks whose worker went silent past its lease,
    waiting for another worker to take them over · ``waiting``: tasks no worker has claimed (None: this
    queue cannot count them cheaply)."""

    workers: tuple[str, ...] = ()
    leased: int = 0
    lapsed: int = 0
    waiting: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"workers_active": len(self.workers), "workers": list(self.workers), "tasks_leased": self.leased,
                "tasks_lapsed": self.lapsed, "tasks_waiting": self.waiting}


def derive_state(*, cancelled: bool, sealed: bool, total: int, finished: int, started: bool,
                 abandoned: int) -> JobState:
    """One rule for every backend."""
    if cancelled:
        return "cancelled"
    if sealed and finished >= total:
        return "failed" if abandoned else "done"
    return "running" if started or finished else "queued"


def job_rate(finished: int, started: float | None, updated: float) -> float:
    if not started or finished == 0 or updated <= started:
        return 0.0
    return finished / (updated - started)


@dataclass(frozen=True)
class Task:
    """A claimed slice of a job: inputs ``start .. start+len(inputs)-1``. ``attempt`` counts deliveries."""

    job_id: str
    task_id: str
    start: int
    inputs: tuple[JobInput, ...]
    options: RecordOptions
    attempt: int = 1

    def indexed(self) -> Iterator[tuple[int, JobInput]]:
        return enumerate(self.inputs, self.start)

    def wires(self) -> Iterator[tuple[int, str]]:
        """(input index, the input as stored): what ``jobs retry`` queues again for a failed input."""
        for index, item in self.indexed():
            yield index, json.dumps(item.to_wire(), ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class RetryPlan:
    """What ``jobs retry`` queues again: failed inputs (index, stored form) that can run again, and how many
    cannot (uploads, whose bytes are not kept once a job is over; inputs the submitter already knew failed)."""

    job_id: str
    inputs: tuple[tuple[int, str], ...]
    kept_out: int
    task_size: int = DEFAULT_TASK_SIZE

    @classmethod
    def of(cls, status: JobStatus, failed: dict[int, str]) -> RetryPlan:
        if status.state not in ("done", "failed"):
            raise UsageError(f"job {status.id} is {status.state}: retry its failed inputs once it is over")
        runnable = tuple(sorted((i, w) for i, w in failed.items() if JobInput.from_wire(json.loads(w)).kind
                                in ("url", "path")))
        return cls(status.id, runnable, status.failed - len(runnable))

    def tasks(self) -> Iterator[tuple[int, str]]:
        """(first input index, encoded inputs) for runs of consecutive indexes, at most ``task_size`` each."""
        run: list[tuple[int, str]] = []
        for index, wire in self.inputs:
            if run and (index != run[-1][0] + 1 or len(run) == self.task_size):
                yield run[0][0], "[" + ",".join(w for _, w in run) + "]"
                run = []
            run.append((index, wire))
        if run:
            yield run[0][0], "[" + ",".join(w for _, w in run) + "]"


@dataclass
class SubmitBatch:
    """What a queue writes in one round trip while a job is submitted: uploads first, then whole tasks."""

    blobs: list[tuple[str, bytes]]  # (sha256, data): written before any task that names them
    tasks: list[tuple[int, str]]  # (index of the task's first input, encoded inputs)
    total: int  # inputs in every task written so far, this batch's included
    last: bool = False  # the job is complete: seal it


def chunk_tasks(spec: JobSpec, *, max_tasks: int, max_bytes: int) -> Iterator[SubmitBatch]:
    """Cut ``spec.inputs`` (consumed once, lazily) into tasks of ``spec.task_size`` and group them into
    batches of at most ``max_tasks`` tasks; a batch also ends once ``max_bytes`` of uploads are held, even
    mid-task, so submitting holds that much at most. The last batch has ``last`` set (it may be empty).
    Raises UsageError for an upload without data or a job without inputs."""
    batch = SubmitBatch([], [], 0)
    chunk: list[JobInput] = []
    held = 0
    total = 0
    for item in spec.inputs:
        if item.kind == "upload":
            if item.data is None:
                raise UsageError(f"upload {item.name!r} has no data")
            batch.blobs.append((item.ref, item.data))
            held += len(item.data)
        chunk.append(replace(item, data=None))  # the bytes travel as a blob, once
        total += 1
        if len(chunk) == spec.task_size:
            batch.tasks.append((total - len(chunk), encode_inputs(chunk)))
            batch.total = total
            chunk = []
        if len(batch.tasks) >= max_tasks or held >= max_bytes:
            yield batch
            batch, held = SubmitBatch([], [], batch.total), 0
    if chunk:
        batch.tasks.append((total - len(chunk), encode_inputs(chunk)))
    if total == 0:
        raise UsageError("a job needs at least one input")
    batch.total, batch.last = total, True
    yield batch


def encode_inputs(inputs: Iterable[JobInput]) -> str:
    return json.dumps([i.to_wire() for i in inputs], ensure_ascii=False, separators=(",", ":"))


def decode_inputs(text: str) -> tuple[JobInput, ...]:
    try:
        return tuple(JobInput.from_wire(w) for w in json.loads(text))
    except (ValueError, TypeError) as e:
        raise QueueError(f"corrupt task in the queue: {e}") from None


def record_json(record: Record) -> str:
    return json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":"))


def abandoned_records(task: Task, max_attempts: int) -> list[tuple[int, Record]]:
    message = f"gave up after {max_attempts} deliveries of its task: each worker stopped while processing it"
    return [(index, Record.failure(item.name, "internal", message)) for index, item in task.indexed()]


def with_english(records: Iterator[Record]) -> tuple[bool, Iterator[Record]]:
    """Whether the records carry English label names (``label_en``: the worker's label file has them), and
    the records again: looks ahead to the first record with predictions, so CSV gets its label_en columns."""
    seen: list[Record] = []
    for record in records:
        seen.append(record)
        if record.predictions:
            return record.predictions[0].label_en is not None, itertools.chain(seen, records)
    return False, iter(seen)


def new_job_id() -> str:
    """Sortable by creation time (to the millisecond), unguessable."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(6)}"


class JobQueue(Protocol):
    """What front ends (CLI, HTTP) and workers need from a queue. Safe to share across threads."""

    url: str
    settings: QueueSettings

    # -- front ends ---------------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> str: ...

    def status(self, job_id: str) -> JobStatus: ...

    def results(self, job_id: str) -> Iterator[Record]:
        """Records so far, in input order."""
        ...

    def cancel(self, job_id: str) -> JobStatus: ...

    def delete(self, job_id: str) -> None:
        """Cancel the job and forget it: its status, records and uploads. Raises UnknownJobError."""
        ...

    def retry(self, job_id: str) -> RetryPlan:
        """Queue the failed inputs of a job that is over again (their error records are removed), so its
        workers run only those. UsageError while the job is still queued or running."""
        ...

    def jobs(self, limit: int = 50) -> list[JobStatus]:
        """The most recently created jobs, newest first."""
        ...

    def activity(self, job_id: str) -> JobActivity:
        """Which workers hold the job's unfinished tasks, and how many tasks wait on a lapsed lease."""
        ...

    # -- workers ------------------------------------------------------------------------------------------
    def claim(self, worker: str, max_tasks: int, lease_s: float, skip: frozenset[str] = frozenset()
              ) -> list[Task]:
        """Take up to ``max_tasks``: new ones, or ones whose worker has been silent for ``lease_s``; none of
        the jobs in ``skip`` (this worker declined them: their tasks stay free for other workers).

        Every worker of a queue should use the same lease (the URL's ``lease``): depending on the backend
        it is enforced by the holder (SQLite: lease expiry) or by the taker (Redis: idle time).
        """
        ...

    def extend(self, worker: str, tasks: list[Task], lease_s: float) -> None: ...

    def release(self, worker: str, tasks: list[Task]) -> None:
        """Give tasks back now, unfinished (a worker stopping)."""
        ...

    def decline(self, worker: str, tasks: list[Task]) -> None:
        """Give tasks back as if never delivered: this worker may not read them (their delivery does not
        count toward ``attempts``), so a worker that may takes them at once."""
        ...

    def complete(self, task: Task, records: list[tuple[int, Record]]) -> None:
        """Write each (input index, record) unless one exists; mark the task done. Idempotent."""
        ...

    def blobs(self, job_id: str, keys: list[str]) -> dict[str, bytes]: ...

    def outstanding(self) -> int:
        """Tasks not yet completed, claimed or not, over all jobs."""
        ...

    def health(self) -> list[str]:
        """Warnings an operator should see at start-up (e.g. a store that keeps nothing on disk)."""
        ...

    def close(self) -> None: ...


# --- opening a queue by URL ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueSettings:
    """``retry_s``: how long a submission keeps retrying a queue that is briefly unavailable (``retry=``)
    · ``max_upload_mb``: the queue's budget for uploaded files held at once (``max_upload_mb=``; None: the
    backend's default)."""

    lease_s: float = 60.0
    max_attempts: int = 5
    retry_s: float = 120.0
    max_upload_mb: float | None = None

    def __post_init__(self) -> None:
        if self.lease_s <= 0 or self.max_attempts < 1 or self.retry_s < 0:
            raise UsageError("queue: lease must be > 0 seconds, attempts >= 1 and retry >= 0 seconds")
        if self.max_upload_mb is not None and self.max_upload_mb < 0:
            raise UsageError("queue: max_upload_mb must be >= 0")


@dataclass(frozen=True)
class QueueURL:
    """A parsed queue URL: ``url`` without wanwu's own query parameters, which become ``settings``."""

    scheme: str
    url: str
    settings: QueueSettings


QueueFactory = Callable[[QueueURL], JobQueue]
# Queue backends by URL scheme; lazy built-ins keep redis-py optional; plug-ins: the wanwu.queues entry points.
QUEUES: Registry[QueueFactory] = Registry("job queue", group="wanwu.queues")
QUEUES.lazy("sqlite", "wanwu.jobs.sqlite:open_sqlite")
QUEUES.lazy("redis", "wanwu.jobs.redis:open_redis", extra="queue")
QUEUES.lazy("rediss", "wanwu.jobs.redis:open_redis", extra="queue")


def register_queue(scheme: str) -> Callable[[QueueFactory], QueueFactory]:
    return QUEUES.register(scheme)


def default_queue_url() -> str:
    return os.environ.get(QUEUE_ENV) or f"sqlite:///{(wanwu_home() / 'jobs.sqlite3').absolute()}".replace(
        ":////", ":///")


def parse_queue_url(url: str) -> QueueURL:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in QUEUES:
        known = ", ".join(sorted(QUEUES.names()))
        raise UsageError(f"queue URL {redact_url(url)!r}: unknown scheme {parts.scheme!r}; use one of "
                         f"{known}, e.g. sqlite:///path/jobs.sqlite3 or redis://host:6379/0")
    ours: dict[str, str] = {}
    rest = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ("lease", "attempts", "retry", "max_upload_mb"):
            ours[key] = value
        else:
            rest.append((key, value))
    try:
        budget = ours.get("max_upload_mb")
        settings = QueueSettings(
            lease_s=float(ours.get("lease", QueueSettings.lease_s)),
            max_attempts=int(ours.get("attempts", QueueSettings.max_attempts)),
            retry_s=float(ours.get("retry", QueueSettings.retry_s)),
            max_upload_mb=None if budget is None else float(budget),
        )
    except ValueError as e:
        raise UsageError(f"queue URL {redact_url(url)!r}: bad lease/attempts/retry/max_upload_mb value ({e})"
                         ) from None
    return QueueURL(scheme, with_query(url, rest), settings)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (and a lone user name too: Redis takes a password
    alone as ``redis://:SECRET@host`` or ``redis://SECRET@host``), for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<queue URL>"
    if "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    hidden = f"{user}:***" if colon and user else "***"
    return urlunsplit((parts.scheme, f"{hidden}@{host}", parts.path, parts.query, parts.fragment))


def with_query(url: str, query: list[tuple[str, str]]) -> str:
    """``url`` with its query string replaced (the rest kept verbatim: ``sqlite:////abs`` stays so)."""
    base = url.split("#", 1)[0].split("?", 1)[0]
    return f"{base}?{urlencode(query)}" if query else base


def open_queue(url: str | None = None) -> JobQueue:
    """Open the queue at ``url`` (default ``$WANWU_QUEUE`` or SQLite under ``$WANWU_HOME``)."""
    parsed = parse_queue_url(url or default_queue_url())
    return QUEUES.get(parsed.scheme)(parsed)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else ""
