"""Files built to cost a decoder time or memory: each is refused or bounded, and costs only its own record.

Every hostile file is generated here (nothing is shipped): a progressive JPEG with hundreds of scans, PNGs whose
decoded mode is large (RGBA, 16-bit), a TIFF of half a million tiles, a header that claims 200 megapixels.
"""

from __future__ import annotations

import io
import re
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers import image_bytes
from tests.hostile_seams import marking_decode
from wanwu import RecognizeOptions, Recognizer
from wanwu.decodecost import MAX_JPEG_SCANS, MAX_TIFF_TILES, jpeg_scans, tiff_tiles
from wanwu.errors import DecodeError, TooLargeError, UsageError
from wanwu.imaging import DecodeOptions, decode_jobs, prepare
from wanwu.sources import InputItem
from wanwu.spec import PreprocessSpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = PreprocessSpec()
Model = tuple[Path, Path]


# --- generators ----------------------------------------------------------------------------------------------


def _segments(jpeg: bytes) -> list[tuple[int, bytes]]:
    """A JPEG's marker segments up to EOI, each scan with its entropy-coded data."""
    marker = re.compile(rb"\xff[^\x00\xd0-\xd7]")
    out, pos = [], 2
    while jpeg[pos + 1] != 0xD9:
        kind = jpeg[pos + 1]
        end = pos + 2 + int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        if kind == 0xDA:
            found = marker.search(jpeg, end)
            assert found is not None
            end = found.start()
        out.append((kind, jpeg[pos:end]))
        pos = end
    return out


def many_scans(photo: Image.Image, scans: int) -> bytes:
    """A progressive JPEG of ``photo`` whose last refinement scan is repeated until it has ``scans`` scans."""
    buf = io.BytesIO()
    photo.convert("RGB").save(buf, "JPEG", progressive=True, quality=85)
    jpeg = buf.getvalue()
    own = [body for kind, body in _segments(jpeg) if kind == 0xDA]
    return jpeg[:-2] + own[-1] * (scans - len(own)) + b"\xff\xd9"


def png(width: int, height: int, color_type: int, depth: int, pixel: bytes) -> bytes:
    """A PNG of one colour written row by row (no full-size image is ever held to make it)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = b"\x00" + pixel * width
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` grey pixels (its data is one empty deflate stream)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def tiled_tiff(width: int, height: int, tile: int = 16) -> bytes:
    """An uncompressed grey TIFF of ``tile`` x ``tile`` tiles, every tile pointing at the same 256 bytes."""
    n = -(-width // tile) * -(-height // tile)
    data = bytes(range(256)) * (tile * tile // 256)
    offsets = 8 + len(data)
    counts = offsets + 4 * n
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (277, 3, 1, 1), (322, 3, 1, tile), (323, 3, 1, tile), (324, 4, n, offsets), (325, 4, n, counts)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags) + b"\0\0\0\0"
    return (b"II*\x00" + struct.pack("<I", counts + 4 * n) + data + struct.pack(f"<{n}I", *([8] * n))
            + struct.pack(f"<{n}I", *([len(data)] * n)) + ifd)


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


# --- decode cost ---------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_a_jpeg_of_absurdly_many_scans_is_refused_before_decoding(photos: Path) -> None:
    photo = Image.open(sorted(photos.iterdir())[7])
    hostile = many_scans(photo, 300)
    assert jpeg_scans(hostile) > MAX_JPEG_SCANS
    with pytest.raises(TooLargeError, match=f"more than {MAX_JPEG_SCANS} scans"):
        prepare(hostile, SPEC)
    # a real progressive photo (about 10 scans) and one at the cap still decode
    assert prepare(many_scans(photo, 10), SPEC).pixels.shape == (224, 224, 3)
    assert prepare(many_scans(photo, MAX_JPEG_SCANS), SPEC).pixels.shape == (224, 224, 3)


def test_scan_markers_inside_segments_are_not_counted() -> None:
    """An APP segment (say an ICC profile) full of FF DA bytes is skipped by its length, not taken for scans."""
    jpeg = image_bytes(size=(64, 48))
    app = b"\xff\xe2" + (2 + 400).to_bytes(2, "big") + b"\xff\xda" * 200
    assert jpeg_scans(jpeg[:2] + app + jpeg[2:]) == jpeg_scans(jpeg) == 1


def test_scans_after_a_complete_sequential_scan_are_never_decoded_so_not_counted() -> None:
    """libjpeg decodes a baseline JPEG whose first scan holds every component from that scan alone: the repeats
    after it cost nothing (the decode ends with an error), so such a file is not refused."""
    jpeg = image_bytes(size=(64, 48))
    scan = next(body for kind, body in _segments(jpeg) if kind == 0xDA)
    repeated = jpeg[:-2] + scan * 300 + b"\xff\xd9"
    assert jpeg_scans(repeated) == 1
    with pytest.raises(DecodeError, match="broken data stream"):
        prepare(repeated, SPEC)


def test_a_tiff_of_half_a_million_tiles_is_refused_from_its_header() -> None:
    hostile = tiled_tiff(12000, 12000)  # 562,500 tiles of 16x16: Pillow alone spends seconds opening it
    assert tiff_tiles(hostile) == 562_500
    start = time.monotonic()
    with pytest.raises(TooLargeError, match=f"562,500 tiles or strips, above the limit of {MAX_TIFF_TILES:,}"):
        prepare(hostile, SPEC)
    assert time.monotonic() - start < 2.0
    assert prepare(tiled_tiff(512, 512), SPEC).pixels.shape == (224, 224, 3)  # 1,024 tiles: fine


def test_huge_images_are_refused_with_max_pixels_figure_not_pillows() -> None:
    """200 megapixels is past Pillow's own bomb limit (178,956,970): the message still names --max-pixels."""
    claim = png_header(20_000, 10_000)
    for options in (DecodeOptions(), DecodeOptions(150_000_000)):
        with pytest.raises(TooLargeError) as caught:
            prepare(claim, SPEC, options)
        assert "150,000,000" in str(caught.value) and "178956970" not in str(caught.value).replace(",", "")
    assert decode_jobs([claim], SPEC, DecodeOptions(1_000_000))[0] == (
        "too_large", "image is 200,000,000 pixels, above the limit of 1,000,000")


