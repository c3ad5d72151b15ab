"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODEL = SHARED / "models" / "mobilenetv2-12-int8.onnx"
LABELS = SHARED / "labels" / "imagenet_zh.txt"
PHOTOS = SHARED / "images" / "imagenet-sample-images"


def require_shared() -> None:
    if not PHOTOS.is_dir():
        sys.exit(f"benchmark data not found at {SHARED} (../shared/data beside the checkout)")


def timed(cmd: list[str], stdin: str | None = None, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env={**os.environ, **(env or {})})
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{cmd[:4]}… failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def median(values: list[float]) -> float:
    return statistics.median(values)
