"""The engine: one loaded model and the steps every front end shares.

:class:`Engine` owns the model spec and its backend and turns batches of prepared pixels into
:class:`~wanwu.records.TopScores` (halving the batch and retrying on out-of-memory, so no image is lost or
doubled). The orchestrator (:mod:`wanwu.pipeline`) drives it through an :mod:`~wanwu.inference` seam:
batches of its own locally, the service's dynamic batcher behind the HTTP API.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt

from wanwu.backends import Backend, BackendOptions, EmbeddingBackend, create_backend
from wanwu.embeddings import EmbeddingSource, normalise
from wanwu.errors import OutOfMemoryError
from wanwu.imaging import to_batch
from wanwu.models import resolve_model
from wanwu.records import TopScores, top_scores
from wanwu.spec import ModelSpec

log = logging.getLogger("wanwu")


class Engine:
    def __init__(self, spec: ModelSpec, backend: Backend, max_batch: int = 32) -> None:
        self.spec = spec
        self.backend = backend
        self.max_batch = max_batch
        self.streams = max(1, backend.streams)
        self._slots = threading.BoundedSemaphore(self.streams)  # batches on the backend at once

    @classmethod
    def load(
        cls, model: str | ModelSpec | None, labels: Path | None = None,
        backend_options: BackendOptions | None = None, max_batch: int = 32, label_column: str | None = None,
    ) -> Engine:
        spec = model if isinstance(model, ModelSpec) else resolve_model(model, labels, label_column)
        return cls(spec, create_backend(spec, backend_options or BackendOptions()), max_batch)

    def infer(self, pixels: list[npt.NDArray[np.uint8]]) -> list[TopScores]:
        """Scores for each crop, in order. Splits into chunks of ``max_batch``; halves it on OOM.

        Safe to call from several threads: up to :attr:`streams` batches run on the backend at once.
        """
        out: list[TopScores] = []
        start = 0
        while start < len(pixels):
            size = min(self.max_batch, len(pixels) - start)
            chunk = pixels[start : start + size]
            try:
                raw, embedded = self._run(chunk)
            except OutOfMemoryError as e:
                if size == 1:
                    raise
                self.max_batch = min(self.max_batch, max(1, size // 2))  # streams may race here
                log.warning("out of memory at batch %d; retrying with batch %d (%s)", size, self.max_batch, e)
                continue
            tops = top_scores(raw)
            if embedded is not None:
                tops = [replace(t, embedding=row) for t, row in zip(tops, normalise(embedded), strict=True)]
            out.extend(tops)
            start += size
        return out

    @property
    def embedding_source(self) -> EmbeddingSource | None:
        """Where this engine's embeddings come from; None when it gives none."""
        source: EmbeddingSource | None = getattr(self.backend, "embedding_source", None)
        return source

    def _run(
        self, chunk: list[npt.NDArray[np.uint8]]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        batch = to_batch(chunk, self.spec.preprocess)
        embedded = None
        with self._slots:
            if self.embedding_source is not None:
                raw, embedded = cast(EmbeddingBackend, self.backend).infer_embedded(batch)
            else:
                raw = self.backend.infer(batch)
        if raw.ndim != 2 or raw.shape[0] != len(chunk) or raw.shape[1] != self.spec.num_classes:
            raise RuntimeError(
                f"backend returned shape {raw.shape} for {len(chunk)} images of {self.spec.num_classes} classes"
            )
        return raw, embedded

    def close(self) -> None:
        self.backend.close()