def test_decoded_memory_is_budgeted_by_the_decoded_mode() -> None:
    """Pixels x bytes per pixel of the decoded mode: a 16-bit image costs twice an 8-bit one of its size."""
    grey16 = png(2000, 2000, 0, 16, b"\x9c\x40")
    grey8 = png(2000, 2000, 0, 8, b"\x9c")
    options = DecodeOptions(max_pixels=10_000_000, max_memory=6_000_000)  # 4M px x 2 bytes = 8 MB
    assert prepare(grey8, SPEC, options).pixels.shape == (224, 224, 3)
    with pytest.raises(TooLargeError, match=r"2000x2000 I;16.* needs 8 MiB, above the decode memory budget"):
        prepare(grey16, SPEC, options)


def _peak_mb(kind: str, side: int) -> tuple[int, str]:
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_hostile_decode import png
        data = png({side}, {side}, 6, 8, bytes([10, 200, 30, 128])) if {kind!r} == "rgba" else \\
            png({side}, {side}, 0, 16, (40000).to_bytes(2, "big"))
        from wanwu.imaging import prepare
        from wanwu.spec import PreprocessSpec
        out = prepare(data, PreprocessSpec())
        # VmHWM is this address space's own peak; ru_maxrss survives exec, so it would report the peak of the
        # (large) test process this one was started from.
        hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]
        print(int(hwm) // 1024, out.pixels[0, 0].tolist())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak, pixel = proc.stdout.split(" ", 1)
    return int(peak), pixel.strip()


@pytest.mark.parametrize(("kind", "pixel"), [("rgba", "[132, 227, 142]"), ("grey16", "[156, 156, 156]")])
def test_a_large_rgba_or_16_bit_png_costs_about_its_decoded_size(kind: str, pixel: str) -> None:
    """8000x8000 decodes to 256 MB (RGBA) or 128 MB (16-bit) in Pillow; converting at full size took the process
    to 1,259 MB and 1,077 MB. It is reduced before any conversion now: about twice the decoded size at most."""
    peak, first = _peak_mb(kind, 8000)
    assert first == pixel  # alpha composited on white, 16-bit scaled: the same colour as before
    assert peak < (700 if kind == "rgba" else 450), peak


def test_an_address_space_limit_makes_a_bomb_cost_its_record(tiny_model: Model) -> None:
    """Decode processes may map only --decode-memory-mb beyond their start: a file needing more is too_large,
    and the next file is decoded as usual."""
    bomb = png(9000, 9000, 2, 8, b"\x10\x80\xf0")  # 324 MB decoded (RGB is 4 bytes per pixel in Pillow)
    good = image_bytes(size=(320, 240))
    options = RecognizeOptions(cache=False, decoders=1, decode_memory_mb=200)
    with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=options) as rec:
        records = list(rec.recognize([InputItem.from_bytes("bomb.png", bomb), InputItem.from_bytes("ok.jpg", good)]))
    bombed, ok = records
    assert bombed.error is not None and bombed.error.type == "too_large", bombed
    assert "memory" in bombed.error.message
    assert ok.ok


