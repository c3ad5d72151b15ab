"""The engine: one loaded model and the steps every front end shares.

:class:`Engine` owns the model spec and its backend and turns batches of prepared pixels into
:class:`~wanwu.records.TopScores` (halving the batch and retrying on out-of-memory, so no image is lost or
doubled). The orchestrator (:mod:`wanwu.pipeline`) drives it through an :mod:`~wanwu.inference` seam:
batches of its own locally, the service's dynamic batcher behind the HTTP API.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt

from wanwu.backends import BACKENDS, Backend, BackendOptions, EmbeddingBackend, NumericsBackend, PixelBackend
from wanwu.embeddings import EmbeddingSource, normalise
from wanwu.errors import DeviceOutOfMemoryError, OutOfMemoryError
from wanwu.imaging import to_batch
from wanwu.models import resolve_model
from wanwu.records import TOP_N_STORED, TopScores, from_top, top_scores
from wanwu.spec import ModelSpec

log = logging.getLogger("wanwu")


class Engine:
    """``max_batch`` is the batch size in use: halved on out-of-memory, doubled back (up to ``batch_limit``, the
    size asked for) after :data:`REGROW_AFTER` batches in a row succeed, so a moment of memory pressure (another
    process on the GPU) does not shrink the batch for good; each regrowth that fails again doubles the wait."""

    REGROW_AFTER = 16  # successful batches before trying twice the size again
    REGROW_MAX_WAIT = 1024

    def __init__(self, spec: ModelSpec, backend: Backend, max_batch: int = 32) -> None:
        self.spec = spec
        self.backend = backend
        self.max_batch = max_batch
        self.batch_limit = max_batch
        self.streams = max(1, backend.streams)
        self._slots = threading.BoundedSemaphore(self.streams)  # batches on the backend at once
        self._sizing = threading.Lock()
        self._successes = 0
        self._regrow_after = self.REGROW_AFTER
        self._regrown = False  # the last change was a regrowth (an OOM now means it was too soon)

    @classmethod
    def load(
        cls, model: str | ModelSpec | None, labels: Path | str | None = None,
        backend_options: BackendOptions | None = None, max_batch: int = 32, label_column: str | None = None,
        beside: Callable[[], object] | None = None,
    ) -> Engine:
        """``beside``: work for a thread of its own while the backend loads the model (a runtime such as
        onnxruntime builds its session outside the interpreter lock: 20 ms of a one-photo run's 230 ms).
        It starts once the backend's module, and the runtime it imports, are in; it is waited for, and
        anything it raises is only logged: it prepares, it does not decide."""
        spec = model if isinstance(model, ModelSpec) else resolve_model(model, labels, label_column)
        factory = BACKENDS.get(spec.backend)  # imports the backend's module: the interpreter's own work
        with _alongside(beside):
            backend = factory(spec, backend_options or BackendOptions())
        warm_up = getattr(backend, "warm_up", None)  # a GPU backend: algorithm search before the first images
        if callable(warm_up):
            warm_up(max_batch)
        return cls(spec, backend, max_batch)

    @property
    def numerics(self) -> dict[str, str]:
        """How the backend's numbers are made (device class, precision) where that is not the default fp32 on
        a CPU: part of the result cache's namespace (:meth:`wanwu.config.RecognizeOptions.cache_namespace`)."""
        return dict(self.backend.numerics) if isinstance(self.backend, NumericsBackend) else {}

    def infer(self, pixels: list[npt.NDArray[np.uint8]], keep_rows: bool = False) -> list[TopScores]:
        """Scores for each crop, in order. Splits into chunks of ``max_batch``; halves it on OOM.
        ``keep_rows``: each TopScores also carries its image's whole score row.

        Safe to call from several threads: up to :attr:`streams` batches run on the backend at once. Raises
        :class:`~wanwu.errors.DeviceOutOfMemoryError` when even one image does not fit: every crop has the
        same size, so that is the device's state, never the image's fault.
        """
        out: list[TopScores] = []
        start = 0
        while start < len(pixels):
            size = min(self.max_batch, len(pixels) - start)
            chunk = pixels[start : start + size]
            try:
                tops = self._run(chunk, keep_rows)
            except OutOfMemoryError as e:
                self._shrink(size, e)
                continue
            self._grow()
            out.extend(tops)
            start += size
        return out

    def _shrink(self, size: int, error: OutOfMemoryError) -> None:
        if size == 1:
            raise DeviceOutOfMemoryError(f"the device is out of memory even for a batch of one image: {error}")
        with self._sizing:
            self.max_batch = min(self.max_batch, max(1, size // 2))  # another stream may have shrunk it already
            self._successes = 0
            if self._regrown:  # the regrowth was too soon: wait twice as long before the next
                self._regrow_after = min(self.REGROW_MAX_WAIT, self._regrow_after * 2)
                self._regrown = False
        log.warning("out of memory at batch %d; retrying with batch %d (%s)", size, self.max_batch, error)

    def _grow(self) -> None:
        with self._sizing:
            if self.max_batch >= self.batch_limit:
                return
            self._successes += 1
            if self._successes >= self._regrow_after:
                self.max_batch = min(self.batch_limit, self.max_batch * 2)
                self._successes = 0
                self._regrown = True
                log.info("%d batches fitted; trying batch %d again", self._regrow_after, self.max_batch)

    @property
    def embedding_source(self) -> EmbeddingSource | None:
        """Where this engine's embeddings come from; None when it gives none."""
        source: EmbeddingSource | None = getattr(self.backend, "embedding_source", None)
        return source

    def _run(self, chunk: list[npt.NDArray[np.uint8]], keep_rows: bool = False) -> list[TopScores]:
        backend = self.backend
        embeds = self.embedding_source is not None
        if isinstance(backend, PixelBackend) and not (keep_rows or embeds):  # normalises and ranks on its device
            with self._slots:
                indices, values, lse = backend.infer_top(chunk, TOP_N_STORED)
            if indices.shape[0] != len(chunk) or lse.shape != (len(chunk),):
                raise RuntimeError(f"backend returned top scores of shape {indices.shape} for {len(chunk)} images")
            return from_top(indices, values, lse)
        batch = to_batch(chunk, self.spec.preprocess)
        with self._slots:
            if embeds:
                raw, embedded = cast(EmbeddingBackend, backend).infer_embedded(batch)
            else:
                raw, embedded = backend.infer(batch), None
        if raw.ndim != 2 or raw.shape[0] != len(chunk) or raw.shape[1] != self.spec.num_classes:
            raise RuntimeError(
                f"backend returned shape {raw.shape} for {len(chunk)} images of {self.spec.num_classes} classes"
            )
        tops = top_scores(raw, keep_rows=keep_rows)
        if embedded is None:
            return tops
        if len(embedded) != len(chunk):
            raise RuntimeError(f"backend returned {len(embedded)} embeddings for {len(chunk)} images")
        return [replace(t, embedding=row) for t, row in zip(tops, normalise(embedded), strict=True)]

    def close(self) -> None:
        self.backend.close()


@contextmanager
def _alongside(work: Callable[[], object] | None) -> Iterator[None]:
    """``work`` in a thread while the block runs; waited for at its end."""
    if work is None:
        yield
        return

    def run() -> None:
        try:
            work()
        except Exception as e:
            log.debug("work beside the model's loading failed: %s", e)

    thread = threading.Thread(target=run, name="wanwu-beside-load", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
