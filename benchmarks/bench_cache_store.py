"""Result store: wanwu's SqliteCache against diskcache, the library the redesign review suggested.

The access pattern is the orchestrator's: batches of 32 results written in one transaction, and batches of
32 content hashes looked up at once. Both stores are alternated twice in one run; report the ratios.

    python benchmarks/bench_cache_store.py [--entries 8000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402

from wanwu.cache import CachedResult  # noqa: E402
from wanwu.cache.sqlite import SqliteCache, decode_top, encode_top  # noqa: E402
from wanwu.records import top_scores  # noqa: E402

BATCH = 32


def _items(n: int) -> list[tuple[str, CachedResult]]:
    tops = top_scores(np.random.default_rng(0).normal(size=(256, 1000)).astype(np.float32))
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    return [(k, CachedResult(tops[i % len(tops)], 500, 375)) for i, k in enumerate(keys)]


def bench_sqlite(folder: Path, items: list[tuple[str, CachedResult]]) -> tuple[float, float]:
    cache = SqliteCache(folder / "cache.sqlite3")
    start = time.perf_counter()
    for i in range(0, len(items), BATCH):
        cache.put_many("ns", items[i : i + BATCH])
    put = time.perf_counter() - start
    keys = [k for k, _ in items]
    start = time.perf_counter()
    for i in range(0, len(keys), BATCH):
        if len(cache.get_many("ns", keys[i : i + BATCH])) != len(keys[i : i + BATCH]):
            raise SystemExit("sqlite: lost entries")
    get = time.perf_counter() - start
    cache.close()
    return put, get


def bench_diskcache(folder: Path, items: list[tuple[str, CachedResult]]) -> tuple[float, float]:
    import diskcache

    cache = diskcache.Cache(str(folder / "diskcache"))
    start = time.perf_counter()
    for i in range(0, len(items), BATCH):
        with cache.transact():
            for key, r in items[i : i + BATCH]:
                cache.set(("ns", key), (encode_top(r.top), r.width, r.height))
    put = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(items), BATCH):
        found = {}
        for key, _ in items[i : i + BATCH]:
            value = cache.get(("ns", key))
            if value is not None:
                found[key] = CachedResult(decode_top(value[0]), value[1], value[2])
        if len(found) != len(items[i : i + BATCH]):
            raise SystemExit("diskcache: lost entries")
    get = time.perf_counter() - start
    cache.close()
    return put, get


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=8000)
    args = parser.parse_args()
    items = _items(args.entries)
    rates: dict[str, list[tuple[float, float]]] = {"sqlite": [], "diskcache": []}
    for _ in range(2):
        for name, fn in (("sqlite", bench_sqlite), ("diskcache", bench_diskcache)):
            with tempfile.TemporaryDirectory() as tmp:
                put, get = fn(Path(tmp), items)
            rates[name].append((len(items) / put, len(items) / get))
    for name, runs in rates.items():
        put = max(r[0] for r in runs)
        get = max(r[1] for r in runs)
        print(f"{name:10s} put {put:9.0f}/s   get {get:9.0f}/s   (best of {len(runs)}, pid {os.getpid()})")
    s_put, s_get = (max(r[i] for r in rates["sqlite"]) for i in (0, 1))
    d_put, d_get = (max(r[i] for r in rates["diskcache"]) for i in (0, 1))
    print(f"sqlite / diskcache: put {s_put / d_put:.2f}x, get {s_get / d_get:.2f}x")


if __name__ == "__main__":
    main()