def test_batch_size_is_capped_with_a_message(tiny_model: Model, capsys: pytest.CaptureFixture[str]) -> None:
    from wanwu.cli.main import main

    with pytest.raises(UsageError, match="--batch-size 100000 is above the most of 512"):
        RecognizeOptions(batch_size=100_000)
    assert main(["recognize", "--model", str(tiny_model[0]), "--labels", str(tiny_model[1]), "-b", "100000",
                 "-q", "nothing.jpg"]) == 2
    assert "above the most of 512" in capsys.readouterr().err


# --- decode time: deadlines, the run's budget, the run's share of the decoders ----------------------------------


def _colours(n: int) -> list[InputItem]:
    return [InputItem.from_bytes(f"{i}.png", image_bytes(((40 * i) % 256, 90, 200), size=(60 + i, 50), fmt="PNG"))
            for i in range(n)]


def test_a_decode_deadline_is_never_retried_in_the_quarantine(
    tiny_model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that runs past --decode-timeout inside a task of several is stopped once, named, and never
    decoded again; the files of its task before and after it get their own records."""
    monkeypatch.setattr("wanwu.pipeline._Run.decode", staticmethod(marking_decode))
    marks = tmp_path / "marks.txt"
    items = _colours(16)
    items.insert(6, InputItem.from_bytes("hang.png", b"HANG:" + str(marks).encode() + b"|"))
    options = RecognizeOptions(cache=False, decoders=2, batch_size=4, decode_timeout=5.0)
    with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=options) as rec:
        records = list(rec.recognize(items))
    hung = records[6]
    assert hung.error is not None and "took longer than 5 s" in hung.error.message
    assert marks.read_text().count("started") == 1  # not retried in the quarantine
    assert all(r.ok for i, r in enumerate(records) if i != 6)


def test_a_run_has_a_decode_budget_and_a_share_of_the_decoders(
    tiny_model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs share one Recognizer (as service requests do). The first sends four files that hang: with half
    of the two decoders its share, the second run's photo is decoded meanwhile; and once the first run's budget
    is spent, its files left are answered without being decoded."""
    monkeypatch.setattr("wanwu.pipeline._Run.decode", staticmethod(marking_decode))
    marks = tmp_path / "marks.txt"
    hangs = [InputItem.from_bytes(f"hang{i}.png", b"HANG:" + str(marks).encode() + b"|" + bytes([i]))
             for i in range(4)]
    options = RecognizeOptions(cache=False, decoders=2, decode_timeout=10.0, decode_budget=12.0, decode_share=0.5)
    attack: list[Any] = []
    with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=options) as rec:
        attacker = threading.Thread(target=lambda: attack.extend(rec.recognize(hangs)))
        attacker.start()
        deadline = time.monotonic() + 60
        while not (marks.exists() and marks.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)  # wait for the condition "the first hanging file is being decoded"
        start = time.monotonic()
        (other,) = rec.recognize(_colours(1))
        waited = time.monotonic() - start
        attacker.join(120)
    assert other.ok and waited < 8.0, waited  # the attacker's hang lasts 10 s: the photo did not wait for it
    assert [r.error.type for r in attack if r.error] == ["decode_error", "decode_error", "too_large", "too_large"]
    assert "took longer than 10 s" in attack[0].error.message
    assert "decode-time budget of 12 s" in attack[1].error.message  # stopped when the budget ran out
    assert all("budget of 12 s is spent" in r.error.message for r in attack[2:])
    assert marks.read_text().count("started") == 2
