"""Core engine benchmark: the CLI end to end against a naive script, RSS vs input count, stage costs.

    python benchmarks/bench_core.py [--repeats 3] [--phone 100] [--int8 exact|native] [--only one,a,b]

(one) one photo, end to end: `wanwu recognize photo.jpg` (its defaults) against the naive script on a folder
of that one photo (as a user writes it: the model as it is), both from a cold process, --one-repeats runs
each; (a) the 1,000 photos in ../shared/data; (b) N phone-size photos (4032x3024 JPEG q90) made from them.
Runs alternate (naive, wanwu, wanwu, naive, …) and medians are reported, because the machine is shared;
CPU seconds (the process and what it waited for) are reported beside wall time, being less sensitive to
other load on the machine.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LABELS, MODEL, PHOTOS, alternate, median, require_shared, timed
from wanwu.backends.int8 import cpu_has_vnni


def make_phone_photos(folder: Path, n: int) -> None:
    for i, src in enumerate(sorted(PHOTOS.iterdir())[:n]):
        img = Image.open(src).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC)
        img.save(folder / f"phone_{i:03d}.jpg", "JPEG", quality=90)


def compare(folder: Path, repeats: int, int8: str) -> tuple[float, float]:
    naive = [sys.executable, str(Path(__file__).parent / "naive.py"), str(MODEL), str(LABELS), str(folder)]
    if int8 == "exact":
        naive.append("--exact-int8")
    ours = ["wanwu", "recognize", str(folder), "--model", str(MODEL), "--labels", str(LABELS),
            "--no-cache", "-q", "-f", "jsonl", "-o", os.devnull, "--int8", int8]
    t_naive, t_ours = [], []
    for _ in range(repeats):
        t_naive.append(timed(naive))
        t_ours.append(timed(ours))
    return median(t_naive), median(t_ours)


def one_photo(repeats: int) -> dict[str, float]:
    """Medians of one photo end to end: naive script vs `wanwu recognize photo.jpg` (wall and CPU seconds)."""
    photo = sorted(PHOTOS.iterdir())[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "one"
        folder.mkdir()
        (folder / photo.name).write_bytes(photo.read_bytes())
        naive = [sys.executable, str(Path(__file__).parent / "naive.py"), str(MODEL), str(LABELS), str(folder)]
        ours = ["wanwu", "recognize", str(folder / photo.name), "--model", str(MODEL), "--labels", str(LABELS),
                "--no-cache", "-q", "-f", "jsonl", "-o", os.devnull]
        runs = alternate({"naive": naive, "wanwu": ours, "help": ["wanwu", "--help"]}, repeats)
    return {name: median(values) for name, values in runs.items()}


def peak_rss(n: int, int8: str) -> int:
    """Peak RSS (KiB) of the wanwu process over n inputs (the photos repeated, fed on stdin)."""
    files = sorted(str(p) for p in PHOTOS.iterdir())
    listing = "\n".join(files[i % len(files)] for i in range(n)) + "\n"
    code = ("import resource, sys\nfrom wanwu.cli.main import main\nrc = main(sys.argv[1:])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    proc = subprocess.run(
        [sys.executable, "-c", code, "recognize", "-", "--model", str(MODEL), "--labels", str(LABELS),
         "--no-cache", "-q", "-o", os.devnull, "--int8", int8],
        input=listing, capture_output=True, text=True, check=True,
    )
    return int(proc.stderr.strip().splitlines()[-1])


def stage_costs(int8: str, folder: Path = PHOTOS, n: int = 200) -> dict[str, float]:
    """Per-image milliseconds of each stage as wanwu runs it (JPEG draft included), one core."""
    from wanwu.backends import BackendOptions
    from wanwu.engine import Engine
    from wanwu.imaging import _maybe_draft, _resize_crop, _to_rgb, to_batch
    from wanwu.spec import PreprocessSpec

    engine = Engine.load(str(MODEL), LABELS, BackendOptions(threads=1, int8=int8))
    files = sorted(folder.iterdir())[:n]
    datas = [f.read_bytes() for f in files]
    t0 = time.perf_counter()
    images = []
    for d in datas:
        img = Image.open(io.BytesIO(d))
        _maybe_draft(img, PreprocessSpec())
        img.load()
        images.append(_to_rgb(img))
    t1 = time.perf_counter()
    crops = [_resize_crop(img, engine.spec.preprocess) for img in images]
    to_batch(crops, engine.spec.preprocess)
    t2 = time.perf_counter()
    engine.infer(crops[:32])
    t3 = time.perf_counter()
    engine.infer(crops)
    t4 = time.perf_counter()
    return {"decode": (t1 - t0) / n * 1e3, "preprocess": (t2 - t1) / n * 1e3, "inference": (t4 - t3) / n * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one-repeats", type=int, default=7)
    parser.add_argument("--phone", type=int, default=100)
    parser.add_argument("--int8", choices=["exact", "native"], default="exact" if not cpu_has_vnni() else "native")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--only", default="one,a,b,rss", help="sections: one, a, b, rss (comma-separated)")
    args = parser.parse_args()
    require_shared()
    only = set(args.only.split(","))
    cores = os.cpu_count() or 1
    print(f"cores={cores} vnni={cpu_has_vnni()} int8={args.int8}")

    if "one" in only:
        one = one_photo(args.one_repeats)
        print(f"(one) one photo: naive {one['naive']:.2f}s (CPU {one['naive cpu']:.2f}s), wanwu "
              f"{one['wanwu']:.2f}s (CPU {one['wanwu cpu']:.2f}s): wanwu/naive {one['wanwu'] / one['naive']:.2f}x "
              f"wall, {one['wanwu cpu'] / one['naive cpu']:.2f}x CPU; `wanwu --help` {one['help']:.2f}s "
              f"(medians of {args.one_repeats})")
    sections = []
    if "a" in only:
        naive, ours = compare(PHOTOS, args.repeats, args.int8)
        print(f"(a) 1,000 photos: naive {naive:.1f}s ({1000 / naive:.0f} img/s), wanwu {ours:.1f}s "
              f"({1000 / ours:.0f} img/s): {naive / ours:.2f}x")
        sections.append(("(a)", stage_costs(args.int8), 1000, ours, naive))
    if "b" in only:
        with tempfile.TemporaryDirectory() as tmp:
            make_phone_photos(Path(tmp), args.phone)
            naive_b, ours_b = compare(Path(tmp), max(1, args.repeats - 1), args.int8)
            costs_b = stage_costs(args.int8, Path(tmp), min(args.phone, 30))
        print(f"(b) {args.phone} phone photos 4032x3024: naive {naive_b:.1f}s, wanwu {ours_b:.1f}s: "
              f"{naive_b / ours_b:.2f}x")
        sections.append(("(b)", costs_b, args.phone, ours_b, naive_b))

    if "rss" in only and not args.skip_rss:
        small, large = peak_rss(1000, args.int8), peak_rss(10000, args.int8)
        print(f"peak RSS: 1,000 inputs {small / 1024:.0f} MiB, 10,000 inputs {large / 1024:.0f} MiB "
              f"({(large / small - 1) * 100:+.1f}%)")

    for name, costs, count, seconds, naive_s in sections:
        bound = 1000 / sum(costs.values()) * cores
        print(f"{name} per-image stage costs (1 core): " + ", ".join(f"{k} {v:.2f} ms" for k, v in costs.items()))
        print(f"{name} CPU bound for {cores} cores: {bound:.0f} img/s; wanwu end to end reached "
              f"{count / seconds:.0f} img/s = {count / seconds / bound * 100:.0f}% of it "
              "(process start and model load included)")
        print(f"{name} a pipeline at that bound, with no start-up cost, would be {naive_s / (count / bound):.2f}x "
              "the naive script")


if __name__ == "__main__":
    main()
