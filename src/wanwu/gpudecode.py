"""Optional JPEG decoding on the GPU, for when the CPUs cannot decode as fast as the GPU infers.

A web-size photo costs about 4-5 ms of CPU to decode and preprocess, so 2,000-5,000 images/s would need 9-25
cores (42-105 for 12 MP photos). A :class:`JpegDecoder` decodes baseline JPEGs on the device instead
(``nvjpeg``: nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``), resizes and crops them there, and
hands back uint8 HWC crops as the CPU path does. Decoders register by name in :data:`JPEG_DECODERS` (entry-point
group ``wanwu.jpeg_decoders``, so a DALI decoder can be a plugin).

Which images go where (:func:`gpu_decodable`): baseline (sequential Huffman) 3-component JPEGs whose reduced-size
CPU decode would not apply; everything else (PNG, progressive or CMYK JPEGs, large photos, which libjpeg decodes
at 1/2-1/8 scale more cheaply than a full GPU decode) stays on the CPU path. The GPU's IDCT and resampling are
not Pillow's, so its results live in a cache namespace of their own (:func:`decoder_numerics`).

:func:`select_jpeg_decoder` decides: ``cpu`` = none; ``auto`` = the first registered decoder that can start
(its package and a CUDA device present), else the CPU path, with a log line that says why; a decoder named
explicitly that cannot start is an error naming what is missing, never a silent fallback.

Status: the registry, the selection and fallback rules, the namespace and the on-device resize/crop are tested
on a CPU; the pipeline does not route images through a GPU decoder yet, and nvJPEG itself is untested (neither
torchvision nor a GPU is available where this was written). ``benchmarks/gpu_check.py`` is where to measure it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from wanwu.errors import MissingExtraError, UsageError
from wanwu.registry import Registry
from wanwu.spec import PreprocessSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger("wanwu")


class JpegDecoder(Protocol):
    @property
    def name(self) -> str: ...

    def decode(self, datas: Sequence[bytes], spec: PreprocessSpec) -> list[torch.Tensor]:
        """Each JPEG as its uint8 HWC center crop, on the device (only images :func:`gpu_decodable` accepts)."""
        ...


JpegDecoderFactory = Callable[[str], JpegDecoder]
JPEG_DECODERS: Registry[JpegDecoderFactory] = Registry("JPEG decoder", group="wanwu.jpeg_decoders")
JPEG_DECODERS.lazy("nvjpeg", "wanwu.gpudecode:NvJpegDecoder", extra="gpu-decode")


def select_jpeg_decoder(name: str, device: str) -> JpegDecoder | None:
    """The decoder ``--jpeg-decoder`` names, on ``device``; None = decode on the CPU."""
    name = (name or "cpu").strip().lower()
    if name == "cpu":
        return None
    if name != "auto":
        return JPEG_DECODERS.get(name)(device)  # what is missing raises, naming it
    for candidate in JPEG_DECODERS.names():
        try:
            return JPEG_DECODERS.get(candidate)(device)
        except (MissingExtraError, UsageError) as e:
            log.info("JPEG decoder %s not used (%s): decoding on the CPU", candidate, e)
    return None


def decoder_numerics(decoder: JpegDecoder | None) -> dict[str, str]:
    """What a GPU decoder adds to the cache namespace (its pixels are not Pillow's); nothing for the CPU path."""
    return {} if decoder is None else {"decoder": decoder.name}


# --- which JPEGs a GPU decodes --------------------------------------------------------------------------------

_BASELINE = {0xC0, 0xC1}  # sequential DCT, Huffman: what nvJPEG's hardware and GPU paths all decode
_OTHER_SOF = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # progressive, lossless, arithmetic


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """``(SOF marker, width, height, components)`` from a JPEG's frame header; None if not a readable JPEG."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _BASELINE or marker in _OTHER_SOF:
            if pos + 10 > len(data):
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return marker, width, height, data[pos + 9]
        if marker == 0xDA or length < 2:  # scan data before a frame header: not a JPEG we understand
            return None
        pos += 2 + length
    return None


def gpu_decodable(data: bytes, spec: PreprocessSpec) -> bool:
    """A baseline 3-component JPEG that the CPU would decode at full size (no reduced DCT scale applies)."""
    frame = jpeg_frame(data)
    if frame is None:
        return False
    marker, width, height, components = frame
    if marker not in _BASELINE or components != 3 or width <= 0 or height <= 0:
        return False
    factor = spec.jpeg_draft_factor
    return factor <= 0 or min(width, height) < 2 * factor * spec.resize_short  # 1/2 scale would not apply


# --- on the device ---------------------------------------------------------------------------------------------


def resize_crop(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 CHW on any device -> uint8 HWC center crop, with the CPU path's geometry (short side to
    ``resize_short``, long side truncated, the crop offset rule) and antialiased bilinear resampling."""
    import torch.nn.functional as F

    from wanwu.imaging import crop_geometry

    _, height, width = image.shape
    new_w, new_h, left, top = crop_geometry(width, height, spec)
    crop = spec.crop_size
    mode = "bicubic" if spec.interpolation == "bicubic" else "bilinear"
    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
    out: torch.Tensor = resized[0, :, top : top + crop, left : left + crop].round().clamp(0, 255).to(image.dtype)
    return out.permute(1, 2, 0).contiguous()


class NvJpegDecoder:
    """nvJPEG through torchvision (the ``gpu-decode`` extra) on a CUDA device."""

    name = "nvjpeg"

    def __init__(self, device: str) -> None:
        try:
            import torch
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            raise MissingExtraError("torchvision", "gpu-decode", "decoding JPEGs on the GPU (nvJPEG)") from None
        if not device.startswith("cuda") and device != "auto":
            raise UsageError(f"--jpeg-decoder nvjpeg decodes on a CUDA device, not {device!r}")
        if not torch.cuda.is_available():
            raise UsageError("--jpeg-decoder nvjpeg: this torch has no usable CUDA device")
        self._torch = torch
        self._device = torch.device("cuda" if device == "auto" else device)
        self._decode_jpeg: Any = decode_jpeg
        self._mode = ImageReadMode.RGB

    def decode(self, datas: Sequence[bytes], spec: PreprocessSpec) -> list[torch.Tensor]:
        torch = self._torch
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        frames = self._decode_jpeg(encoded, mode=self._mode, device=self._device, apply_exif_orientation=True)
        return [resize_crop(frame, spec) for frame in frames]
