"""Load test for `wanwu serve`, compared with `wanwu recognize` on the same photos in the same run.

    python benchmarks/bench_service.py                       # 512 requests from 32 concurrent clients
    python benchmarks/bench_service.py --rss-requests 10000  # then 10,000 more, sampling the server's RSS

What it does:
1. `wanwu recognize --no-cache` on the photos (the CLI's batch throughput, from its own summary line);
2. starts `wanwu serve --no-cache` as a subprocess and waits for /readyz;
3. warms up, then sends --requests requests, one photo each, from --concurrency concurrent clients;
   every answer must be HTTP 200 with an ok record;
4. reports throughput (and its ratio to the CLI's), p50/p95/p99 latency, batches formed and their mean
   size (from /metrics), and the server's RSS;
5. with --rss-requests N: N more requests, sampling the RSS of the server's process tree as it goes.

Results are printed and written as JSON to --out. Needs the shared data (../shared/data) unless --model,
--labels and --photos say otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> int:
    args = _parse()
    photos = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not photos:
        sys.exit(f"no photos in {args.photos}")
    used = photos[: args.requests]
    payloads = [(p.name, p.read_bytes()) for p in used]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result: dict[str, Any] = {
        "photos": len(used), "requests": args.requests, "concurrency": args.concurrency,
        "max_batch_size": args.max_batch_size, "max_delay_ms": args.max_delay_ms, "cpus": os.cpu_count(),
    }

    print(f"CLI: wanwu recognize --no-cache on {len(used)} photos …", flush=True)
    result["cli"] = _cli_throughput(args, used, env)
    print(f"  {result['cli']['images']} images in {result['cli']['seconds']:.2f}s "
          f"= {result['cli']['images_per_s']:.1f} images/s", flush=True)

    port = _free_port()
    server = _start_server(args, port, env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, server)
        asyncio.run(_load(base, payloads, args.concurrency, min(64, args.requests), None))  # warm-up
        before = _scrape(base)
        rss_before = _tree_rss_mb(server.pid)
        print(f"service: {args.requests} requests from {args.concurrency} clients …", flush=True)
        load = asyncio.run(_load(base, payloads, args.concurrency, args.requests, None))
        after = _scrape(base)
        result["service"] = _summarise(load, before, after)
        result["service"]["rss_mb_before"] = rss_before
        result["service"]["rss_mb_after"] = _tree_rss_mb(server.pid)
        result["throughput_ratio"] = result["service"]["images_per_s"] / result["cli"]["images_per_s"]
        _report(result)
        if args.rss_requests:
            result["rss"] = _rss_run(base, server.pid, payloads, args)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"written to {out}")
    failed = result["service"]["non_200"] or result["service"]["error_records"]
    return 1 if failed else 0


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", default=str(SHARED / "images" / "imagenet-sample-images"))
    parser.add_argument("--model", default=str(SHARED / "models" / "mobilenetv2-12-int8.onnx"))
    parser.add_argument("--labels", default=str(SHARED / "labels" / "imagenet_zh.txt"))
    parser.add_argument("--requests", type=int, default=512, help="measured requests (one photo each)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=-1, help="decode workers for both CLI and server")
    parser.add_argument("--rss-requests", type=int, default=0, help="then this many more, sampling RSS")
    parser.add_argument("--out", default=str(ROOT / "bench-out" / "service.json"))
    return parser.parse_args()


def _wanwu(*args: str) -> list[str]:
    return [sys.executable, "-c", "from wanwu.cli.main import run; run()", *args]


def _cli_throughput(args: argparse.Namespace, photos: list[Path], env: dict[str, str]) -> dict[str, Any]:
    cmd = _wanwu(
        "recognize", *map(str, photos), "-m", args.model, "-l", args.labels, "--no-cache",
        "-b", str(args.max_batch_size), "-j", str(args.workers), "-f", "jsonl", "-o", os.devnull,
    )
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if out.returncode not in (0, 3):
        sys.exit(f"wanwu recognize failed ({out.returncode}): {out.stderr[-2000:]}")
    # The summary line times the run itself, not interpreter start-up and model loading.
    match = re.search(r"(\d+) input\(s\).* in ([\d.]+)s", out.stderr)
    if match is None:
        sys.exit(f"cannot find the summary line in: {out.stderr[-2000:]}")
    images, seconds = int(match.group(1)), float(match.group(2))
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "wall_s": wall}


def _start_server(args: argparse.Namespace, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = _wanwu(
        "serve", "-m", args.model, "-l", args.labels, "--port", str(port), "--no-cache",
        "--max-batch-size", str(args.max_batch_size), "--max-delay-ms", str(args.max_delay_ms),
        "--max-queue", str(max(1024, args.concurrency * 4)), "-j", str(args.workers),
    )
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    sys.exit("the server did not become ready")


async def _load(
    base: str, payloads: list[tuple[str, bytes]], concurrency: int, total: int, progress: Any
) -> dict[str, Any]:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    error_records = 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal error_records
        for i in counter:
            name, data = payloads[i % len(payloads)]
            start = time.perf_counter()
            response = await http.post(f"{base}/v1/recognize", files=[("files", (name, data, "image/jpeg"))])
            latencies.append(time.perf_counter() - start)
            codes[response.status_code] = codes.get(response.status_code, 0) + 1
            if response.status_code == 200:
                error_records += sum(r["status"] != "ok" for r in response.json()["results"])
            if progress is not None:
                progress(i)

    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "codes": codes, "error_records": error_records, "wall_s": wall}


def _scrape(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    values = {}
    for name in ("wanwu_batch_size_count", "wanwu_batch_size_sum"):
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        values[name] = float(match.group(1)) if match else 0.0
    return values


def _summarise(load: dict[str, Any], before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    lat = sorted(load["latencies"])
    n = len(lat)
    batches = after["wanwu_batch_size_count"] - before["wanwu_batch_size_count"]
    images = after["wanwu_batch_size_sum"] - before["wanwu_batch_size_sum"]
    return {
        "requests": n,
        "status_codes": {str(k): v for k, v in sorted(load["codes"].items())},
        "non_200": n - load["codes"].get(200, 0),
        "error_records": load["error_records"],
        "seconds": load["wall_s"],
        "images_per_s": n / load["wall_s"],
        "latency_ms": {
            "p50": 1000 * lat[n // 2],
            "p95": 1000 * lat[min(n - 1, int(n * 0.95))],
            "p99": 1000 * lat[min(n - 1, int(n * 0.99))],
            "mean": 1000 * statistics.fmean(lat),
            "max": 1000 * lat[-1],
        },
        "batches": int(batches),
        "mean_batch_size": images / batches if batches else 0.0,
    }


def _report(result: dict[str, Any]) -> None:
    s, c = result["service"], result["cli"]
    lat = s["latency_ms"]
    print(f"  status codes {s['status_codes']}, error records {s['error_records']}")
    print(f"  {s['requests']} requests in {s['seconds']:.2f}s = {s['images_per_s']:.1f} images/s "
          f"({result['throughput_ratio']:.2f}x the CLI's {c['images_per_s']:.1f}/s; target >= 0.6x)")
    print(f"  latency p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms, "
          f"max {lat['max']:.0f} ms")
    print(f"  {s['batches']} batches, mean batch size {s['mean_batch_size']:.1f}")
    print(f"  server RSS (process tree) {s['rss_mb_before']:.0f} MB -> {s['rss_mb_after']:.0f} MB")


def _rss_run(
    base: str, pid: int, payloads: list[tuple[str, bytes]], args: argparse.Namespace
) -> dict[str, Any]:
    total = args.rss_requests
    every = max(1, total // 20)
    samples: list[tuple[int, float]] = [(0, _tree_rss_mb(pid))]
    done = 0

    def progress(_: int) -> None:
        nonlocal done
        done += 1
        if done % every == 0:
            samples.append((done, _tree_rss_mb(pid)))

    print(f"RSS: {total} more requests, sampling every {every} …", flush=True)
    load = asyncio.run(_load(base, payloads, args.concurrency, total, progress))
    samples.append((done, _tree_rss_mb(pid)))
    settled = samples[min(len(samples) - 1, 4)][1]  # after ~20%: pools and allocator warmed up
    final = samples[-1][1]
    growth = final - settled
    print(f"  RSS samples (requests, MB): {', '.join(f'{n}:{mb:.0f}' for n, mb in samples)}")
    print(f"  growth after warm-up: {growth:+.1f} MB ({100 * growth / settled:+.1f}%); "
          f"non-200: {total - load['codes'].get(200, 0)}")
    return {
        "requests": total, "samples": samples, "settled_mb": settled, "final_mb": final,
        "growth_mb": growth, "non_200": total - load["codes"].get(200, 0),
        "images_per_s": total / load["wall_s"],
    }


def _tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and all its descendants (decode workers, forkserver), in MB."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.servers import descendants

    total_kb = 0
    for current in (pid, *descendants(pid)):
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total_kb += int(match.group(1)) if match else 0
    return total_kb / 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
