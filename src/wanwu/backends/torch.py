"""PyTorch backend: a checkpoint run by the network its spec names (``ModelSpec.arch``), on CPU or CUDA.

Builds the architecture from :data:`wanwu.archs.ARCHS` (the seed model's ResNeSt strictly: every weight must
be there), in eval mode under :func:`torch.inference_mode`, channels-last. torch is imported inside the
factory: without it, using this backend raises :class:`~wanwu.errors.MissingExtraError` naming the ``torch``
extra.

The device path (:meth:`TorchBackend.infer_top`): the decoded uint8 crops go to the device as they are (NHWC,
already channels-last once permuted; on CUDA from a pinned buffer, so the copy is asynchronous and 4x smaller
than float32), are normalised there, and the top scores and log-sum-exp are computed there in fp32, so about
400 bytes per image come back. Each of ``streams`` batches in flight has its own lane (a CUDA stream and
pinned buffer on CUDA). fp16/bf16 cast the network once (its ``cast_body``), the classifier head staying
fp32; a network without ``cast_body`` runs under autocast instead.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from wanwu.backends import Backend, BackendOptions, TopBatch, is_out_of_memory, numerics_of, parse_cuda_index
from wanwu.embeddings import EmbeddingSource
from wanwu.errors import MissingExtraError, ModelError, OutOfMemoryError, UsageError
from wanwu.spec import ModelSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger("wanwu")
T = TypeVar("T")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
CUDA_STREAMS = 2  # batches in flight on a GPU: one copies and ranks while the other computes


class _Lane:
    """What one batch in flight owns: on CUDA a stream and a pinned host buffer for the uint8 crops."""

    def __init__(self, torch_: Any, device: torch.device) -> None:
        self.torch = torch_
        self.cuda = device.type == "cuda"
        self.stream = torch_.cuda.Stream(device=device) if self.cuda else None
        self.buffer: torch.Tensor | None = None

    def host(self, crops: Sequence[npt.NDArray[np.uint8]], rows: int) -> torch.Tensor:
        """The crops stacked as one uint8 NHWC tensor of ``rows`` rows (rows past the crops: padding)."""
        th = self.torch
        if not self.cuda:
            stacked: torch.Tensor = th.from_numpy(np.stack(crops))
            return stacked
        shape = (rows, *crops[0].shape)
        if self.buffer is None or self.buffer.shape[0] < rows or tuple(self.buffer.shape[1:]) != shape[1:]:
            self.buffer = th.empty(shape, dtype=th.uint8, pin_memory=True)
        np.stack(crops, out=self.buffer.numpy()[: len(crops)])
        rows_view: torch.Tensor = self.buffer[:rows]
        return rows_view

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return self.torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


class TorchBackend:
    def __init__(self, spec: ModelSpec, options: BackendOptions) -> None:
        import torch

        from wanwu.archs import build_network
        from wanwu.backends import default_threads

        if spec.preprocess.layout != "NCHW":
            raise ModelError(f"the torch backend needs NCHW input, the spec says {spec.preprocess.layout}")
        self._torch = torch
        self._device = resolve_device(options.device)
        self._dtype = resolve_precision(options.precision, self._device)
        if self._device.type == "cpu":
            torch.set_num_threads(options.threads or default_threads())
        else:
            torch.backends.cudnn.benchmark = True  # fixed shapes (batch buckets): pick the fastest conv once
        model = build_network(spec).to(self._device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._autocast_dtype = None
        if self._dtype is not None and callable(getattr(model, "cast_body", None)):
            model.cast_body(self._dtype)  # once, instead of autocast re-casting every weight every batch
        elif self._dtype is not None:
            self._autocast_dtype = self._dtype
        self._model: Any = model
        self._input_dtype = getattr(model, "input_dtype", torch.float32)
        self._preprocess = _normaliser(torch, spec, self._device)
        self._crop = (spec.preprocess.crop_size, spec.preprocess.crop_size, 3)
        self._streams = options.streams or (CUDA_STREAMS if self._device.type == "cuda" else 1)
        self._lanes = self._new_lanes()
        if self._device.type == "cuda":  # the weights' copies (default stream) end before a lane's stream reads them
            torch.cuda.synchronize(self._device)
        self._weights = spec.weights
        self.embedding_source: EmbeddingSource | None = None
        if options.embeddings:
            own = hasattr(model, "embed")
            self.embedding_source = EmbeddingSource("image embedding" if own else "input of the last linear layer")

    @property
    def streams(self) -> int:
        return self._streams

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def precision(self) -> str:
        return _precision_name(self._dtype)

    @property
    def numerics(self) -> dict[str, str]:
        return numerics_of(self._device.type, self.precision)

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Normalised float32 NCHW in, every class's score out (``wanwu convert``'s parity check, benchmarks)."""
        torch = self._torch

        def run() -> npt.NDArray[np.float32]:
            with torch.inference_mode(), self._autocast():
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
                x = x.to(self._device).contiguous(memory_format=torch.channels_last).to(self._input_dtype)
                return np.asarray(self._model(x).float().cpu().numpy(), dtype=np.float32)

        return self._guarded(len(batch), run)

    def infer_embedded(
        self, batch: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Normalised float32 NCHW in; scores and embeddings out: a CLIP head's projected image embedding, or
        else the input of the network's last linear layer (a classifier's pooled features: 2048-d for the seed
        ResNeSt-101)."""
        torch = self._torch

        def run() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
            with torch.inference_mode(), self._autocast():
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
                x = x.to(self._device).contiguous(memory_format=torch.channels_last).to(self._input_dtype)
                scores, features = _embedded(self._model, x)
                return (np.asarray(scores.float().cpu().numpy(), dtype=np.float32),
                        np.asarray(features.float().cpu().numpy(), dtype=np.float32).reshape(len(batch), -1))

        return self._guarded(len(batch), run)

    @property
    def text_tower(self) -> bool:
        """Whether :meth:`embed_texts` works: the network has a text tower (Chinese-CLIP)."""
        return callable(getattr(self._model, "embed_texts", None))

    def embed_texts(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Normalised text embeddings (search queries) of a model with a text tower (Chinese-CLIP)."""
        embed = getattr(self._model, "embed_texts", None)
        if embed is None:
            raise UsageError("this model has no text tower: search by --image, or use a Chinese-CLIP model")
        with self._torch.inference_mode():
            return np.asarray(embed(texts, self._weights), dtype=np.float32)

    def infer_top(self, crops: Sequence[npt.NDArray[np.uint8]], n: int) -> TopBatch:
        """uint8 HWC crops in; each image's top-``n`` scores (best first) and log-sum-exp out, made on the
        device in fp32. On CUDA a batch is padded to its size bucket (:func:`bucket`), so the fastest
        convolution algorithm is searched for a handful of shapes only."""
        lane = self._lanes.get()
        try:
            return self._guarded(len(crops), lambda: self._top(lane, crops, n))
        finally:
            self._lanes.put(lane)

    def _top(self, lane: _Lane, crops: Sequence[npt.NDArray[np.uint8]], n: int) -> TopBatch:
        torch = self._torch
        count = len(crops)
        rows = bucket(count) if lane.cuda else count
        host = lane.host(crops, rows)
        with torch.inference_mode(), lane.context(), self._autocast():
            x = self._preprocess(host.to(self._device, non_blocking=True)).to(self._input_dtype)
            logits = self._model(x)[:count].float()
            values, indices = torch.topk(logits, min(n, logits.shape[1]), dim=1)
            lse = torch.logsumexp(logits, dim=1)
            back = (indices.to(torch.int32).cpu(), values.cpu(), lse.cpu())  # waits for this lane's stream only
        return back[0].numpy(), back[1].numpy(), back[2].numpy()

    def warm_up(self, batch: int) -> None:
        """Run a batch of ``batch`` (bucketed) and of one, so cuDNN's algorithm search and the allocator's first
        growth happen before the first real images. Nothing to do on a CPU."""
        if self._device.type != "cuda":
            return
        crop = np.zeros(self._crop, np.uint8)
        for size in sorted({1, bucket(batch)}):
            with contextlib.suppress(OutOfMemoryError):  # the engine's back-off handles real batches
                self.infer_top([crop] * size, 1)

    def _guarded(self, size: int, run: Callable[[], T]) -> T:
        """``run()``, turning an out-of-memory into :class:`OutOfMemoryError` after freeing what it held.

        The cache is emptied outside the ``except`` block: inside it the traceback still references the
        failed forward pass's frames and so its tensors, and nothing would be freed."""
        message = None
        try:
            return run()
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one too; so are cuBLAS/cuDNN alloc failures
            if not is_out_of_memory(e):
                raise  # an illegal memory access and the like: a fault, never retried with a smaller batch
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
        self._release_memory()
        raise OutOfMemoryError(f"out of memory on {self._device} for a batch of {size}: {message}")

    def _release_memory(self) -> None:
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()

    def relabel(self, spec: ModelSpec) -> TorchBackend:
        """This backend over the same network, scoring ``spec``'s labels instead (zero-shot models only)."""
        relabel = getattr(self._model, "relabel", None)
        if relabel is None:
            raise UsageError("this model's classes are fixed: only a zero-shot (CLIP) model takes other labels")
        clone = copy.copy(self)
        clone._model = relabel(spec)
        clone._lanes = self._new_lanes()  # its own: closing one never takes the other's
        return clone

    def _new_lanes(self) -> queue.SimpleQueue[_Lane]:
        lanes: queue.SimpleQueue[_Lane] = queue.SimpleQueue()
        for _ in range(self._streams):
            lanes.put(_Lane(self._torch, self._device))
        return lanes

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return self._torch.autocast(device_type=self._device.type, dtype=self._autocast_dtype)

    def close(self) -> None:
        self._model = None
        self._lanes = self._new_lanes()  # the pinned buffers go with the old ones
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()


