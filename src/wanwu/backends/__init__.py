"""Inference backends: a batch of preprocessed images in, a batch of scores out.

Backends register by name in :data:`BACKENDS` (a :class:`~wanwu.registry.Registry`; third parties add one
through the ``wanwu.backends`` entry-point group); a :class:`~wanwu.spec.ModelSpec` names the one it needs.
Built-ins are lazy ``"module:attr"`` entries, so a backend's runtime is imported only when it is chosen.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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


TopBatch = tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.float32]]
"""``(indices [N, n], values [N, n], logsumexp [N])``: each image's top-``n`` raw scores, best first."""


@runtime_checkable
class PixelBackend(Backend, Protocol):
    """A backend that also takes the decoded uint8 HWC crops themselves and answers with each image's top
    scores: it normalises on its device and ranks there, so about 400 bytes per image travel back instead of
    every class's score (216 KB for the seed model's 54,092 classes)."""

    def infer_top(self, crops: Sequence[npt.NDArray[np.uint8]], n: int) -> TopBatch: ...


@runtime_checkable
class NumericsBackend(Protocol):
    """A backend whose numbers depend on how it runs (device, precision): :attr:`numerics` names that, and
    goes into the result cache's namespace so results of different numerics never share entries."""

    @property
    def numerics(self) -> dict[str, str]: ...


def default_threads() -> int:
    """Every core for inference, shared among its streams. The threads don't spin, so decode workers
    still get the cores whenever inference waits."""
    return max(1, os.cpu_count() or 1)


def default_cpu_streams() -> int:
    """Two batches at once on a CPU with two or more cores, each on half the threads.

    One batch on every thread stalls at each operator's barrier whenever a decoder holds one of its
    cores; two half-width batches don't wait for each other. Measured on 2 cores beside a busy decoder:
    113 against 98 images/s of inference.
    """
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def parse_cuda_index(name: str) -> int | None:
    """``cuda`` -> None (the current device), ``cuda:N`` -> N; anything else is a :class:`UsageError`."""
    name = name.strip().lower()
    if name == "cuda":
        return None
    prefix, _, index = name.partition(":")
    if prefix != "cuda" or not index.isdigit():
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    return int(index)


def numerics_of(device_type: str, precision: str) -> dict[str, str]:
    """A backend's :attr:`NumericsBackend.numerics`: nothing for fp32 on a CPU (what every cache entry made
    before holds), else the device class and precision. fp32 on CUDA is its own too: cuDNN convolutions use
    TF32 on Ampere and later by default, and GPU kernels sum in other orders."""
    if device_type == "cpu" and precision == "fp32":
        return {}
    return {"device": device_type, "precision": precision}


# What an out-of-memory looks like when it comes as a plain RuntimeError (or an onnxruntime error) rather
# than torch.cuda.OutOfMemoryError. "illegal memory access" and the like are faults, never out-of-memory.
OOM_MESSAGES = (
    "out of memory",  # "CUDA out of memory", "CUDA error: out of memory", HIP's, MPS's
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "can't allocate memory",  # torch's CPU allocator
    "not enough memory",
    "failed to allocate memory",  # onnxruntime's arena and CUDA allocator
    "bfcarena",
)
NOT_OOM_MESSAGES = ("illegal memory access", "misaligned address", "unspecified launch failure")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device ran out of memory (the batch can be halved and retried)."""
    text = str(error).lower()
    if any(m in text for m in NOT_OOM_MESSAGES):
        return False
    if type(error).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return True
    return any(m in text for m in OOM_MESSAGES)


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
