"""The service's request path without HTTP, against one run over the same photos, in one process.

    python benchmarks/bench_requests.py [--rounds 3] [--photos N] [--concurrency 32]

What `wanwu serve` does per request, minus uvicorn and FastAPI: --concurrency threads each hand the service's
runtime (`wanwu.service.runtime.Runtime`, built as `wanwu serve` builds it: its own decode processes, the dynamic
batcher, one orchestrator run per request) one photo at a time. Alternated with it, one `Recognizer` run over the
same photos (what `wanwu recognize` does, without its start-up). Each round reports images/s and the CPU per image
of this process and of its decode processes (/proc). The two sides run in the same process, one at a time (the
idle side's threads wait); the photos are distinct files, so neither side skips a repeat.

`bench_service.py` measures the whole server against the CLI; the difference between the two benchmarks is what
HTTP and the load generator cost. Needs the shared data (../shared/data).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_service as bs
from _common import LABELS, MODEL, PHOTOS, require_shared
from wanwu import Recognizer
from wanwu.config import RecognizeOptions
from wanwu.records import Record
from wanwu.service.batcher import _NoObserver
from wanwu.service.config import ServeConfig
from wanwu.service.runtime import Runtime, default_engine_factory
from wanwu.sources import InputItem


def _cpu() -> tuple[float, float]:
    """(this process, its live descendants: the forkserver and decode processes) CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    own = usage.ru_utime + usage.ru_stime
    return own, bs._tree_cpu_s(os.getpid()) - bs._proc_cpu_s(os.getpid())


def _measure(work: Callable[[], int]) -> tuple[float, float, float]:
    """(images/s, ms of this process's CPU per image, ms of the decode processes' CPU per image)."""
    own0, kids0 = _cpu()
    start = time.perf_counter()
    n = work()
    wall = time.perf_counter() - start
    own1, kids1 = _cpu()
    return n / wall, (own1 - own0) / n * 1e3, (kids1 - kids0) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    require_shared()
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[: args.photos]
    payloads = [(p.name, p.read_bytes()) for p in photos]
    paths = [str(p) for p in photos]

    options = RecognizeOptions(cache=False, decoders=-1, decode_budget=30.0, decode_share=0.5)  # as `wanwu serve`
    config = ServeConfig(model=str(MODEL), labels=LABELS, options=options)
    runtime = Runtime(config, default_engine_factory(config)(), None, _NoObserver())
    runtime.start()
    sys.setswitchinterval(0.001)  # as `wanwu serve` sets it
    one_run = Recognizer(str(MODEL), labels=LABELS, options=RecognizeOptions(cache=False))

    def request(i: int) -> Record:
        name, data = payloads[i]
        (record,) = runtime._run([InputItem.from_bytes(name, data)], config.options.record, None)
        return record

    def requests() -> int:
        with ThreadPoolExecutor(args.concurrency) as pool:
            records = list(pool.map(request, range(len(payloads))))
        assert all(r.ok for r in records), [r.to_dict() for r in records if not r.ok][:3]
        return len(records)

    def run() -> int:
        records = list(one_run.recognize(paths))
        assert all(r.ok for r in records)
        return len(records)

    requests()  # warm: decode processes started, sessions run once
    run()
    results: dict[str, list[tuple[float, float, float]]] = {"requests": [], "one run": []}
    for r in range(args.rounds):
        order = [("requests", requests), ("one run", run)]
        for name, work in order if r % 2 == 0 else order[::-1]:
            results[name].append(_measure(work))
            rate, own, kids = results[name][-1]
            print(f"round {r + 1} {name:8s}: {rate:6.1f} images/s, CPU per image {own:.2f} ms here + "
                  f"{kids:.2f} ms in decode processes", flush=True)
    med = {name: [statistics.median(v[i] for v in values) for i in range(3)] for name, values in results.items()}
    req, one = med["requests"], med["one run"]
    print(f"medians: requests {req[0]:.1f} images/s ({req[1] + req[2]:.2f} ms CPU per image), one run {one[0]:.1f} "
          f"images/s ({one[1] + one[2]:.2f} ms); requests / one run: {req[0] / one[0]:.2f}x images/s, "
          f"{(req[1] + req[2]) / (one[1] + one[2]):.2f}x CPU per image")
    one_run.close()
    asyncio.run(runtime.close())


if __name__ == "__main__":
    main()
