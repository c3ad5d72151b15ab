"""Inference backends: a batch of preprocessed images in, a batch of scores out.

Backends register by name in :data:`BACKENDS` (a :class:`~wanwu.registry.Registry`; third parties add one
through the ``wanwu.backends`` entry-point group); a :class:`~wanwu.spec.ModelSpec` names the one it needs.
Built-ins are lazy ``"module:attr"`` entries, so a backend's runtime is imported only when it is chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from wanwu.errors import UsageError
from wanwu.registry import Registry
from wanwu.spec import ModelSpec


@dataclass(frozen=True)
class BackendOptions:
    """How to run a model, independent of which model: device and threads."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # intra-op threads; 0 = decide from the core count
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 (GPU backends)
    # int8 ONNX models: "exact" runs saturating int8 ops through exact integer kernels (see
    # wanwu.backends.int8), "native" uses onnxruntime's fastest kernels, "auto" = exact on CPUs without VNNI.
    int8: str = "auto"
    # batches that may run at once, each on its own share of the threads; 0 = the backend decides
    # (onnxruntime on a CPU: 2, which keeps every core busy while decoders take turns on them)
    streams: int = 0
    # also each image's embedding (Engine.infer puts it on TopScores.embedding): the pooled features the
    # graph's structure points at, or ``embedding_output`` (a tensor's name) when given
    embeddings: bool = False
    embedding_output: str | None = None

    def __post_init__(self) -> None:
        if self.streams < 0 or self.threads < 0:
            raise UsageError("--streams and --threads must be 0 (auto) or more")


class Backend(Protocol):
    """Runs one model. Implementations raise :class:`wanwu.errors.OutOfMemoryError` on OOM."""

    @property
    def device(self) -> str: ...

    @property
    def streams(self) -> int:
        """How many :meth:`infer` calls may run at once from different threads (1 = one at a time)."""
        ...

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``batch`` is laid out as the spec says; returns [N, num_classes] float32."""
        ...

    def close(self) -> None: ...


class EmbeddingBackend(Backend, Protocol):
    """A backend that can also give each image's embedding (before normalisation)."""

    def infer_embedded(
        self, batch: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """[N, num_classes] scores and [N, D] embeddings of one batch."""
        ...


BackendFactory = Callable[[ModelSpec, BackendOptions], Backend]
BACKENDS: Registry[BackendFactory] = Registry("backend", group="wanwu.backends")
BACKENDS.lazy("onnx", "wanwu.backends.onnx:create")
BACKENDS.lazy("torch", "wanwu.backends.torch:create", extra="torch")
register_backend = BACKENDS.register


def create_backend(spec: ModelSpec, options: BackendOptions) -> Backend:
    return BACKENDS.get(spec.backend)(spec, options)
