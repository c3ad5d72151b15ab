"""The typed model spec: how to feed a model and how to name its outputs.

A :class:`ModelSpec` travels with every loaded model. Preprocessing is derived from its
:class:`PreprocessSpec` in exactly one place (:mod:`wanwu.imaging`), and the spec's fingerprint is part of
every cache key, so changing any step here can never return a stale cached answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from wanwu.errors import ModelError
from wanwu.paths import keep, wanwu_home

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]
ChannelOrder = Literal["RGB", "BGR"]
Layout = Literal["NCHW", "NHWC"]
OutputKind = Literal["logits", "probabilities"]
CropOffset = Literal["round", "floor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the short side, center-crop, scale, normalize, lay out.

    The defaults are ModelScope's general-recognition preprocessing (and torchvision's standard
    ImageNet evaluation transform): short side 256 with the long side truncated, PIL bilinear,
    center crop 224 with rounded offsets, /255, ImageNet mean/std, RGB, NCHW float32.
    """

    resize_short: int = 256
    crop_size: int = 224
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scale: float = 1.0 / 255.0
    channel_order: ChannelOrder = "RGB"
    layout: Layout = "NCHW"
    # Decode large JPEGs at a reduced DCT scale (libjpeg averages 2x2..8x8 blocks) when the result keeps
    # at least this multiple of ``resize_short`` on its short side (0 disables). 2.0 keeps every output
    # pixel an average over >= 2x2 decoded pixels. Measured: 1.0 would decode phone photos ~1.3x faster
    # but, on the 52 sample photos it would then scale by 1/2, flips the int8 MobileNetV2's top-1 on 4 more
    # of them than a full decode; 2.0 leaves the 1,000-photo agreement at 99.0%.
    jpeg_draft_factor: float = 2.0
    # Go on to libjpeg's 1/8 scale where the short side still keeps ``resize_short`` itself (a 4032x3024 phone
    # photo decodes at 504x378, not 1008x756). None: decided when the model is resolved (wanwu.models): True for
    # a model that quantizes its activations (int8), whose near ties flip at any change of pixels whatever the
    # scale, False for a float model, whose top-1 a full decode's keeps on 98.3% of phone-size photos at 1/8 and
    # 99.3% at 1/4 (benchmarks/bench_scale.py --model float). A spec never resolved decodes at 1/8.
    jpeg_eighth_scale: bool | None = None
    # Center-crop offset: "round" ((new - crop) / 2 rounded, torchvision/ModelScope) or "floor" (integer
    # division, as Hugging Face image processors such as ChineseCLIPImageProcessor crop).
    crop_offset: CropOffset = "round"

    def __post_init__(self) -> None:
        if self.crop_size <= 0 or self.resize_short < self.crop_size:
            raise ModelError(
                f"preprocess: need 0 < crop_size <= resize_short, got crop_size={self.crop_size}, "
                f"resize_short={self.resize_short}"
            )
        if self.crop_offset not in ("round", "floor"):
            raise ModelError(f"preprocess: crop_offset must be 'round' or 'floor', got {self.crop_offset!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ModelError("preprocess: mean and std need three values each, std > 0")

    def fingerprint(self) -> str:
        """A short stable hash of every field that can change the model's input."""
        payload = asdict(self)
        # A reduced-scale decode changes speed, not (materially) the pixels; but a full decode
        # (--full-decode) is asked for exactly: its results are never served from a reduced one.
        if payload.pop("jpeg_draft_factor") <= 0:
            payload["full_decode"] = True
        del payload["jpeg_eighth_scale"]  # a reduced scale, like the factor above
        if payload["crop_offset"] == "round":
            del payload["crop_offset"]  # the original rule: fingerprints made before this field stay valid
        return _digest(payload)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ModelError(f"preprocess: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        kwargs: dict[str, Any] = dict(data)
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        return cls(**kwargs)


@dataclass(frozen=True)
class ModelSpec:
    """Everything wanwu needs to know to run a classifier and name its classes."""

    name: str
    backend: str  # a key of wanwu.backends.BACKENDS, e.g. "onnx" or "torch"
    weights: Path  # the file the backend loads
    labels: tuple[str, ...]
    labels_en: tuple[str, ...] = ()  # English names, from a zh/en label table (records' label_en); else empty
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    output: OutputKind = "logits"
    source: str = ""  # what the user typed, for messages and /v1/models
    weights_fingerprint: str = ""  # filled by the loader; part of every cache key
    # The network, a key of wanwu.archs.ARCHS ("resnest", "chinese_clip", ...): what a torch backend and
    # ``wanwu convert`` build from ``weights``. Empty for a self-describing graph (an ONNX file).
    arch: str = ""
    # Open-vocabulary models (CLIP): the prompt templates ("一张{}的照片") whose text embeddings, averaged per
    # label, the image is compared with. The labels and prompts then decide the outputs, so they are part of
    # the cache key. Empty for a fixed classifier.
    prompts: tuple[str, ...] = ()
    # CLIP's outputs are logit_scale * cosine; ``--score logit`` reports them divided by this (the cosine).
    logit_scale: float = 1.0

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def cache_namespace(self, numerics: Mapping[str, str] | None = None) -> str:
        """Model weights + label count + preprocessing + output kind (+ for an open-vocabulary model, the
        label texts and prompts) + ``numerics``, how the backend makes its numbers where that is not fp32 on a
        CPU (device class, precision, a GPU JPEG decoder): the cache-key prefix. bf16 results on a GPU and fp32
        results on a CPU never share entries; fp32 on a CPU keeps the namespace it always had."""
        payload: dict[str, Any] = {
            "weights": self.weights_fingerprint,
            "classes": self.num_classes,
            "preprocess": self.preprocess.fingerprint(),
            "output": self.output,
        }
        if self.prompts:
            payload["vocabulary"] = self.vocabulary_fingerprint()
        if numerics:
            payload["numerics"] = dict(numerics)
        return _digest(payload)

    def vocabulary_fingerprint(self) -> str:
        """The labels and prompt templates (what an open-vocabulary model's text embeddings depend on)."""
        return _digest({"labels": list(self.labels), "prompts": list(self.prompts)})

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "backend": self.backend,
            "num_classes": self.num_classes,
            "arch": self.arch,
            "output": self.output,
            "preprocess": asdict(self.preprocess),
            "fingerprint": self.cache_namespace(),
        }


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a weights file, memoised under ``$WANWU_HOME/fingerprints`` by (path, size, mtime), so big
    checkpoints hash once. Nothing is written beside the user's model (a read-only or shared folder), and
    a memo is trusted only for the very file it was made from."""
    stat = path.stat()
    resolved = str(path.resolve())
    memo = wanwu_home() / "fingerprints" / (hashlib.sha256(resolved.encode()).hexdigest()[:32] + ".txt")
    tag = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
    try:
        saved_path, saved_tag, saved = memo.read_text(encoding="utf-8").split("\n")[:3]
        if saved_path == resolved and saved_tag == tag and len(saved) == 64:
            return saved
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    keep(memo, f"{resolved}\n{tag}\n{digest}\n")  # or, in an unwritable home, hash again next time
    return digest
