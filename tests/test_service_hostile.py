"""Hostile inputs through the service: a 320-byte PNG must not cost more than a normal photo.

A 1×60000 PNG is a few hundred bytes and 60,000 pixels (far below --max-pixels), but resizing its short
side to the model's input size asks for billions of pixels (~16 GB). The fix belongs to the imaging code
(the hostile-inputs issue); this checks it from the outside, through `wanwu serve`.

The server runs with an address-space limit (RLIMIT_AS) so that, while the bug is present, the test fails
with an error record instead of taking the shared machine's memory.
"""

from __future__ import annotations

import io
import resource
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.servers import free_port, stop, wait_ready

pytestmark = [pytest.mark.shared, pytest.mark.extra("server")]
ADDRESS_SPACE = 3 * 1024**3  # the server may map up to 3 GB (threads and libraries reserve much of it)
BUDGET = 300 * 1024**2  # a normal photo costs tens of MB; the PNG may cost no more than this


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def test_a_1x60000_png_costs_no_more_than_a_photo(mobilenet: tuple[Path, Path], photos: Path) -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the server's peak memory")
    buffer = io.BytesIO()
    Image.new("RGB", (1, 60000)).save(buffer, format="PNG")
    png = buffer.getvalue()
    assert len(png) < 1000
    photo = sorted(photos.iterdir())[0].read_bytes()
    port = free_port()
    cmd = [sys.executable, "-c", "from wanwu.cli.main import run; run()", "serve", "-m", str(mobilenet[0]),
           "-l", str(mobilenet[1]), "--port", str(port), "--no-cache", "-j", "0", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_limit)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=120, proc=proc)
        files = [("files", ("photo.jpg", photo, "image/jpeg"))]
        assert httpx.post(f"{base}/v1/recognize", files=files, timeout=60).json()["results"][0]["status"] == "ok"
        after_photo = _peak_rss(proc.pid)
        files = [("files", ("thin.png", png, "image/png"))]
        response = httpx.post(f"{base}/v1/recognize", files=files, timeout=120)
        after_png = _peak_rss(proc.pid)
        alive = proc.poll() is None
    finally:
        stop(proc)
    assert alive
    assert response.status_code == 200, response.text
    record = response.json()["results"][0]
    # Recognized, or refused as too large / undecodable: never an internal error (the allocation failing).
    assert record["status"] == "ok" or record["error"]["type"] in ("too_large", "decode_error"), record
    assert after_png - after_photo < BUDGET, (after_photo, after_png)
