"""Where the orchestrator sends prepared pixels: the :class:`Inference` seam.

The orchestrator (:mod:`wanwu.pipeline`) gathers decoded crops and hands them to an :class:`Inference`, which
answers with a future of their scores. Two implementations:

* :class:`LocalInference` — batches of ``batch_size`` run on the engine from ``engine.streams`` threads
  (the CLI, the library, the queue workers);
* ``wanwu.service.inference.BatcherInference`` — every crop goes straight to the service's dynamic batcher,
  which forms batches across concurrent requests.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np
import numpy.typing as npt

from wanwu.engine import Engine
from wanwu.errors import ClosedError
from wanwu.records import TopScores

Pixels = npt.NDArray[np.uint8]


class Inference(Protocol):
    @property
    def gather(self) -> int:
        """Crops the orchestrator should gather before submitting (1: hand each over as soon as it is ready)."""
        ...

    @property
    def in_flight(self) -> int:
        """Submissions that may be outstanding at once."""
        ...

    def submit(self, pixels: list[Pixels], rows: bool = False) -> Future[list[TopScores]]:
        """Scores for ``pixels``, in order; ``rows``: each with its whole score row (``TopScores.row``). The
        future raises DeviceOutOfMemoryError when even one crop does not fit, a QueueError when the work is
        refused as a whole, and anything else when the model itself fails."""
        ...

    def close(self) -> None: ...


def infer(engine: Engine, pixels: list[Pixels], rows: bool = False) -> list[TopScores]:
    """``engine.infer``, keeping every class's score only when ``rows`` asks (called with just the pixels
    otherwise, so that a stand-in for ``engine.infer`` that takes only them works as before)."""
    return engine.infer(pixels, keep_rows=True) if rows else engine.infer(pixels)


class LocalInference:
    """Batches on the engine, ``engine.streams`` at once, each on its own thread."""

    def __init__(self, engine: Engine, batch_size: int) -> None:
        self.engine = engine
        self.gather = batch_size
        self.in_flight = engine.streams
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, pixels: list[Pixels], rows: bool = False) -> Future[list[TopScores]]:
        with self._lock:
            if self._closed:
                raise ClosedError("this inference is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="wanwu-infer")
            pool = self._pool
        return pool.submit(infer, self.engine, pixels, rows)

    def close(self) -> None:
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
