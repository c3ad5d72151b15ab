"""Optional JPEG decoding on the GPU, for when the CPUs cannot decode as fast as the GPU infers.

A web-size photo costs about 4-5 ms of CPU to decode and preprocess, so 2,000-5,000 images/s would need 9-25
cores (42-105 for 12 MP photos). A :class:`JpegDecoder` decodes baseline JPEGs on the device instead
(``nvjpeg``: nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``), resizes and crops them there, and
hands back what the CPU path hands back (:class:`~wanwu.imaging.Prepared`: the uint8 HWC crop in host memory,
the upright source size), or None for a file it refuses or fails on, which the CPU path then decodes. Decoders
register by name in :data:`JPEG_DECODERS` (entry-point group ``wanwu.jpeg_decoders``, so a DALI decoder can be
a plugin).

Which images go where (:func:`gpu_decodable`): baseline (sequential Huffman) 3-component JPEGs whose reduced-size
CPU decode would not apply; everything else (PNG, progressive or CMYK JPEGs, large photos, which libjpeg decodes
at 1/2-1/8 scale more cheaply than a full GPU decode, images over the pixel limit or so elongated that the CPU
resamples only the crop's window) stays on the CPU path. The GPU's IDCT and resampling are not Pillow's, so a
run with a GPU decoder has a cache namespace of its own (:func:`decoder_numerics`).

:func:`select_jpeg_decoder` decides (``--jpeg-decoder``): ``cpu`` = none (the default); ``auto`` = the first
registered decoder that can start (its package and a CUDA device present), else the CPU path, with one warning
that says why; a decoder named explicitly that cannot start is an error naming what is missing, never a silent
fallback. :class:`GpuDecoding` is how a run (:mod:`wanwu.run`) sees the chosen decoder: which files it takes,
and batches of them decoded on a thread of its own.

Status: the routing, the fallbacks and the namespace are tested on a CPU with a stand-in decoder; nvJPEG itself
is untested (neither torchvision nor a GPU is available where this was written). ``benchmarks/gpu_check.py``
measures it end to end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from wanwu.errors import ClosedError, MissingExtraError, UsageError
from wanwu.imaging import RESIZE_AREA_LIMIT, Prepared, crop_geometry
from wanwu.registry import Registry
from wanwu.spec import PreprocessSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger("wanwu")
FALLS_BACK = "JPEGs are decoded on the CPU"  # what the warning of an ``auto`` that found no decoder ends with


class JpegDecoder(Protocol):
    @property
    def name(self) -> str: ...

    def decode(self, datas: Sequence[bytes], spec: PreprocessSpec) -> list[Prepared | None]:
        """Each JPEG (only images :func:`gpu_decodable` accepts) prepared as :func:`wanwu.imaging.prepare`
        prepares it, or None for one this decoder refuses or failed on: the CPU path decodes that one. Raising
        sends the whole batch to the CPU path."""
        ...


JpegDecoderFactory = Callable[[str], JpegDecoder]
JPEG_DECODERS: Registry[JpegDecoderFactory] = Registry("JPEG decoder", group="wanwu.jpeg_decoders")
JPEG_DECODERS.lazy("nvjpeg", "wanwu.gpudecode:NvJpegDecoder", extra="gpu-decode")


def check_jpeg_decoder(name: str) -> None:
    """``--jpeg-decoder``: cpu, auto or a registered decoder's name; anything else is a UsageError."""
    if name not in ("cpu", "auto") and name not in JPEG_DECODERS:
        raise UsageError(f"--jpeg-decoder: unknown {name!r}; choose cpu, auto or {', '.join(JPEG_DECODERS.names())}")


def select_jpeg_decoder(name: str, device: str) -> JpegDecoder | None:
    """The decoder ``--jpeg-decoder`` names, on ``device``; None = decode on the CPU."""
    name = (name or "cpu").strip().lower()
    if name == "cpu":
        return None
    if name != "auto":
        return JPEG_DECODERS.get(name)(device)  # what is missing raises, naming it
    reasons = []
    for candidate in JPEG_DECODERS.names():
        try:
            return JPEG_DECODERS.get(candidate)(device)
        except (MissingExtraError, UsageError) as e:
            reasons.append(f"{candidate} not used: {e}")
    log.warning("--jpeg-decoder auto: no GPU JPEG decoder can start here (%s); %s", "; ".join(reasons), FALLS_BACK)
    return None


