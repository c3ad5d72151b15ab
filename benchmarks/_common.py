"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import compileall
import os
import resource
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


def ab_parser(doc: str | None, rounds: int) -> argparse.ArgumentParser:
    """The arguments every A/B benchmark takes: the two source trees and the rounds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, type=Path, help="the A side's src folder (e.g. an older checkout)")
    parser.add_argument("--new", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                        help="the B side's src folder")
    parser.add_argument("--rounds", type=int, default=rounds)
    return parser


def compile_trees(*trees: Path) -> None:
    """Write the bytecode of every module under each source tree. With PYTHONDONTWRITEBYTECODE set (as on some
    machines), a tree that was never compiled is compiled from source by every process started from it: about
    50 ms of each run's start-up here, which an A/B comparison would charge to that side alone."""
    for tree in trees:
        if not compileall.compile_dir(str(tree), quiet=1):
            sys.exit(f"cannot compile the modules under {tree}")


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


def timed_cpu(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and the children it waited for) of one run of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = timed(cmd, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def alternate(cmds: dict[str, list[str]], repeats: int, env: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Run every command ``repeats`` times, interleaved (a, b, a, b, …; reversed every other round, so neither
    always follows the other), after one untimed warm-up each. Returns name -> wall seconds, and
    ``name + " cpu"`` -> CPU seconds."""
    for cmd in cmds.values():
        timed(cmd, env=env)  # warm: file cache, int8 rewrite, entry-point memo
    out: dict[str, list[float]] = {}
    names = list(cmds)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            wall, cpu = timed_cpu(cmds[name], env)
            out.setdefault(name, []).append(wall)
            out.setdefault(f"{name} cpu", []).append(cpu)
    return out


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