def bucket(count: int) -> int:
    """The batch size a batch of ``count`` is padded to on CUDA: a power of two up to 8, then a multiple of 8
    (every new shape costs a cuDNN algorithm search, a stall of up to seconds; padding costs < 1/3 of a batch
    above 8)."""
    if count <= 8:
        return 1 << max(0, count - 1).bit_length()
    return -(-count // 8) * 8


def _normaliser(torch: Any, spec: ModelSpec, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 NHWC on the device -> float32 NCHW (channels-last strides), exactly as :func:`~wanwu.imaging.to_batch`
    computes it on the CPU: ``(x - mean / scale) * (scale / std)`` in float32, channels reversed for BGR."""
    pre = spec.preprocess
    mean = np.asarray(pre.mean, dtype=np.float32) / np.float32(pre.scale)
    inv_std = np.float32(pre.scale) / np.asarray(pre.std, dtype=np.float32)
    bgr = pre.channel_order == "BGR"
    if bgr:
        mean, inv_std = mean[::-1], inv_std[::-1]
    mean_t = torch.from_numpy(mean.copy()).view(1, 3, 1, 1).to(device)
    inv_t = torch.from_numpy(inv_std.copy()).view(1, 3, 1, 1).to(device)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        if bgr:
            x = x.flip(3)
        out: torch.Tensor = (x.permute(0, 3, 1, 2).float() - mean_t) * inv_t
        return out

    return normalise


def _embedded(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    own = getattr(model, "embed", None)
    if own is not None:
        scores, features = own(x)
        return scores, features
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ModelError("this network has no linear layer whose input could serve as an embedding")
    seen: list[torch.Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        scores = model(x)
    finally:
        handle.remove()
    return scores, seen[-1]


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU; ``cuda[:N]`` must exist."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    index = parse_cuda_index(name)
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch has no usable CUDA device")
    if index is not None and index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index if index is not None else torch.cuda.current_device())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the network runs in, or None for fp32.

    ``auto``: on CUDA bf16 where the GPU runs it natively (compute capability 8.0 and later), else fp16 (T4 and
    V100 only emulate bf16, slower than fp16); on a CPU fp32. ``bf16`` runs on a CPU too; fp16 needs CUDA.
    """
    import torch

    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; on the CPU wanwu runs fp32 (or bf16)")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (not through fp32 emulation)."""
    import torch

    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def _precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}[
        str(dtype) if dtype is not None else None
    ]


def create(spec: ModelSpec, options: BackendOptions) -> Backend:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingExtraError("torch", "torch", f"running the PyTorch checkpoint {spec.weights}") from None
    return TorchBackend(spec, options)
