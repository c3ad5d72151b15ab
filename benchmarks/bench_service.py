"""Load test for `wanwu serve`, compared with `wanwu recognize` on the same photos in the same run.

    python benchmarks/bench_service.py                       # 1,000 requests from 32 concurrent clients
    python benchmarks/bench_service.py --rss-requests 10000  # then 10,000 more, sampling the server's RSS
    python benchmarks/bench_service.py --client httpx        # the load from httpx instead (costs more CPU)

What it does:
1. starts `wanwu serve --no-cache` as a subprocess, waits for /readyz and warms it up;
2. --rounds times (default 3): `wanwu recognize --no-cache` on the photos (the CLI's batch throughput, from
   its own summary line), then --requests requests, one photo each, from --concurrency concurrent clients
   (every answer must be HTTP 200 with an ok record); then the CLI once more. Each service round's ratio is
   to the mean of the CLI runs just before and after it, so a change in the machine's speed during the
   benchmark (this machine is shared) weighs little; the median ratio is the result;
3. reports throughput and the ratios, p50/p95/p99 latency, batches formed and their mean size (from
   /metrics), the server's RSS, and the CPU that the server and the load generator each used (last round);
4. with --rss-requests N: N more requests, sampling the RSS of the server's process tree as it goes.

The load generator runs on the same machine as the server, so its CPU is taken from the server's. It uses
aiohttp (its HTTP parser is C) by default: on a 2-core machine, 32 httpx clients take 0.35-0.6 of a core,
aiohttp's about 0.08, and the server gets the difference. `--client httpx` measures with httpx for
comparison. The CLI pays for no client, so a cheap one is what makes the ratio about the server.

Results are printed and written as JSON to --out. Needs the shared data (../shared/data) unless --model,
--labels and --photos say otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
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
        "client": args.client,
    }
    load = _LOADERS[args.client]

    port = _free_port()
    server = _start_server(args, port, env)
    base = f"http://127.0.0.1:{port}"
    cli_runs: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    try:
        _wait_ready(base, server)
        asyncio.run(load(base, payloads, args.concurrency, min(64, args.requests), None))  # warm-up
        rss_before = _tree_rss_mb(server.pid)
        # CLI, service, CLI, service, ..., CLI: each service round is compared with the CLI runs on either side
        # of it, so a change in the machine's speed during the benchmark weighs little (this machine is shared).
        for i in range(args.rounds):
            cli_runs.append(_cli_throughput(args, used, env, f"round {i + 1}"))
            rounds.append(_service_round(args, base, server.pid, payloads, load, i + 1))
        cli_runs.append(_cli_throughput(args, used, env, "last"))
        result["service"] = rounds[-1]
        result["service"]["rss_mb_before"] = rss_before
        result["service"]["rss_mb_after"] = _tree_rss_mb(server.pid)
        if args.rss_requests:
            result["rss"] = _rss_run(base, server.pid, payloads, args)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    ratios = [
        r["images_per_s"] / statistics.fmean([cli_runs[i]["images_per_s"], cli_runs[i + 1]["images_per_s"]])
        for i, r in enumerate(rounds)
    ]
    result["rounds"] = [{**r, "ratio": ratio} for r, ratio in zip(rounds, ratios, strict=True)]
    result["cli"] = {"runs": cli_runs, "images_per_s": statistics.fmean(r["images_per_s"] for r in cli_runs)}
    result["throughput_ratio"] = statistics.median(ratios)
    _report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"written to {out}")
    failed = result["service"]["non_200"] or result["service"]["error_records"]
    return 1 if failed else 0


def _service_round(
    args: argparse.Namespace, base: str, pid: int, payloads: list[tuple[str, bytes]], load: Loader, number: int
) -> dict[str, Any]:
    print(f"service (round {number}): {args.requests} requests from {args.concurrency} {args.client} clients …",
          flush=True)
    before = _scrape(base)
    cpu_before = _tree_cpu_s(pid), _own_cpu_s()
    measured = asyncio.run(load(base, payloads, args.concurrency, args.requests, None))
    cpu = _tree_cpu_s(pid) - cpu_before[0], _own_cpu_s() - cpu_before[1]
    summary = _summarise(measured, before, _scrape(base))
    summary["cpu"] = {
        "server_cores": cpu[0] / measured["wall_s"], "client_cores": cpu[1] / measured["wall_s"],
        "server_ms_per_image": 1000 * cpu[0] / args.requests,
    }
    print(f"  {summary['images_per_s']:.1f} images/s", flush=True)
    return summary


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", default=str(SHARED / "images" / "imagenet-sample-images"))
    parser.add_argument("--model", default=str(SHARED / "models" / "mobilenetv2-12-int8.onnx"))
    parser.add_argument("--labels", default=str(SHARED / "labels" / "imagenet_zh.txt"))
    parser.add_argument("--requests", type=int, default=1000, help="measured requests (one photo each)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=-1, help="decode workers for both CLI and server")
    parser.add_argument("--rounds", type=int, default=3, help="service runs, each between two CLI runs")
    parser.add_argument("--rss-requests", type=int, default=0, help="then this many more, sampling RSS")
    parser.add_argument("--client", choices=sorted(_LOADERS), default="aiohttp", help="the load generator")
    parser.add_argument("--out", default=str(ROOT / "bench-out" / "service.json"))
    return parser.parse_args()


def _wanwu(*args: str) -> list[str]:
    return [sys.executable, "-c", "from wanwu.cli.main import run; run()", *args]


def _cli_throughput(args: argparse.Namespace, photos: list[Path], env: dict[str, str], when: str) -> dict[str, Any]:
    print(f"CLI ({when}): wanwu recognize --no-cache on {len(photos)} photos …", flush=True)
    cmd = _wanwu(
        "recognize", *map(str, photos), "-m", args.model, "-l", args.labels, "--no-cache",
        "-b", str(args.max_batch_size), "-j", str(args.workers), "-f", "jsonl", "-o", os.devnull,
    )
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if out.returncode not in (0, 3):
        sys.exit(f"wanwu recognize failed ({out.returncode}): {out.stderr[-2000:]}")
    # The summary line times the run itself, not interpreter start-up and model loading. Its rate is
    # computed from the exact time; the seconds it prints are rounded to 0.1 s.
    match = re.search(r"(\d+) input\(s\).* in [\d.]+s \(([\d.]+)/s\)", out.stderr)
    if match is None:
        sys.exit(f"cannot find the summary line in: {out.stderr[-2000:]}")
    images, rate = int(match.group(1)), float(match.group(2))
    print(f"  {images} images in {images / rate:.2f}s = {rate:.1f} images/s", flush=True)
    return {"images": images, "seconds": images / rate, "images_per_s": rate, "wall_s": wall}


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


Loader = Callable[
    [str, list[tuple[str, bytes]], int, int, Callable[[int], None] | None], Coroutine[Any, Any, dict[str, Any]]
]


async def _load_with(
    post: Callable[[str, bytes], Awaitable[tuple[int, Any]]], payloads: list[tuple[str, bytes]], concurrency: int,
    total: int, progress: Callable[[int], None] | None,
) -> dict[str, Any]:
    """``concurrency`` clients, each sending one request at a time until ``total`` have been sent."""
    latencies: list[float] = []
    codes: dict[int, int] = {}
    error_records = 0
    counter = iter(range(total))

    async def client() -> None:
        nonlocal error_records
        for i in counter:
            name, data = payloads[i % len(payloads)]
            start = time.perf_counter()
            status, body = await post(name, data)
            latencies.append(time.perf_counter() - start)
            codes[status] = codes.get(status, 0) + 1
            if status == 200:
                error_records += sum(r["status"] != "ok" for r in body["results"])
            if progress is not None:
                progress(i)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"latencies": latencies, "codes": codes, "error_records": error_records, "wall_s": wall}


async def _load_aiohttp(
    base: str, payloads: list[tuple[str, bytes]], concurrency: int, total: int, progress: Callable[[int], None] | None
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def post(name: str, data: bytes) -> tuple[int, Any]:
            form = aiohttp.FormData()
            form.add_field("files", data, filename=name, content_type="image/jpeg")
            async with http.post(f"{base}/v1/recognize", data=form) as response:
                body = await response.json() if response.status == 200 else await response.read()
                return response.status, body

        return await _load_with(post, payloads, concurrency, total, progress)


async def _load_httpx(
    base: str, payloads: list[tuple[str, bytes]], concurrency: int, total: int, progress: Callable[[int], None] | None
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:

        async def post(name: str, data: bytes) -> tuple[int, Any]:
            response = await http.post(f"{base}/v1/recognize", files=[("files", (name, data, "image/jpeg"))])
            return response.status_code, response.json() if response.status_code == 200 else response.content

        return await _load_with(post, payloads, concurrency, total, progress)


_LOADERS: dict[str, Loader] = {"aiohttp": _load_aiohttp, "httpx": _load_httpx}


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
    services = ", ".join(f"{r['images_per_s']:.1f}" for r in result["rounds"])
    runs = ", ".join(f"{run['images_per_s']:.1f}" for run in c["runs"])
    ratios = ", ".join(f"{r['ratio']:.2f}x" for r in result["rounds"])
    print(f"  service {services} images/s; the CLI's runs around them {runs} images/s")
    print(f"  service / CLI: {ratios}; median {result['throughput_ratio']:.2f}x (target >= 0.9x)")
    print(f"  last round: {s['requests']} requests in {s['seconds']:.2f}s = {s['images_per_s']:.1f} images/s")
    print(f"  latency p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms, "
          f"max {lat['max']:.0f} ms")
    print(f"  {s['batches']} batches, mean batch size {s['mean_batch_size']:.1f}")
    print(f"  server RSS (process tree) {s['rss_mb_before']:.0f} MB -> {s['rss_mb_after']:.0f} MB")
    cpu = s["cpu"]
    print(f"  CPU: server {cpu['server_cores']:.2f} cores ({cpu['server_ms_per_image']:.1f} ms per image), "
          f"load generator ({result['client']}) {cpu['client_cores']:.2f} cores")


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
    load = asyncio.run(_LOADERS[args.client](base, payloads, args.concurrency, total, progress))
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


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its live descendants."""
    return sum(_proc_cpu_s(current) for current in _tree(pid))


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` alone (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and all its descendants (decode workers, forkserver), in MB."""
    total_kb = 0
    for current in _tree(pid):
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total_kb += int(match.group(1)) if match else 0
    return total_kb / 1024


def _tree(pid: int) -> tuple[int, ...]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.servers import descendants

    return (pid, *descendants(pid))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
