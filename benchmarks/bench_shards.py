"""WebDataset shards against the same photos as files: throughput and memory.

    python benchmarks/bench_shards.py [--repeats 3] [--copies 10]

(a) the 1,000 photos of ../shared/data as a folder of files, and as 10 tar shards of 100 samples each
(``KEY.jpg`` + ``KEY.json``, as img2dataset writes them): ``wanwu recognize`` on each, alternated, medians.
(b) peak RSS with shards of 100 samples against shards of 1,000 samples (the photos repeated ``--copies``
times so the big shards hold 1,000 distinct names): it must not grow with the shard's size, since a shard is
read as a stream, one sample at a time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LABELS, MODEL, PHOTOS, median, require_shared, timed


def write_shards(folder: Path, photos: list[Path], per_shard: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(photos), per_shard):
        path = folder / f"{start // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, photo in enumerate(photos[start : start + per_shard], start):
                for name, data in ((f"{i:09d}.jpg", photo.read_bytes()),
                                   (f"{i:09d}.json", json.dumps({"key": f"{i:09d}", "url": photo.name}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def command(*inputs: str) -> list[str]:
    return ["wanwu", "recognize", *inputs, "--model", str(MODEL), "--labels", str(LABELS), "--no-cache", "-q",
            "-f", "jsonl", "-o", os.devnull]


def peak_rss(*inputs: str) -> int:
    code = ("import resource, sys\nfrom wanwu.cli.main import main\nrc = main(sys.argv[1:])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code, *command(*inputs)[1:]], capture_output=True, text=True,
                          check=False)
    if proc.returncode not in (0, 3):
        raise RuntimeError(proc.stderr[-2000:])
    return int(proc.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=10)
    args = parser.parse_args()
    require_shared()
    photos = sorted(PHOTOS.iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(root / "s100", photos, 100)
        pattern = str(root / "s100" / f"{{00000..{(len(photos) - 1) // 100:05d}}}.tar")
        files, shards = [], []
        for _ in range(args.repeats):
            files.append(timed(command(str(PHOTOS))))
            shards.append(timed(command(pattern)))
        f, s = median(files), median(shards)
        print(f"(a) {len(photos)} photos: files {len(photos) / f:.0f} img/s ({f:.2f} s), shards of 100 "
              f"{len(photos) / s:.0f} img/s ({s:.2f} s): shards/files = {f / s:.2f}x (median of {args.repeats}, "
              "alternated)")
        many = photos * args.copies
        small = write_shards(root / "small", many, 100)
        big = write_shards(root / "big", many, 1000)
        rss_small = peak_rss(str(root / "small" / "*.tar"))
        rss_big = peak_rss(str(root / "big" / "*.tar"))
        size_big = big[0].stat().st_size / 1e6
        print(f"(b) {len(many)} samples: peak RSS {rss_small / 1024:.0f} MB with {len(small)} shards of 100, "
              f"{rss_big / 1024:.0f} MB with {len(big)} shards of 1,000 ({size_big:.0f} MB each): "
              f"{rss_big / rss_small:.2f}x")


if __name__ == "__main__":
    main()
