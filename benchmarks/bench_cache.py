"""Result cache benchmark: a cold run, then a warm rerun of the same photos, end to end through the CLI.

Each run is a fresh ``wanwu recognize`` process (interpreter start, model load, walking the folder, hashing
every file, writing jsonl), sharing one fresh cache file. Reports the warm-over-cold speedup, the sha256
hashing throughput over the photos, and the cache's size per image.

    python benchmarks/bench_cache.py                      # the 1,000 photos of ../shared/data
    python benchmarks/bench_cache.py --photos DIR --model M.onnx --labels L.txt --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CLI = "import sys; from wanwu.cli.main import main; sys.exit(main())"


def _files(folder: Path) -> list[Path]:
    sys.path.insert(0, str(ROOT / "src"))
    from wanwu.sources import walk_images

    return list(walk_images(folder))


def hashing_throughput(files: list[Path]) -> dict[str, float]:
    """sha256 over the photos' bytes: in memory (the hash alone) and read + hash (what a run does)."""
    blobs = [f.read_bytes() for f in files]  # also warms the page cache, as for a rerun
    total = sum(len(b) for b in blobs)
    start = time.perf_counter()
    for blob in blobs:
        hashlib.sha256(blob).digest()
    in_memory = time.perf_counter() - start
    start = time.perf_counter()
    for f in files:
        hashlib.sha256(f.read_bytes()).digest()
    read_and_hash = time.perf_counter() - start
    return {
        "bytes": total,
        "sha256_mb_per_s": total / in_memory / 1e6,
        "read_and_sha256_mb_per_s": total / read_and_hash / 1e6,
    }


def run_cli(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise SystemExit(f"wanwu failed ({proc.returncode}):\n{proc.stderr}")
    return elapsed


def cache_size(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    entries, payload = conn.execute("SELECT count(*), coalesce(sum(length(top)), 0) FROM results").fetchone()
    conn.close()
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if not p.name.endswith("-shm"))
    return {
        "entries": entries,
        "file_bytes": size,
        "bytes_per_image": size / entries if entries else 0.0,
        "payload_bytes_per_image": payload / entries if entries else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=Path, default=SHARED / "images" / "imagenet-sample-images")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "mobilenetv2-12-int8.onnx")
    parser.add_argument("--labels", type=Path, default=SHARED / "labels" / "imagenet_zh.txt")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=-1, help="decode processes (-1 = one per core)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    opts = parser.parse_args()

    files = _files(opts.photos)
    if not files:
        raise SystemExit(f"no photos under {opts.photos}")
    hashing = hashing_throughput(files)
    with tempfile.TemporaryDirectory(prefix="wanwu-bench-cache-") as tmp:
        work = Path(tmp)
        cache = work / "cache.sqlite3"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANWU_HOME": str(work / "home")}
        common = [
            "recognize", str(opts.photos), "-m", str(opts.model), "-l", str(opts.labels), "-q",
            "-b", str(opts.batch_size), "-j", str(opts.workers), "--cache", str(cache),
        ]
        cold = run_cli([*common, "-o", str(work / "cold.jsonl")], env)
        warm = run_cli([*common, "-o", str(work / "warm.jsonl")], env)
        same = (work / "cold.jsonl").read_bytes() == (work / "warm.jsonl").read_bytes()
        lines = (work / "warm.jsonl").read_bytes().count(b"\n")
        size = cache_size(cache)
    figures = {
        "images": len(files),
        "records": lines,
        "cold_s": round(cold, 2),
        "warm_s": round(warm, 2),
        "speedup": round(cold / warm, 2),
        "identical_output": same,
        "cold_images_per_s": round(len(files) / cold, 1),
        "warm_images_per_s": round(len(files) / warm, 1),
        "photos_mb": round(hashing["bytes"] / 1e6, 1),
        "sha256_mb_per_s": round(hashing["sha256_mb_per_s"], 1),
        "read_and_sha256_mb_per_s": round(hashing["read_and_sha256_mb_per_s"], 1),
        "cache_entries": size["entries"],
        "cache_file_bytes": size["file_bytes"],
        "cache_bytes_per_image": round(size["bytes_per_image"], 1),
        "cache_payload_bytes_per_image": round(size["payload_bytes_per_image"], 1),
    }
    if opts.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{figures['images']} photos, {figures['photos_mb']} MB, model {opts.model.name}")
    print(f"cold run : {cold:6.2f} s  ({figures['cold_images_per_s']} images/s, fills the cache)")
    print(f"warm run : {warm:6.2f} s  ({figures['warm_images_per_s']} images/s, every result from the cache)")
    print(f"speedup  : {figures['speedup']}x end to end (process start and model load included); "
          f"outputs identical: {same}")
    print(f"sha256   : {figures['sha256_mb_per_s']} MB/s in memory, "
          f"{figures['read_and_sha256_mb_per_s']} MB/s read + hash (page cache warm), one thread")
    print(f"cache    : {size['entries']} entries, {size['file_bytes']:,} bytes on disk = "
          f"{figures['cache_bytes_per_image']} bytes per image "
          f"({figures['cache_payload_bytes_per_image']} bytes of scores)")


if __name__ == "__main__":
    main()
