"""Decoding that never breaks a run: every awkward case made here, each gets the right outcome."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import image_bytes
from wanwu.errors import DecodeError, InputError, TooLargeError, UnsupportedError
from wanwu.imaging import prepare, to_batch
from wanwu.spec import PreprocessSpec

SPEC = PreprocessSpec()


def _png16_gray(values: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG written by hand (Pillow cannot write one from uint16 RGB)."""
    h, w = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _png16_rgb(values: np.ndarray) -> bytes:
    h, w, _ = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_plain_jpeg_shape_and_size() -> None:
    out = prepare(image_bytes(size=(640, 480)), SPEC)
    assert out.pixels.shape == (224, 224, 3) and out.pixels.dtype == np.uint8
    assert (out.width, out.height) == (640, 480)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP", "TIFF", "JPEG"])
def test_formats(fmt: str) -> None:
    out = prepare(image_bytes((10, 120, 240), fmt=fmt), SPEC)
    mean = out.pixels.reshape(-1, 3).mean(axis=0)
    assert mean[2] > mean[0] + 60  # still blue: channels in RGB order whatever the format


def test_grey_l_mode_becomes_rgb() -> None:
    out = prepare(image_bytes((128, 128, 128), mode="L", fmt="PNG"), SPEC)
    assert out.pixels.shape == (224, 224, 3)
    assert np.all(out.pixels[..., 0] == out.pixels[..., 1])


def test_cmyk_jpeg() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (220, 20, 20)).convert("CMYK").save(buf, "JPEG")
    px = prepare(buf.getvalue(), SPEC).pixels.reshape(-1, 3).mean(axis=0)
    assert px[0] > 150 and px[1] < 80 and px[2] < 80


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (300, 1))
    out = prepare(_png16_gray(ramp), SPEC).pixels[..., 0].astype(int)
    # Clipping would make everything above 255/65535 white; scaling keeps the ramp.
    assert out.min() < 40 and out.max() > 215
    assert np.all(np.diff(out[112]) >= 0)
    assert 100 < out[112, 112] < 155  # middle of the ramp is mid-grey


def test_sixteen_bit_rgb() -> None:
    arr = np.zeros((256, 256, 3), dtype=np.uint16)
    arr[..., 1] = 40000
    px = prepare(_png16_rgb(arr), SPEC).pixels.reshape(-1, 3).mean(axis=0)
    assert px[0] < 5 and 150 < px[1] < 160 and px[2] < 5  # 40000/65535*255 = 155.6


def test_alpha_composited_on_white() -> None:
    img = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 150, 300))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    px = prepare(buf.getvalue(), SPEC).pixels
    assert tuple(px[112, 200]) == (255, 255, 255)  # transparent half is white, not black
    assert tuple(px[112, 10]) == (255, 0, 0)


def test_palette_with_transparency() -> None:
    img = Image.new("P", (300, 300), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (0, 0, 150, 300))
    img.info["transparency"] = 0
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=0)
    px = prepare(buf.getvalue(), SPEC).pixels
    assert tuple(px[112, 200]) == (255, 255, 255)
    assert tuple(px[112, 10]) == (0, 255, 0)


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (300, 300), c) for c in [(250, 0, 0), (0, 0, 250)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    px = prepare(buf.getvalue(), SPEC).pixels.reshape(-1, 3).mean(axis=0)
    assert px[0] > 200 and px[2] < 50


def test_exif_rotation_applied(photos: Path) -> None:
    """A photo stored rotated with an EXIF orientation tag is prepared like the upright photo."""
    upright = Image.open(photos / "n01440764_tench.JPEG").convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera would store, sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    b1, b2 = io.BytesIO(), io.BytesIO()
    upright.save(b1, "JPEG", quality=95)
    stored.save(b2, "JPEG", quality=95, exif=exif.tobytes())
    a, b = prepare(b1.getvalue(), SPEC), prepare(b2.getvalue(), SPEC)
    assert (b.width, b.height) == (a.width, a.height) == upright.size
    diff = np.abs(a.pixels.astype(int) - b.pixels.astype(int)).mean()
    assert diff < 3, diff  # same picture up to JPEG re-encoding noise
    rotated_wrong = np.abs(a.pixels.astype(int) - np.rot90(b.pixels).astype(int)).mean()
    assert rotated_wrong > 10 * diff


def test_truncated_jpeg_is_an_error_not_invented_pixels() -> None:
    data = image_bytes(size=(800, 600))
    with pytest.raises(DecodeError, match=r"truncated|decode"):
        prepare(data[: len(data) // 2], SPEC)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", DecodeError),
        (b"this is not an image at all" * 10, UnsupportedError),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, DecodeError),
        (b"%PDF-1.4 fake pdf", UnsupportedError),
    ],
)
def test_garbage(data: bytes, error: type[InputError]) -> None:
    with pytest.raises(error):
        prepare(data, SPEC)


def test_pixel_limit_refuses_before_decoding() -> None:
    data = image_bytes(size=(2000, 1500), fmt="PNG")
    with pytest.raises(TooLargeError, match="3,000,000 pixels"):
        prepare(data, SPEC, 2_000_000)
    assert prepare(data, SPEC, 3_000_000).width == 2000


def test_decompression_bomb_header() -> None:
    """A PNG header claiming 100k x 100k pixels is refused from its header alone."""
    big = _png16_gray(np.zeros((4, 4), dtype=np.uint16))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 16, 0, 0, 0, 0)
    patched = big[:8] + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    patched += big[8 + 25 :]
    with pytest.raises(TooLargeError):
        prepare(patched, SPEC)


@pytest.mark.shared
def test_large_jpeg_draft_matches_full_decode(photos: Path) -> None:
    """A phone-size JPEG of real detail (a mosaic of 64 real photos at their own resolution): libjpeg's reduced
    decode stays within about a level of the full decode, yet is a different decode (so the test can fail)."""
    tiles = [Image.open(p).convert("RGB").resize((504, 378)) for p in sorted(photos.iterdir())[:64]]
    mosaic = Image.new("RGB", (4032, 3024))
    for i, tile in enumerate(tiles):
        mosaic.paste(tile, ((i % 8) * 504, (i // 8) * 378))
    buf = io.BytesIO()
    mosaic.save(buf, "JPEG", quality=90)
    fast = prepare(buf.getvalue(), SPEC)
    full = prepare(buf.getvalue(), PreprocessSpec(jpeg_draft_factor=0))
    assert (fast.width, fast.height) == (full.width, full.height) == (4032, 3024)
    diff = np.abs(fast.pixels.astype(int) - full.pixels.astype(int))
    assert diff.mean() < 1.5
    assert diff.max() > 0  # the reduced decode really ran


def test_to_batch_normalizes_like_the_reference() -> None:
    px = prepare(image_bytes(size=(500, 375)), SPEC).pixels
    ref = (px.astype(np.float32) / 255 - np.array(SPEC.mean, np.float32)) / np.array(SPEC.std, np.float32)
    out = to_batch([px, px], SPEC)
    assert out.shape == (2, 3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out[1], ref.transpose(2, 0, 1), atol=1e-5)
    nhwc = to_batch([px], PreprocessSpec(layout="NHWC", channel_order="BGR"))
    np.testing.assert_allclose(nhwc[0], ref[..., ::-1], atol=1e-5)
