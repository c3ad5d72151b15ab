"""A/B: the same `wanwu recognize` run from two source trees, alternated, in one run of this script.

    python benchmarks/bench_ab.py --base ../base/src [--new src] [--rounds 3] [--phone 40]

Each round runs A then B (then B then A the next round) on the 1,000 photos of ../shared/data and, with
--phone N, on N phone-size JPEGs made from them; it reports each side's median seconds and the B/A throughput
ratio. Alternating cancels most of the drift of a shared machine; a ratio near 1.00 means no change.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LABELS, MODEL, PHOTOS, median, require_shared

ROOT = Path(__file__).resolve().parents[1]


def run(src: Path, folder: Path, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "wanwu", "recognize", str(folder), "--model", str(MODEL), "--labels", str(LABELS),
           "--no-cache", "-q", "-o", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{src}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, type=Path, help="the A side's src folder (e.g. an older checkout)")
    parser.add_argument("--new", type=Path, default=ROOT / "src", help="the B side's src folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phone", type=int, default=0, help="also N phone-size photos (4032x3024)")
    args = parser.parse_args()
    require_shared()
    sets = [("1,000 photos", PHOTOS)]
    with tempfile.TemporaryDirectory() as tmp:
        if args.phone:
            from bench_core import make_phone_photos

            phone = Path(tmp) / "phone"
            phone.mkdir()
            make_phone_photos(phone, args.phone)
            sets.append((f"{args.phone} phone photos", phone))
        for name, folder in sets:
            times: dict[str, list[float]] = {"A": [], "B": []}
            for i in range(args.rounds):
                order = [("A", args.base), ("B", args.new)]
                for side, src in order if i % 2 == 0 else order[::-1]:
                    times[side].append(run(src.resolve(), folder, Path(tmp) / f"{side}.jsonl"))
            a, b = median(times["A"]), median(times["B"])
            print(f"{name}: A {a:.2f}s, B {b:.2f}s (medians of {args.rounds}); B/A throughput {a / b:.2f}x")


if __name__ == "__main__":
    main()
