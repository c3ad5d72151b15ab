"""A queue worker: claim tasks, run them through the one :class:`~wanwu.pipeline.Recognizer`, write records.

The model is loaded once per worker; each claim takes a few tasks at once (enough for about two inference
batches) and streams all their inputs through one ``recognize`` call, so decoding and inference overlap as
in the plain CLI. A task's records are written (and the task acknowledged) as soon as its last record
arrives. A heartbeat thread extends the leases of held tasks, so only a worker that has stopped (killed,
hung machine, lost network) loses them.

Paths are read only under the operator's ``allow_roots``; any other path becomes an error record, never a
read. Uploaded inputs come from the queue's blob store.
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

from wanwu.jobs.base import JobInput, JobQueue, Task
from wanwu.pipeline import Recognizer
from wanwu.records import Record, RecordOptions
from wanwu.sources import InputItem

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
    stall = config.stall_s if config.stall_s is not None else max(4 * lease, 120.0)
    heartbeat = _Heartbeat(queue, config.worker_id, lease, stall)
    heartbeat.start()
    try:
        while not stop.is_set():
            want = config.tasks_per_claim
            if config.max_tasks is not None:
                want = min(want, config.max_tasks - stats.tasks)
                if want <= 0:
                    break
            tasks = queue.claim(config.worker_id, want, lease)
            if not tasks:
                if config.exit_when_idle and queue.outstanding() == 0:
                    break
                stop.wait(config.poll_s)
                continue
            heartbeat.hold(tasks)
            try:
                _process(queue, recognizer, tasks, roots, stats, heartbeat)
            except BaseException:
                unfinished = heartbeat.held()
                log.warning("worker stopping: giving back %d unfinished task(s)", len(unfinished))
                queue.release(config.worker_id, unfinished)
                raise
            finally:
                heartbeat.drop_all()
            if config.on_progress is not None:
                config.on_progress(stats)
    finally:
        heartbeat.stop()
    return stats


def _process(queue: JobQueue, recognizer: Recognizer, tasks: list[Task], roots: _Roots, stats: WorkerStats,
             heartbeat: _Heartbeat) -> None:
    by_options: dict[RecordOptions, list[Task]] = {}
    for task in tasks:
        by_options.setdefault(task.options, []).append(task)
    for options, group in by_options.items():
        items = list(_items(queue, group, roots))
        records = heartbeat.watch(recognizer.recognize(items, options))
        for task in group:
            written = [(index, _next(records, item)) for index, item in task.indexed()]
            queue.complete(task, written)
            heartbeat.drop(task)
            stats.tasks += 1
            stats.records += len(written)
            stats.failed += sum(not record.ok for _, record in written)
        for extra in records:
            raise RuntimeError(f"recognizer returned an unexpected extra record for {extra.input!r}")


def _next(records: Iterator[Record], item: JobInput) -> Record:
    """The record for ``item``: records come in input order, one per input, except while the orchestrator
    is being interrupted, when it flushes the finished ones past a gap. Never write a shifted record."""
    record = next(records, None)
    if record is not None and record.input == item.name:
        return record
    for _ in records:  # an interrupted run re-raises KeyboardInterrupt once drained
        pass
    raise RuntimeError(f"the recognizer's records went out of step with the task at {item.name!r}")


def _items(queue: JobQueue, tasks: list[Task], roots: _Roots) -> Iterator[InputItem]:
    for task in tasks:
        uploads = [i.ref for i in task.inputs if i.kind == "upload"]
        blobs = queue.blobs(task.job_id, uploads) if uploads else {}
        for item in task.inputs:
            yield _item(item, blobs, roots)


def _item(item: JobInput, blobs: dict[str, bytes], roots: _Roots) -> InputItem:
    if item.kind == "path" and (refusal := roots.refusal(item.ref)):
        return InputItem.failed(item.name, refusal, "fetch_error")
    return item.to_item(blobs.get(item.ref) if item.kind == "upload" else None)


class _Roots:
    """The folders a worker may read; symlinks are resolved first, so none leads outside."""

    def __init__(self, roots: tuple[Path, ...]) -> None:
        self.roots = tuple(Path(os.path.realpath(r)) for r in roots)

    def refusal(self, path: str) -> str | None:
        if not self.roots:
            return (f"this worker reads no local paths ({path}); submit the file as an upload, or start "
                    "the worker with --allow-root FOLDER")
        real = Path(os.path.realpath(path))
        if any(real == root or root in real.parents for root in self.roots):
            return None
        return f"{path} is outside the folders this worker may read (--allow-root)"


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

    def drop_all(self) -> None:
        with self._lock:
            self._held.clear()

    def held(self) -> list[Task]:
        with self._lock:
            return list(self._held.values())

    def _run(self) -> None:
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
                log.warning("could not extend task leases: %s", e)
