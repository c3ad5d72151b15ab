"""PyTorch backend: a checkpoint run by the network its spec names (``ModelSpec.arch``), on CPU or CUDA.

Builds the architecture from :data:`wanwu.archs.ARCHS` (the seed model's ResNeSt strictly: every weight must
be there), in eval mode under :func:`torch.inference_mode`, channels-last, with bf16/fp16 autocast on CUDA. torch is
imported inside the factory: without it, using this backend raises
:class:`~wanwu.errors.MissingExtraError` naming the ``torch`` extra.
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from wanwu.backends import Backend, BackendOptions
from wanwu.embeddings import EmbeddingSource
from wanwu.errors import MissingExtraError, ModelError, OutOfMemoryError, UsageError
from wanwu.spec import ModelSpec

if TYPE_CHECKING:
    import torch


class TorchBackend:
    def __init__(self, spec: ModelSpec, options: BackendOptions) -> None:
        import torch

        from wanwu.archs import build_network
        from wanwu.backends.onnx import default_threads

        if spec.preprocess.layout != "NCHW":
            raise ModelError(f"the torch backend needs NCHW input, the spec says {spec.preprocess.layout}")
        self._torch = torch
        self._device = resolve_device(options.device)
        self._dtype = resolve_precision(options.precision, self._device)
        if self._device.type == "cpu":
            torch.set_num_threads(options.threads or default_threads())
        model = build_network(spec)
        self._model = model.to(self._device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._weights = spec.weights
        self.embedding_source: EmbeddingSource | None = None
        if options.embeddings:
            own = hasattr(model, "embed")
            self.embedding_source = EmbeddingSource("image embedding" if own else "input of the last linear layer")

    @property
    def streams(self) -> int:
        return 1  # one batch at a time: it already uses every thread (or the GPU)

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def precision(self) -> str:
        return {None: "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}[
            str(self._dtype) if self._dtype is not None else None
        ]

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self._forward(batch, embed=False)[0]

    def infer_embedded(
        self, batch: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Scores and embeddings: a CLIP head's projected image embedding, or else the input of the network's
        last linear layer (a classifier's pooled features: 2048-d for the seed ResNeSt-101)."""
        scores, embedded = self._forward(batch, embed=True)
        assert embedded is not None
        return scores, embedded

    def _forward(
        self, batch: npt.NDArray[np.float32], embed: bool
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        torch = self._torch
        try:
            with torch.inference_mode(), self._autocast():
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
                x = x.to(self._device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                if not embed:
                    return np.asarray(self._model(x).float().cpu().numpy(), dtype=np.float32), None
                scores, features = _embedded(self._model, x)
                return (np.asarray(scores.float().cpu().numpy(), dtype=np.float32),
                        np.asarray(features.float().cpu().numpy(), dtype=np.float32).reshape(len(batch), -1))
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            raise OutOfMemoryError(f"CUDA out of memory for a batch of {len(batch)}: {e}") from None
        except RuntimeError as e:
            if "can't allocate memory" in str(e) or "not enough memory" in str(e):
                raise OutOfMemoryError(f"out of memory for a batch of {len(batch)}: {e}") from None
            raise

    def embed_texts(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Normalised text embeddings (search queries) of a model with a text tower (Chinese-CLIP)."""
        embed = getattr(self._model, "embed_texts", None)
        if embed is None:
            raise UsageError("this model has no text tower: search by --image, or use a Chinese-CLIP model")
        with self._torch.inference_mode():
            return np.asarray(embed(texts, self._weights), dtype=np.float32)

    def relabel(self, spec: ModelSpec) -> TorchBackend:
        """This backend over the same network, scoring ``spec``'s labels instead (zero-shot models only)."""
        relabel = getattr(self._model, "relabel", None)
        if relabel is None:
            raise UsageError("this model's classes are fixed: only a zero-shot (CLIP) model takes other labels")
        clone = copy.copy(self)
        clone._model = relabel(spec)
        return clone

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._dtype is None:
            return contextlib.nullcontext()
        return self._torch.autocast(device_type=self._device.type, dtype=self._dtype)

    def close(self) -> None:
        self._model = None
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()


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
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: this torch has no usable CUDA device")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on CUDA when supported, else fp16; CPU: fp32."""
    import torch

    precision = precision or "auto"
    if precision == "fp32":
        return None
    if device.type != "cuda":
        if precision == "auto":
            return None
        raise UsageError(f"--precision {precision} needs a CUDA device; on the CPU wanwu runs fp32")
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise UsageError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
    return table[precision]


def create(spec: ModelSpec, options: BackendOptions) -> Backend:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingExtraError("torch", "torch", f"running the PyTorch checkpoint {spec.weights}") from None
    return TorchBackend(spec, options)
