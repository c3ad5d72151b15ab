"""What a file may cost to decode, judged from its header before a pixel is decoded.

A pixel limit alone does not bound the work or the memory of a decode:

* a progressive JPEG is decoded scan by scan over its whole coefficient buffer, so 300 refinement scans of a
  12000x12000 image cost 300 passes (and the buffer, 2 bytes per coefficient, is held whatever the DCT
  scale the decode reduces to): :func:`jpeg_scans` counts the scans of the first image (SOS markers, read
  from the marker segments and the entropy-coded data between them), and more than :data:`MAX_JPEG_SCANS`
  is refused;
* memory follows the decoded mode: Pillow holds RGB, RGBA, CMYK, LA, 32-bit integer and float pixels in 4
  bytes, 16-bit ones in 2: :func:`decoded_bytes` is pixels x bytes per pixel (plus a JPEG's coefficient
  buffer where it is kept), refused above the budget (``DecodeOptions.max_memory``, by default 4 bytes per
  pixel of ``--max-pixels``);
* a tiled TIFF is decoded tile by tile, with Python work per tile: more than :data:`MAX_TIFF_TILES` tiles
  (or strips) is refused.

Each refusal is a :class:`~wanwu.errors.TooLargeError` whose message names the limit.
"""

from __future__ import annotations

import re
import struct

from PIL import Image

from wanwu.errors import TooLargeError

MAX_JPEG_SCANS = 100  # photos have 1 (baseline) to about 12 (progressive); encoders never write 100
MAX_TIFF_TILES = 65_536  # a 150-megapixel image in 64x64 tiles has 36,600
BYTES_PER_PIXEL_BUDGET = 4  # the default memory budget: this many bytes per pixel of the pixel limit

_TWO_BYTES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ONE_BYTE = frozenset({"1", "L", "P"})
# A marker in entropy-coded data: 0xFF then anything but a stuffed zero or a restart marker (RST0-7).
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length
_SOS, _EOI = 0xDA, 0xD9
_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)})
_SEQUENTIAL = frozenset({0xC0, 0xC1})  # baseline and extended sequential, Huffman-coded


def bytes_per_pixel(mode: str) -> int:
    """What Pillow holds per pixel of ``mode`` (multi-band modes are 4 bytes, RGB included)."""
    return 1 if mode in _ONE_BYTE else 2 if mode in _TWO_BYTES else 4


def jpeg_scans(data: bytes, stop_after: int = MAX_JPEG_SCANS) -> int:
    """The scans (SOS segments) of the first image in a JPEG, counted up to ``stop_after + 1``.

    Marker segments are skipped by their length and entropy-coded data up to the next real marker, so bytes
    inside a segment (an EXIF thumbnail, an ICC profile, a comment) are never taken for markers. A sequential
    (baseline) JPEG whose first scan holds every component is decoded from that scan alone (libjpeg reads no
    further: scans repeated after it cost nothing but an error): it counts as 1, and nothing past its header is
    read (most photos)."""
    pos, end, scans, frame = 2, len(data), 0, (0, 0)  # frame: the SOF marker and its number of components
    while pos + 1 < end and scans <= stop_after:
        if data[pos] != 0xFF:
            return scans  # not a marker where one must be: the decoder will say what is wrong
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > end:
            break
        if marker in _SOF and pos + 9 < end:
            frame = (marker, data[pos + 9])
        elif marker == _SOS and scans == 0 and frame[0] in _SEQUENTIAL and pos + 4 < end and data[pos + 4] == frame[1]:
            return 1
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == _SOS:
            scans += 1
            found = _MARKER.search(data, pos)  # the end of this scan's entropy-coded data
            if found is None:
                break
            pos = found.start()
    return scans


def check_header(data: bytes) -> None:
    """Refuse, from its bytes alone (before Pillow parses it: opening a TIFF of 562,500 tiles costs seconds
    and hundreds of MB by itself), a JPEG of too many scans or a TIFF of too many tiles."""
    if data.startswith(b"\xff\xd8"):
        if jpeg_scans(data) > MAX_JPEG_SCANS:
            raise TooLargeError(
                f"JPEG with more than {MAX_JPEG_SCANS} scans (refused: each scan is a pass over the whole "
                f"image; photos have at most about 12)"
            )
    elif data[:4] in _TIFF_MAGIC:
        tiles = tiff_tiles(data)
        if tiles > MAX_TIFF_TILES:
            raise TooLargeError(f"TIFF of {tiles:,} tiles or strips, above the limit of {MAX_TIFF_TILES:,}")


def check_memory(image: Image.Image, max_memory: int, stored: tuple[int, int]) -> None:
    """Refuse ``image`` (opened, not loaded; ``stored``: its size before any DCT scaling) when its decoded
    pixels would take more than ``max_memory`` bytes."""
    need = decoded_bytes(image, stored)
    if need > max_memory:
        width, height = stored
        raise TooLargeError(
            f"decoding this {width}x{height} {image.mode} image needs {need / 2**20:,.0f} MiB, above the "
            f"decode memory budget of {max_memory / 2**20:,.0f} MiB ({BYTES_PER_PIXEL_BUDGET} bytes per "
            f"pixel of --max-pixels)"
        )


def decoded_bytes(image: Image.Image, stored: tuple[int, int] | None = None) -> int:
    """Memory the decoded pixels take: pixels (at the DCT scale a JPEG is decoded to) x bytes per pixel of the
    decoded mode, and for a JPEG whose scans are buffered (progressive) its coefficients, 2 bytes each, at the
    ``stored`` size whatever the scale."""
    total = image.size[0] * image.size[1] * bytes_per_pixel(image.mode)
    width, height = stored or image.size
    layers = getattr(image, "layer", None)
    if image.format in ("JPEG", "MPO") and image.info.get("progressive") and layers:
        h_max = max(layer[1] for layer in layers) or 1
        v_max = max(layer[2] for layer in layers) or 1
        coefficients = sum(width * height * layer[1] * layer[2] // (h_max * v_max) for layer in layers)
        total += 2 * coefficients
    return total


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TILE_TAGS = (324, 273)  # TileOffsets, StripOffsets


def tiff_tiles(data: bytes) -> int:
    """How many tiles (or strips) the first image of a TIFF (or BigTIFF) has, read from its first directory's
    entry counts (the offset arrays themselves are not read); 0 when the directory cannot be read."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:
            (ifd,) = struct.unpack_from(order + "Q", data, 8)
            (entries,) = struct.unpack_from(order + "Q", data, ifd)
            first, size, layout = ifd + 8, 20, order + "HHQ"
        else:
            (ifd,) = struct.unpack_from(order + "I", data, 4)
            (entries,) = struct.unpack_from(order + "H", data, ifd)
            first, size, layout = ifd + 2, 12, order + "HHI"
        counts = {}
        for i in range(min(entries, 4096)):
            tag, _, count = struct.unpack_from(layout, data, first + i * size)
            counts[tag] = count
    except struct.error:
        return 0
    return next((counts[tag] for tag in _TILE_TAGS if tag in counts), 0)
