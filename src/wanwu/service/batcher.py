"""The dynamic batcher: one queue for every concurrent request, ``streams`` threads feeding the engine.

Request threads (each runs the orchestrator for one request) put prepared crops into a bounded queue and get
one future for them. One consumer at a time forms the next batch: it takes the oldest image and waits until
``max_batch_size`` images are queued or ``max_delay_ms`` has passed since that image arrived, or until no more
are on their way (``more_coming``: no image is being decoded; a lone request never waits); then it runs the
batch on the engine while the next consumer forms another. Up to ``streams`` batches run at once (the engine
says how many it can take). Images that queued up during a batch are taken at once by the next one (their delay
already elapsed), so under load batches fill up by themselves.

No event loop is involved: a crop goes from its request thread to a consumer thread and its scores come back the
same way, without waking the loop that serves HTTP. A consumer is woken only when a batch can start (the first
image arrives, a batch fills up, the batcher stops), not by every image.

A full queue refuses the whole submission with :class:`QueueFullError` (the app answers 503 with
``Retry-After``); nothing waits unboundedly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from wanwu.errors import QueueError
from wanwu.records import TopScores

log = logging.getLogger("wanwu")
Pixels = npt.NDArray[np.uint8]
# the crops, and whether each one's whole score row is wanted (wanwu.inference.infer)
InferFn = Callable[[list[Pixels], bool], list[TopScores]]


class QueueFullError(QueueError):
    """The batcher's queue has no room; the client should retry later."""


class BatchObserver(Protocol):
    """Told about every batch and every change of queue depth (metrics); called from the batcher's threads."""

    def batch(self, size: int, seconds: float) -> None: ...

    def queue_depth(self, depth: int) -> None: ...


class _NoObserver:
    def batch(self, size: int, seconds: float) -> None:
        pass

    def queue_depth(self, depth: int) -> None:
        pass


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 32
    max_delay_s: float = 0.01
    max_queue: int = 256
    streams: int = 1  # batches in flight at once (the engine's streams)


@dataclass(eq=False, slots=True)
class _Submission:
    """One submit() call: its future resolves once every crop of it has its scores (crops may ride in
    different batches)."""

    future: Future[list[TopScores]]
    results: list[TopScores | None]
    left: int
    rows: bool = False  # whole score rows wanted (/v2): the batch it rides in keeps them for every crop
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, position: int, top: TopScores) -> None:
        with self.lock:
            self.results[position] = top
            self.left -= 1
            done = self.left == 0
        if done and self.future.set_running_or_notify_cancel():
            self.future.set_result(self.results)  # type: ignore[arg-type]  # every slot is filled now

    def fail(self, error: BaseException) -> None:
        with self.lock:
            first = self.left > 0
            self.left = 0
        if first and self.future.set_running_or_notify_cancel():
            self.future.set_exception(error)


@dataclass(eq=False, slots=True)
class _Item:
    pixels: Pixels
    submission: _Submission
    position: int
    arrived: float


