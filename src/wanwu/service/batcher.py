"""The dynamic batcher: one queue for every concurrent request, one consumer feeding the engine.

Requests put prepared crops into a bounded queue and await a per-image future. A single consumer task
takes the oldest image, waits until ``max_batch_size`` images are queued or ``max_delay_ms`` has passed
since that first image arrived, and runs the whole batch through ``infer`` in a worker thread, so the event
loop keeps accepting and decoding while the model runs. Up to ``streams`` batches run at once (the engine
says how many it can take); the next one forms while they run. Images that queued up during a batch are taken at
once by the next one (their delay already elapsed), so under load batches fill up by themselves.

A full queue raises :class:`QueueFullError` (the app answers 503 with ``Retry-After``); nothing waits
unboundedly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from wanwu.errors import QueueError
from wanwu.records import TopScores

log = logging.getLogger("wanwu")
Pixels = npt.NDArray[np.uint8]
InferFn = Callable[[list[Pixels]], list[TopScores]]


class QueueFullError(QueueError):
    """The batcher's queue has no room; the client should retry later."""


class BatchObserver(Protocol):
    """Told about every batch and every change of queue depth (metrics)."""

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
class _Item:
    pixels: Pixels
    future: asyncio.Future[TopScores]
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Create inside the running event loop; ``start()`` then ``submit()``; ``stop()`` on shutdown."""

    def __init__(self, infer: InferFn, config: BatcherConfig, observer: BatchObserver | None = None) -> None:
        self._infer = infer
        self.config = config
        self._observer = observer or _NoObserver()
        self._items: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # batches run so far (also in the metrics; handy for tests)

    @property
    def depth(self) -> int:
        return len(self._items)

    def room(self) -> int:
        return self.config.max_queue - len(self._items)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._consume(), name="wanwu-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                item.future.set_exception(QueueError("the server is shutting down"))
        self._observer.queue_depth(0)

    def submit(self, pixels: Pixels) -> asyncio.Future[TopScores]:
        """Queue one crop; the future resolves to its scores. Raises :class:`QueueFullError`."""
        if len(self._items) >= self.config.max_queue:
            raise QueueFullError(f"the recognition queue is full ({self.config.max_queue} images waiting)")
        future: asyncio.Future[TopScores] = asyncio.get_running_loop().create_future()
        self._items.append(_Item(pixels, future))
        self._observer.queue_depth(len(self._items))
        self._wakeup.set()
        return future

    async def _consume(self) -> None:
        free = asyncio.Semaphore(self.config.streams)
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            free.release()

        try:
            while True:
                await free.acquire()  # the next batch forms while the others run
                batch = await self._next_batch()
                if not batch:
                    free.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._run(batch))
                running.add(task)
                task.add_done_callback(finished)
        finally:
            for task in list(running):
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _next_batch(self) -> list[_Item]:
        while not self._items:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._items[0].arrived + self.config.max_delay_s
        while len(self._items) < self.config.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        batch: list[_Item] = []
        while self._items and len(batch) < self.config.max_batch_size:
            item = self._items.popleft()
            if not item.future.cancelled():  # its client went away
                batch.append(item)
        self._observer.queue_depth(len(self._items))
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        try:
            tops = await asyncio.to_thread(self._infer, [item.pixels for item in batch])
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(QueueError("the server is shutting down"))
            raise
        except Exception as e:
            log.exception("inference failed for a batch of %d", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        self.batches += 1
        self._observer.batch(len(batch), time.perf_counter() - start)
        for item, top in zip(batch, tops, strict=True):
            if not item.future.done():
                item.future.set_result(top)
