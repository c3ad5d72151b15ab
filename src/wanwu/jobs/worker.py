"""A queue worker: claim tasks, run them through the one :class:`~wanwu.pipeline.Recognizer`, write records.

The model is loaded once per worker; each claim takes a few tasks at once (enough for about two inference
batches) and streams all their inputs through one ``recognize`` call, so decoding and inference overlap as
in the plain CLI. A task's records are written (and the task acknowledged) as soon as its last record
arrives. A heartbeat thread extends the leases of held tasks, so only a worker that has stopped (killed,
hung machine, lost network) loses them.

Paths are read only under the operator's ``allow_roots``; any other path becomes an error record, never a
read. Uploaded inputs come from the queue's blob store.

A worker outlives its queue's bad minutes: every queue call is retried with capped backoff while the store
is unavailable (:mod:`wanwu.jobs.retry`), records in hand are written once it is back, and a task's inputs
are checked against its job before they are read, so a cancelled or deleted job costs no more work. No input
can stop a worker: when a group of tasks fails as a whole, its inputs are recognized one at a time and any
exception becomes that input's ``internal`` error record.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wanwu.errors import QueueError, QueueUnavailableError
from wanwu.jobs.base import JobInput, JobQueue, Task, UnknownJobError
from wanwu.jobs.retry import Outages, retrying
from wanwu.pipeline import Recognizer
from wanwu.records import Record, RecordOptions
from wanwu.sources import InputItem, escape_name, unescape_name

log = logging.getLogger("wanwu")


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


@dataclass(frozen=True)
class WorkerConfig:
    allow_roots: tuple[Path, ...] = ()  # folders whose files jobs may name by path; none = URLs/uploads only
    lease_s: float | None = None  # None: the queue URL's lease
    tasks_per_claim: int = 4
    poll_s: float = 1.0  # wait between claims while the queue is empty
    max_tasks: int | None = None  # stop after this many tasks (benchmarks, tests)
    exit_when_idle: bool = False  # stop once no task is left in the queue, claimed or not
    worker_id: str = field(default_factory=default_worker_id)
    on_progress: Callable[[WorkerStats], None] | None = None  # called after each claim's tasks are written
    # The heartbeat keeps leases only while records keep coming: after this long with none (a stuck decode,
    # a hung backend), it stops renewing, so the tasks go back to the queue for another worker.
    # None: max(4 × lease, 120 s) (a URL fetch has its own deadline, 30 s by default).
    stall_s: float | None = None


@dataclass
class WorkerStats:
    tasks: int = 0
    records: int = 0
    failed: int = 0  # error records among ``records``
    started: float = field(default_factory=time.monotonic)
    outages: Outages = field(default_factory=Outages)  # the queue's unavailable spells this worker rode out

    @property
    def rate(self) -> float:
        """Records per second since the worker started (idle time included)."""
        elapsed = time.monotonic() - self.started
        return self.records / elapsed if elapsed > 0 else 0.0


def run_worker(queue: JobQueue, recognizer: Recognizer, config: WorkerConfig,
               stop: threading.Event | None = None) -> WorkerStats:
    """Work until ``stop`` is set (between claims), ``max_tasks`` are done, or the queue is idle."""
    stop = stop or threading.Event()
    lease = config.lease_s or queue.settings.lease_s
    roots = _Roots(config.allow_roots)
    stats = WorkerStats()
    calls = _Calls(queue, stop, stats.outages)
    stall = config.stall_s if config.stall_s is not None else max(4 * lease, 120.0)
    heartbeat = _Heartbeat(queue, config.worker_id, lease, stall)
    heartbeat.start()
    idle = 0
    try:
        while not stop.is_set():
            want = config.tasks_per_claim
            if config.max_tasks is not None:
                want = min(want, config.max_tasks - stats.tasks)
                if want <= 0:
                    break
            tasks = roots.keep_readable(calls, config.worker_id, calls.claim(config.worker_id, want, lease,
                                                                             roots.skip()))
            if not tasks:
                idle += 1
                # Idle: nothing left, or (for a worker that declined jobs) nothing it may read for a while.
                if config.exit_when_idle and (calls.outstanding() == 0 or (roots.declined and idle >= 3)):
                    break
                stop.wait(config.poll_s)
                continue
            idle = 0
            heartbeat.hold(tasks)
            try:
                _process(calls, recognizer, tasks, roots, stats, heartbeat)
            except BaseException:
                unfinished = heartbeat.held()
                log.warning("worker stopping: giving back %d unfinished task(s)", len(unfinished))
                calls.release(config.worker_id, unfinished)
                raise
            finally:
                heartbeat.drop_all()
            if config.on_progress is not None:
                config.on_progress(stats)
    finally:
        heartbeat.stop()
    return stats


class _Calls:
    """The queue calls a worker makes, each retried while the queue is unavailable. Claims give up when the
    worker is asked to stop; writing records in hand does not (a second signal interrupts it)."""

    def __init__(self, queue: JobQueue, stop: threading.Event, outages: Outages) -> None:
        self.queue = queue
        self.stop = stop
        self.outages = outages

    def claim(self, worker: str, max_tasks: int, lease_s: float, skip: frozenset[str]) -> list[Task]:
        try:
            return retrying(lambda: self.queue.claim(worker, max_tasks, lease_s, skip), "claiming tasks",
                            stop=self.stop, outages=self.outages)
        except QueueUnavailableError:
            return []  # stopping during an outage

    def decline(self, worker: str, tasks: list[Task]) -> None:
        retrying(lambda: self.queue.decline(worker, tasks), "giving tasks back", outages=self.outages)

    def outstanding(self) -> int:
        try:
            return retrying(self.queue.outstanding, "counting tasks", stop=self.stop, outages=self.outages)
        except QueueUnavailableError:
            return 1

    def complete(self, task: Task, records: list[tuple[int, Record]]) -> None:
        retrying(lambda: self.queue.complete(task, records), f"writing the records of job {task.job_id}",
                 outages=self.outages)

    def blobs(self, job_id: str, keys: list[str]) -> dict[str, bytes]:
        return retrying(lambda: self.queue.blobs(job_id, keys), f"reading the uploads of job {job_id}",
                        outages=self.outages)

    def release(self, worker: str, tasks: list[Task]) -> None:
        """Best effort, briefly: a task not given back returns to the queue when its lease runs out."""
        try:
            retrying(lambda: self.queue.release(worker, tasks), "giving tasks back", deadline_s=10.0)
        except QueueError as e:
            log.warning("could not give back %d task(s) (%s): they return when their lease runs out",
                        len(tasks), e)

    def stopped(self, job_id: str) -> bool:
        """The job was cancelled or deleted (its remaining inputs are not worth reading). Never blocks."""
        try:
            return self.queue.status(job_id).state == "cancelled"
        except UnknownJobError:
            return True
        except QueueError:
            return False


def _process(calls: _Calls, recognizer: Recognizer, tasks: list[Task], roots: _Roots, stats: WorkerStats,
             heartbeat: _Heartbeat) -> None:
    by_options: dict[RecordOptions, list[Task]] = {}
    for task in tasks:
        by_options.setdefault(task.options, []).append(task)
    for options, group in by_options.items():
        try:
            _recognize(calls, recognizer, group, options, roots, stats, heartbeat)
        except QueueError:
            raise
        except Exception as e:  # one input broke the run for all: give each its own chance and record
            left = [task for task in group if heartbeat.holds(task)]
            log.warning("recognizing %d task(s) failed as a whole (%s: %s); going on one input at a time",
                        len(left), type(e).__name__, e)
            for task in left:
                _recognize_alone(calls, recognizer, task, options, roots, stats, heartbeat)


def _recognize(calls: _Calls, recognizer: Recognizer, group: list[Task], options: RecordOptions, roots: _Roots,
               stats: WorkerStats, heartbeat: _Heartbeat) -> None:
    records = heartbeat.watch(recognizer.recognize(_items(calls, group, roots), options))
    for task in group:
        _finish(calls, task, [(index, _next(records, item)) for index, item in task.indexed()], stats, heartbeat)
    for extra in records:
        raise RuntimeError(f"recognizer returned an unexpected extra record for {extra.input!r}")


def _recognize_alone(calls: _Calls, recognizer: Recognizer, task: Task, options: RecordOptions, roots: _Roots,
                     stats: WorkerStats, heartbeat: _Heartbeat) -> None:
    """Each input of ``task`` on its own; whatever one raises becomes its error record."""
    items = list(_items(calls, [task], roots))
    written = []
    for (index, job_input), item in zip(task.indexed(), items, strict=True):
        try:
            found = list(heartbeat.watch(recognizer.recognize([item], options)))
            if len(found) != 1 or found[0].input != job_input.name:
                raise RuntimeError(f"{len(found)} record(s) for one input")
            record = found[0]
        except Exception as e:
            log.warning("input %r of job %s: %s: %s", job_input.name, task.job_id, type(e).__name__, e)
            record = Record.failure(job_input.name, "internal", f"{type(e).__name__}: {e}")
        written.append((index, record))
    _finish(calls, task, written, stats, heartbeat)


def _finish(calls: _Calls, task: Task, written: list[tuple[int, Record]], stats: WorkerStats,
            heartbeat: _Heartbeat) -> None:
    calls.complete(task, written)
    heartbeat.drop(task)
    stats.tasks += 1
    stats.records += len(written)
    stats.failed += sum(not record.ok for _, record in written)


def _next(records: Iterator[Record], item: JobInput) -> Record:
    """The record for ``item``: records come in input order, one per input, except while the orchestrator
    is being interrupted, when it flushes the finished ones past a gap. Never write a shifted record."""
    record = next(records, None)
    if record is not None and record.input == item.name:
        return record
    for _ in records:  # an interrupted run re-raises KeyboardInterrupt once drained
        pass
    raise RuntimeError(f"the recognizer's records went out of step with the task at {item.name!r}")


def _items(calls: _Calls, tasks: list[Task], roots: _Roots) -> Iterator[InputItem]:
    """The inputs of ``tasks``, read lazily; a task whose job was cancelled or deleted meanwhile yields
    placeholders (its records are not written) instead of costing reads and inference."""
    for task in tasks:
        if calls.stopped(task.job_id):
            for item in task.inputs:
                yield InputItem.failed(item.name, "the job was cancelled", "internal")
            continue
        uploads = [i.ref for i in task.inputs if i.kind == "upload"]
        blobs = calls.blobs(task.job_id, uploads) if uploads else {}
        for item in task.inputs:
            try:
                yield _item(item, blobs, roots)
            except Exception as e:  # e.g. ValueError for a path holding a NUL byte: its record, not a crash
                yield InputItem.failed(item.name, f"unusable input: {type(e).__name__}: {e}", "fetch_error")


def _item(item: JobInput, blobs: dict[str, bytes], roots: _Roots) -> InputItem:
    if item.kind == "path" and (refusal := roots.refusal(unescape_name(item.ref))):
        return InputItem.failed(item.name, refusal, "fetch_error")
    return item.to_item(blobs.get(item.ref) if item.kind == "upload" else None)


class _Roots:
    """The folders a worker may read; symlinks are resolved first, so none leads outside.

    A worker with no folder at all leaves tasks that name paths to workers that have one (it declines
    them, and skips their job for ``DECLINE_S``), instead of recording each path as an error. A worker
    with folders records paths outside them as errors: those are the operator's boundary, not a gap."""

    DECLINE_S = 600.0

    def __init__(self, roots: tuple[Path, ...]) -> None:
        self.roots = tuple(Path(os.path.realpath(r)) for r in roots)
        self.declined: dict[str, float] = {}  # job id -> until (monotonic)

    def skip(self) -> frozenset[str]:
        now = time.monotonic()
        for job_id in [j for j, until in self.declined.items() if until < now]:
            del self.declined[job_id]
        return frozenset(self.declined)

    def keep_readable(self, calls: _Calls, worker: str, tasks: list[Task]) -> list[Task]:
        """``tasks`` less those naming paths this worker may not read at all (given back at once)."""
        if self.roots:
            return tasks
        unreadable = [t for t in tasks if any(i.kind == "path" for i in t.inputs)]
        if not unreadable:
            return tasks
        calls.decline(worker, unreadable)
        for job_id in {t.job_id for t in unreadable} - set(self.declined):
            log.warning("job %s names local paths and this worker may read none (no --allow-root): leaving "
                        "its tasks to a worker started with --allow-root over them", job_id)
        for task in unreadable:
            self.declined[task.job_id] = time.monotonic() + self.DECLINE_S
        return [t for t in tasks if t not in unreadable]

    def refusal(self, path: str) -> str | None:
        if "\x00" in path:
            return "a path cannot hold a NUL byte"
        if not self.roots:
            return (f"this worker reads no local paths ({escape_name(path)}); submit the file as an upload, or start "
                    "the worker with --allow-root FOLDER")
        real = Path(os.path.realpath(path))
        if any(real == root or root in real.parents for root in self.roots):
            return None
        return f"{escape_name(path)} is outside the folders this worker may read (--allow-root)"


