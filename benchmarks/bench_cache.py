"""Result cache benchmark: a cold run, then a warm rerun of the same photos, end to end through the CLI.

Each run is a fresh ``wanwu recognize`` process (interpreter start, model load, walking the folder, hashing
every file, writing jsonl), sharing one fresh cache file. Reports the warm-over-cold speedup, the sha256
hashing throughput over the photos, and the cache's size per image.

``--rerun N`` measures the nightly rerun instead: N files (hard links to the photos, 1,000 to a folder, in a
temporary folder) recognized once, then again unchanged (every one answered by the stat memo, none read),
then again after 1% of them are replaced. Reports records/s with start-up included, whether the rerun's
records are byte for byte the first run's, and the peak memory of a rerun over N/10 and over N files.

    python benchmarks/bench_cache.py                      # the 1,000 photos of ../shared/data
    python benchmarks/bench_cache.py --photos DIR --model M.onnx --labels L.txt --json
    python benchmarks/bench_cache.py --rerun 100000
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
    return run_measured(args, env)[0]


def run_measured(args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Seconds, peak resident memory of the wanwu process (bytes), and what it said on stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"wanwu failed ({proc.returncode}):\n{err}")
    return elapsed, usage.ru_maxrss * 1024, err


def make_links(files: list[Path], root: Path, n: int) -> list[Path]:
    """``n`` hard links to ``files`` (cycled), 1,000 to a folder."""
    links = []
    for i in range(n):
        folder = root / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        link = folder / f"{i % 1000:03d}-{files[i % len(files)].name}"
        os.link(files[i % len(files)], link)
        links.append(link)
    return links


def rerun(opts: argparse.Namespace, files: list[Path]) -> dict[str, Any]:
    """First run, unchanged rerun (and one over a tenth, for memory), rerun after 1% replaced."""
    with tempfile.TemporaryDirectory(prefix="wanwu-bench-rerun-") as tmp:
        work = Path(tmp)
        links = make_links(files, work / "links", opts.rerun)
        old = time.time() - 3600  # a collection's files were written a while ago (not within the racy window)
        for link in links[: len(files)]:
            if link.stat().st_mtime > old:  # hard links share the photos' inodes: leave an old mtime alone
                os.utime(link, (old, old))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANWU_HOME": str(work / "home")}
        common = ["recognize", "-m", str(opts.model), "-l", str(opts.labels), "-b", str(opts.batch_size),
                  "-j", str(opts.decoders), "--cache", str(work / "cache.sqlite3")]
        first_s, first_rss, _ = run_measured([*common, str(work / "links"), "-o", str(work / "first.jsonl")], env)
        tenth = [str(p) for p in sorted((work / "links").iterdir())[: max(1, opts.rerun // 10000)]]
        _, tenth_rss, _ = run_measured([*common, *tenth, "-o", str(work / "tenth.jsonl")], env)
        rerun_s, rerun_rss, said = run_measured([*common, str(work / "links"), "-o", str(work / "rerun.jsonl")], env)
        same = (work / "first.jsonl").read_bytes() == (work / "rerun.jsonl").read_bytes()
        for i, link in enumerate(links[:: 100]):  # 1% replaced by another photo (a new file, a new inode)
            replacement = link.with_name(link.name + ".new")
            replacement.write_bytes(files[(i * 7 + 1) % len(files)].read_bytes())
            os.replace(replacement, link)
        changed_s, _, changed_said = run_measured(
            [*common, str(work / "links"), "-o", str(work / "changed.jsonl")], env)
    return {
        "files": opts.rerun,
        "first_s": round(first_s, 2),
        "first_records_per_s": round(opts.rerun / first_s, 1),
        "rerun_s": round(rerun_s, 2),
        "rerun_records_per_s": round(opts.rerun / rerun_s, 1),
        "rerun_identical_records": same,
        "rerun_summary": " ".join(said.split()),
        "rerun_peak_rss_mb": round(rerun_rss / 1e6, 1),
        "rerun_tenth_peak_rss_mb": round(tenth_rss / 1e6, 1),
        "first_peak_rss_mb": round(first_rss / 1e6, 1),
        "one_percent_changed_s": round(changed_s, 2),
        "one_percent_changed_records_per_s": round(opts.rerun / changed_s, 1),
        "one_percent_changed_summary": " ".join(changed_said.split()),
    }


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
    parser.add_argument("-j", "--decoders", type=int, default=-1, help="decode processes (-1 = one per core)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    parser.add_argument("--rerun", type=int, default=0, metavar="N",
                        help="measure the unchanged rerun of N files (hard links to the photos) instead")
    opts = parser.parse_args()

    files = _files(opts.photos)
    if not files:
        raise SystemExit(f"no photos under {opts.photos}")
    if opts.rerun:
        figures = rerun(opts, files)
        print(json.dumps(figures, indent=2, ensure_ascii=False))
        return
    hashing = hashing_throughput(files)
    with tempfile.TemporaryDirectory(prefix="wanwu-bench-cache-") as tmp:
        work = Path(tmp)
        cache = work / "cache.sqlite3"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANWU_HOME": str(work / "home")}
        common = [
            "recognize", str(opts.photos), "-m", str(opts.model), "-l", str(opts.labels), "-q",
            "-b", str(opts.batch_size), "-j", str(opts.decoders), "--cache", str(cache),
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
