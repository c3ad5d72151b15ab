"""Decode functions for tests that stand in for a hostile file: imported by decode worker processes, so this
module imports nothing heavier than wanwu's own decoder."""

from __future__ import annotations

import time
from typing import Any

from wanwu.imaging import decode_jobs


def marking_decode(datas: list[bytes], spec: Any, options: Any) -> Any:
    """Decodes like wanwu, except a file ``HANG:<path>|…`` appends a line to <path> and hangs (as a looping
    decoder would)."""
    for data in datas:
        if data.startswith(b"HANG:"):
            path = data[5:data.index(b"|")].decode()
            with open(path, "a", encoding="utf-8") as f:
                f.write("started\n")
            time.sleep(3600)
    return decode_jobs(datas, spec, options)