class _Heartbeat:
    """Extends the leases of held tasks every third of the lease, from a daemon thread, while the worker
    makes progress (a record within ``stall_s``); a stuck worker's tasks are let go back to the queue."""

    def __init__(self, queue: JobQueue, worker: str, lease_s: float, stall_s: float = float("inf")) -> None:
        self.queue = queue
        self.worker = worker
        self.lease_s = lease_s
        self.stall_s = stall_s
        self._progress = time.monotonic()
        self._held: dict[str, Task] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wanwu-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def hold(self, tasks: list[Task]) -> None:
        with self._lock:
            self._held.update((t.task_id, t) for t in tasks)
            self._progress = time.monotonic()

    def watch(self, records: Iterator[Record]) -> Iterator[Record]:
        """``records``, noting each as progress."""
        for record in records:
            self._progress = time.monotonic()
            yield record

    def drop(self, task: Task) -> None:
        with self._lock:
            self._held.pop(task.task_id, None)

    def holds(self, task: Task) -> bool:
        with self._lock:
            return task.task_id in self._held

    def drop_all(self) -> None:
        with self._lock:
            self._held.clear()

    def held(self) -> list[Task]:
        with self._lock:
            return list(self._held.values())

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.lease_s / 3):
            tasks = self.held()
            if not tasks:
                continue
            if time.monotonic() - self._progress > self.stall_s:
                log.warning("no record for %.0f s: not renewing the leases of %d task(s), so they go back to "
                            "the queue", time.monotonic() - self._progress, len(tasks))
                continue
            try:
                self.queue.extend(self.worker, tasks, self.lease_s)
            except Exception as e:  # the queue may be briefly unreachable; the next beat retries
                if not failing:
                    log.warning("could not extend task leases (retrying every %.0f s): %s", self.lease_s / 3, e)
                failing = True
            else:
                if failing:
                    log.warning("task leases extended again")
                failing = False