class Batcher:
    """``start()``, then ``submit()`` from any thread; ``stop()`` on shutdown (it fails what is still queued)."""

    def __init__(self, infer: InferFn, config: BatcherConfig, observer: BatchObserver | None = None,
                 more_coming: Callable[[], bool] = lambda: True) -> None:
        """``more_coming``: whether more images are on their way (being decoded); while they are not, a batch
        starts at once instead of waiting out ``max_delay_s`` for images that will not come."""
        self._infer = infer
        self.config = config
        self._observer = observer or _NoObserver()
        self._more_coming = more_coming
        self._items: deque[_Item] = deque()
        self._ready = threading.Condition()  # guards _items and _stopped; notified when a batch can start
        self._forming = threading.Lock()  # held by the one consumer forming the next batch
        self._threads: list[threading.Thread] = []
        self._running: list[list[_Item]] = []  # batches on the model now
        self._stopped = False
        self.batches = 0  # batches run so far (also in the metrics; handy for tests)

    @property
    def depth(self) -> int:
        return len(self._items)

    def room(self) -> int:
        return self.config.max_queue - len(self._items)

    def start(self) -> None:
        with self._ready:
            if self._threads or self._stopped:
                return
            self._threads = [
                threading.Thread(target=self._consume, name=f"wanwu-batcher-{i}", daemon=True)
                for i in range(max(1, self.config.streams))
            ]
        for thread in self._threads:
            thread.start()

    def stop(self, wait_s: float = 30.0) -> None:
        """Fail every crop still queued or on the model (their requests end now), then wait up to ``wait_s`` for
        the consumers to finish the batches they run (a hung model's thread is left behind, a daemon)."""
        with self._ready:
            self._stopped = True
            left = list(self._items) + [item for batch in self._running for item in batch]
            self._items.clear()
            self._ready.notify_all()
        error = QueueError("the server is shutting down")
        for item in left:
            item.submission.fail(error)
        self._observer.queue_depth(0)
        deadline = time.monotonic() + wait_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def submit(self, pixels: list[Pixels], rows: bool = False) -> Future[list[TopScores]]:
        """Queue these crops; the future resolves to their scores, in order (``rows``: each with its whole score
        row). All or none are queued: with no room for them all the future raises :class:`QueueFullError` (so
        does a stopped batcher's, with QueueError)."""
        future: Future[list[TopScores]] = Future()
        submission = _Submission(future, [None] * len(pixels), len(pixels), rows)
        if not pixels:
            future.set_result([])
            return future
        now = time.monotonic()
        with self._ready:
            if self._stopped:
                error: QueueError = QueueError("the server is shutting down")
            elif len(self._items) + len(pixels) > self.config.max_queue:
                error = QueueFullError(f"the recognition queue is full ({self.config.max_queue} images waiting)")
            else:
                was = len(self._items)
                self._items.extend(_Item(p, submission, i, now) for i, p in enumerate(pixels))
                depth = len(self._items)
                if was == 0 or (was < self.config.max_batch_size <= depth) or not self._more_coming():
                    self._ready.notify()  # a batch can start: the first image's clock runs, a batch is full, or
                    # nothing else is on its way
                self._observer.queue_depth(depth)
                return future
        future.set_exception(error)
        return future

    def nudge(self) -> None:
        """What ``more_coming`` tells may have changed without a crop arriving (the last decode in flight
        failed): a batch waiting for company checks again, and starts if nothing else is on its way."""
        with self._ready:
            self._ready.notify_all()

    def _consume(self) -> None:
        while True:
            with self._forming:  # the next batch forms while the others run
                batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Item] | None:
        with self._ready:
            while not self._items and not self._stopped:
                self._ready.wait()
            if self._stopped:
                return None
            deadline = self._items[0].arrived + self.config.max_delay_s
            while len(self._items) < self.config.max_batch_size and not self._stopped and self._more_coming():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            if self._stopped:
                return None
            take = min(len(self._items), self.config.max_batch_size)
            batch = [self._items.popleft() for _ in range(take)]
            self._running.append(batch)
            depth = len(self._items)
        self._observer.queue_depth(depth)
        return batch

    def _run(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        tops: list[TopScores] | None = None
        try:
            # Score rows only for a batch that holds a crop that wants one: the others are ranked on the model's
            # own path (a PixelBackend normalises and ranks on its device; rows come back whole and are ranked here)
            tops = self._infer([item.pixels for item in batch], any(item.submission.rows for item in batch))
        except Exception as e:
            log.exception("inference failed for a batch of %d", len(batch))
            for item in batch:
                item.submission.fail(e)
        finally:
            with self._ready:
                self._running = [b for b in self._running if b is not batch]
                if tops is not None:
                    self.batches += 1  # under the lock: two consumers may finish at once
        if tops is None:
            return
        self._observer.batch(len(batch), time.perf_counter() - start)
        for item, top in zip(batch, tops, strict=True):
            item.submission.answer(item.position, top)
