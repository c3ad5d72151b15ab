"""A/B: the same `wanwu recognize` run from two source trees, alternated, in one run of this script.

    python benchmarks/bench_ab.py --base ../base/src [--new src] [--rounds 3] [--phone 40] [--one 7]
                                  [--sets one,all,phone]

Each round runs A then B (then B then A the next round) on the 1,000 photos of ../shared/data, with --phone N
on N phone-size JPEGs made from them, and with --one N on one photo (N rounds: a cold process each, so
start-up is what it measures); it reports each side's median seconds (and CPU seconds, which other load on a
shared machine disturbs less) and the B/A ratio. Alternating cancels most of the drift of a shared machine; a
ratio near 1.00 means no change.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LABELS, MODEL, PHOTOS, ab_parser, compile_trees, median, require_shared, timed_cpu


def run(src: Path, target: Path, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of `wanwu recognize TARGET` from the tree ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "wanwu", "recognize", str(target), "--model", str(MODEL), "--labels", str(LABELS),
           "--no-cache", "-q", "-o", str(out)]
    return timed_cpu(cmd, env)


def main() -> None:
    parser = ab_parser(__doc__, rounds=3)
    parser.add_argument("--phone", type=int, default=0, help="also N phone-size photos (4032x3024)")
    parser.add_argument("--one", type=int, default=0, help="also one photo, this many rounds")
    parser.add_argument("--sets", default="one,all,phone", help="which of one, all, phone to run")
    args = parser.parse_args()
    require_shared()
    compile_trees(args.base, args.new)
    wanted = set(args.sets.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        sets = []
        if args.one and "one" in wanted:
            sets.append(("one photo", sorted(PHOTOS.iterdir())[0], args.one))
        if "all" in wanted:
            sets.append(("1,000 photos", PHOTOS, args.rounds))
        if args.phone and "phone" in wanted:
            from bench_core import make_phone_photos

            phone = Path(tmp) / "phone"
            phone.mkdir()
            make_phone_photos(phone, args.phone)
            sets.append((f"{args.phone} phone photos", phone, args.rounds))
        for name, target, rounds in sets:
            times: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
            order = [("A", args.base), ("B", args.new)]
            run(args.base.resolve(), target, Path(tmp) / "warm.jsonl")  # file cache, int8 rewrite
            for i in range(rounds):
                for side, src in order if i % 2 == 0 else order[::-1]:
                    times[side].append(run(src.resolve(), target, Path(tmp) / f"{side}.jsonl"))
            a, b = (median([t[0] for t in times[k]]) for k in "AB")
            ca, cb = (median([t[1] for t in times[k]]) for k in "AB")
            print(f"{name}: A {a:.2f}s (CPU {ca:.2f}s), B {b:.2f}s (CPU {cb:.2f}s), medians of {rounds}; "
                  f"B/A throughput {a / b:.2f}x (CPU {ca / cb:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
