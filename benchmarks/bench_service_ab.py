"""A/B for the HTTP service: `wanwu serve` from two source trees, loaded in alternation, in one run of this script.

    python benchmarks/bench_service_ab.py --base ../base/src [--new src] [--rounds 6] [--requests 1000]

Both servers start at once (each with its own decode processes; the one not under load sits idle) and are warmed
up; then each round sends --requests one-photo requests from --concurrency aiohttp clients to A then B (B then A
the next round), exactly as `bench_service.py` does. It reports, per side, the median images/s and the median CPU
the server's process tree used per image, and the B/A ratios. On a shared machine the CPU per image moves less
than the throughput, and alternating cancels most of the drift; ratios near 1.00 mean no change. Every answer must
be HTTP 200 with an ok record.

Make the A side with `git worktree add ../base REV` (and `python -m compileall -q ../base/src`, so that neither
side compiles its bytecode while measured).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_service as bs
from _common import ab_parser, compile_trees


def main() -> int:
    parser = ab_parser(__doc__, rounds=6)
    parser.add_argument("--requests", type=int, default=1000, help="requests per round and side (one photo each)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=-1, help="decode workers of both servers")
    parser.add_argument("--photos", default=str(bs.SHARED / "images" / "imagenet-sample-images"))
    parser.add_argument("--model", default=str(bs.SHARED / "models" / "mobilenetv2-12-int8.onnx"))
    parser.add_argument("--labels", default=str(bs.SHARED / "labels" / "imagenet_zh.txt"))
    args = parser.parse_args()
    photos = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not photos:
        sys.exit(f"no photos in {args.photos}")
    payloads = [(p.name, p.read_bytes()) for p in photos[: args.requests]]
    sides = {"A": args.base.resolve(), "B": args.new.resolve()}
    compile_trees(*sides.values())
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    try:
        for name, src in sides.items():
            env = {**os.environ, "PYTHONPATH": str(src)}
            port = bs._free_port()
            servers[name] = (bs._start_server(args, port, env), f"http://127.0.0.1:{port}")
        for process, base in servers.values():
            bs._wait_ready(base, process)
            asyncio.run(bs._load_aiohttp(base, payloads, args.concurrency, min(300, args.requests), None))
        for i in range(args.rounds):
            for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                results[name].append(_round(args, servers[name], payloads))
            a, b = results["A"][-1], results["B"][-1]
            print(f"round {i + 1}: A {a[0]:.1f} img/s, {a[1]:.2f} ms CPU/img; "
                  f"B {b[0]:.1f} img/s, {b[1]:.2f} ms CPU/img", flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
        for process, _ in servers.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    rate = {name: statistics.median(r[0] for r in rounds) for name, rounds in results.items()}
    cpu = {name: statistics.median(r[1] for r in rounds) for name, rounds in results.items()}
    for name, src in sides.items():
        print(f"{name} ({src}): median {rate[name]:.1f} img/s, {cpu[name]:.2f} ms of server CPU per image")
    print(f"B/A: throughput {rate['B'] / rate['A']:.3f}x, CPU per image {cpu['B'] / cpu['A']:.3f}x "
          f"(medians of {args.rounds} rounds)")
    return 0


def _round(
    args: argparse.Namespace, server: tuple[subprocess.Popen[bytes], str], payloads: list[tuple[str, bytes]]
) -> tuple[float, float]:
    """(images/s, ms of server CPU per image) of one round against ``server``."""
    process, base = server
    before = bs._tree_cpu_s(process.pid)
    measured = asyncio.run(bs._load_aiohttp(base, payloads, args.concurrency, args.requests, None))
    used = bs._tree_cpu_s(process.pid) - before
    if measured["codes"] != {200: args.requests} or measured["error_records"]:
        sys.exit(f"{base}: answers {measured['codes']}, {measured['error_records']} error records")
    return args.requests / measured["wall_s"], 1000 * used / args.requests


if __name__ == "__main__":
    sys.exit(main())
