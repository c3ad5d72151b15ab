"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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


def time_call(fn: Callable[[Any], object], arg: Any) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def torch_vs_onnx(torch_backend: Any, ort_backend: Any, batches: Iterable[int], rounds: int) -> None:
    """Print img/s of both backends on random 224x224 batches, the median of ``rounds`` each, then close them."""
    import numpy as np

    print(f"{'batch':>6} {'torch img/s':>12} {'onnx img/s':>12} {'onnx/torch':>11}")
    rng = np.random.default_rng(0)
    for b in batches:
        batch = rng.normal(size=(b, 3, 224, 224)).astype(np.float32)
        torch_backend.infer(batch)  # warm up both
        ort_backend.infer(batch)
        times: dict[str, list[float]] = {"torch": [], "onnx": []}
        for _ in range(rounds):
            times["torch"].append(time_call(torch_backend.infer, batch))
            times["onnx"].append(time_call(ort_backend.infer, batch))
        rate = {k: b / statistics.median(v) for k, v in times.items()}
        print(f"{b:>6} {rate['torch']:>12.2f} {rate['onnx']:>12.2f} {rate['onnx'] / rate['torch']:>10.2f}x")
    torch_backend.close()
    ort_backend.close()