def decoder_numerics(decoder: JpegDecoder | None) -> dict[str, str]:
    """What a GPU decoder adds to the cache namespace (its pixels are not Pillow's); nothing for the CPU path."""
    return {} if decoder is None else {"decoder": decoder.name}


class GpuDecoding:
    """A run's view of a :class:`JpegDecoder`: which files it takes (:meth:`takes`), and batches of them decoded
    on one thread of its own (:meth:`submit`), answered with prepared pixels or None (decode it on the CPU) per
    file. A decoder that raises, answers with the wrong number of results or hands back pixels of the wrong
    shape costs its files only the GPU: they go to the CPU path. So does one that has not answered a batch
    ``timeout`` seconds after it was submitted (a hung driver, say): a thread cannot be stopped, so the decoder
    is given up for good, every batch waiting on it goes to the CPU path, and it takes no file again
    (:attr:`stuck`). Closed means closed (:class:`ClosedError`)."""

    IN_FLIGHT = 2  # batches submitted at once: one decoding, one gathering behind it

    def __init__(self, decoder: JpegDecoder, max_pixels: int, batch_size: int, timeout: float = 30.0) -> None:
        self.decoder = decoder
        self.max_pixels = max_pixels
        self.batch_size = max(1, batch_size)
        self.timeout = timeout
        self.numerics = decoder_numerics(decoder)
        self.stuck = False  # a batch ran past its deadline: the decoder is given up
        self._failures = 0  # batches sent back to the CPU whole (only the first is a warning)
        self._pool: ThreadPoolExecutor | None = None
        self._waiting: dict[Future[list[Prepared | None]], tuple[int, threading.Timer]] = {}  # answer: files, timer
        self._lock = threading.Lock()
        self._closed = False

    def takes(self, data: bytes, spec: PreprocessSpec) -> bool:
        return not self.stuck and gpu_decodable(data, spec, self.max_pixels)

    def submit(self, datas: list[bytes], spec: PreprocessSpec,
               meter: Callable[[float], None] | None = None) -> Future[list[Prepared | None]]:
        """The batch's results, or None for each file after ``timeout`` seconds without an answer. ``meter`` is
        told the seconds the decoder spent on the batch (a run's --decode-budget counts them)."""
        answer: Future[list[Prepared | None]] = Future()
        with self._lock:
            if self._closed:
                raise ClosedError("this GPU decoder is closed")
            if self.stuck:
                answer.set_result([None] * len(datas))
                return answer
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="wanwu-gpudecode")
            timer = threading.Timer(self.timeout, self._expire, (answer,))
            timer.daemon = True
            self._waiting[answer] = (len(datas), timer)
            work = self._pool.submit(self._decode, datas, spec, meter)
        timer.start()
        work.add_done_callback(lambda done: self._answer(answer, done))
        return answer

    def _answer(self, answer: Future[list[Prepared | None]], work: Future[list[Prepared | None]]) -> None:
        with self._lock:
            waiting = self._waiting.pop(answer, None)
        if waiting is None:  # given up already: its files went to the CPU path
            return
        waiting[1].cancel()
        if work.cancelled():
            answer.cancel()
            answer.set_running_or_notify_cancel()  # wakes concurrent.futures.wait() callers too, not only callbacks
        else:
            answer.set_result(work.result())  # _decode never raises

    def _expire(self, late: Future[list[Prepared | None]]) -> None:
        """``late`` is past its deadline: give the decoder up, and every batch waiting on it to the CPU path."""
        with self._lock:
            if late not in self._waiting:  # answered as its timer fired
                return
            self.stuck = True
            waiting, self._waiting = self._waiting, {}
        log.warning("JPEG decoder %s has not answered a batch in %g s; decoding every JPEG on the CPU from now on",
                    self.decoder.name, self.timeout)
        for answer, (n, timer) in waiting.items():
            timer.cancel()
            answer.set_result([None] * n)

    def _decode(self, datas: list[bytes], spec: PreprocessSpec,
                meter: Callable[[float], None] | None = None) -> list[Prepared | None]:
        start = time.monotonic()
        try:
            results = self.decoder.decode(datas, spec)
        except Exception as e:  # the files did nothing wrong that the CPU path would not report itself
            return self._to_cpu(datas, f"failed on a batch of {len(datas)} ({type(e).__name__}: {e})")
        finally:
            if meter is not None:
                meter(time.monotonic() - start)
        if len(results) != len(datas):
            return self._to_cpu(datas, f"answered {len(results)} of {len(datas)} images")
        shape = (spec.crop_size, spec.crop_size, 3)
        wrong = [r for r in results if r is not None and (r.pixels.shape != shape or r.pixels.dtype.name != "uint8")]
        if wrong:
            return self._to_cpu(datas, f"returned crops of shape {wrong[0].pixels.shape} {wrong[0].pixels.dtype}, "
                                       f"not {shape} uint8")
        return results

    def _to_cpu(self, datas: list[bytes], why: str) -> list[Prepared | None]:
        """The whole batch to the CPU path: a warning the first time, then at debug level."""
        level = logging.WARNING if self._failures == 0 else logging.DEBUG
        self._failures += 1
        log.log(level, "JPEG decoder %s %s; decoding the batch on the CPU", self.decoder.name, why)
        return [None] * len(datas)

    def close(self) -> None:
        """Stop the decoder's thread; a stuck one is left behind (a daemon's work cannot be stopped)."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
            timers = [timer for _, timer in self._waiting.values()]
        for timer in timers:
            timer.cancel()
        if pool is not None:
            pool.shutdown(wait=not self.stuck, cancel_futures=True)


def open_gpu_decoding(name: str, device: str, max_pixels: int, batch_size: int,
                      timeout: float = 30.0) -> GpuDecoding | None:
    """What ``--jpeg-decoder NAME`` gives a recognizer: None for the CPU path (``cpu``, or ``auto`` where no
    decoder can start, said once in a warning). ``timeout``: seconds a batch may take (``--decode-timeout``)."""
    decoder = select_jpeg_decoder(name, device)
    if decoder is None:
        return None
    log.info("decoding baseline JPEGs with %s on %s", decoder.name, device)
    return GpuDecoding(decoder, max_pixels, batch_size, timeout)


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


def gpu_decodable(data: bytes, spec: PreprocessSpec, max_pixels: int | None = None) -> bool:
    """A baseline 3-component JPEG that the CPU would decode at full size (no reduced DCT scale applies), of at
    most ``max_pixels``, whose resized image the CPU path resizes whole (not only the crop's window)."""
    frame = jpeg_frame(data)
    if frame is None:
        return False
    marker, width, height, components = frame
    if marker not in _BASELINE or components != 3 or width <= 0 or height <= 0:
        return False
    if max_pixels is not None and width * height > max_pixels:  # the CPU path says too_large
        return False
    new_w, new_h, _, _ = crop_geometry(width, height, spec)
    if new_w * new_h > RESIZE_AREA_LIMIT:  # a strip: the CPU resamples only the crop's window
        return False
    factor = spec.jpeg_draft_factor
    return factor <= 0 or min(width, height) < 2 * factor * spec.resize_short  # 1/2 scale would not apply


# --- on the device ---------------------------------------------------------------------------------------------


def resize_crop(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 CHW on any device -> uint8 HWC center crop, with the CPU path's geometry (short side to
    ``resize_short``, long side truncated, the crop offset rule) and antialiased bilinear resampling."""
    import torch.nn.functional as F

    _, height, width = image.shape
    new_w, new_h, left, top = crop_geometry(width, height, spec)
    crop = spec.crop_size
    mode = "bicubic" if spec.interpolation == "bicubic" else "bilinear"
    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
    out: torch.Tensor = resized[0, :, top : top + crop, left : left + crop].round().clamp(0, 255).to(image.dtype)
    return out.permute(1, 2, 0).contiguous()


def prepared_batch(frames: Sequence[torch.Tensor], spec: PreprocessSpec) -> list[Prepared]:
    """Decoded uint8 CHW frames (upright, on any device) -> what the CPU path hands the inference: the crops
    copied to host memory at once (one synchronisation per batch), with each frame's size."""
    import torch

    if not frames:
        return []
    crops = torch.stack([resize_crop(frame, spec) for frame in frames]).cpu().numpy()
    return [Prepared(crops[i], int(frame.shape[2]), int(frame.shape[1])) for i, frame in enumerate(frames)]


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

    def decode(self, datas: Sequence[bytes], spec: PreprocessSpec) -> list[Prepared | None]:
        torch = self._torch
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            frames = self._decode_jpeg(encoded, mode=self._mode, device=self._device, apply_exif_orientation=True)
        except RuntimeError as e:  # one bad file fails the whole batch (no partial results): each alone
            if len(datas) == 1:
                log.debug("nvjpeg could not decode an image (%s); decoding it on the CPU", e)
                return [None]
            return [result for data in datas for result in self.decode([data], spec)]
        return list(prepared_batch(frames, spec))
