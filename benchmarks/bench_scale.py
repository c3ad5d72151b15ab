"""JPEG reduced-scale decoding: what each DCT scale costs in agreement and accuracy on phone-size photos.

    python benchmarks/bench_scale.py [--n 1000] [--jobs 2] [--int8 exact|native] [--model int8|float]

Each of the first N photos of ../shared/data is made phone-size as bench_core makes them (4032x3024 bicubic,
JPEG q90, here in memory) and decoded three ways: at full size, and at libjpeg's 1/4 and 1/8 DCT scales.
Each is then oriented, resized and center-cropped as wanwu does (imaging's own functions) and run through the
int8 MobileNetV2. For each reduced scale it reports the top-1 agreement with the full decode (the decision rule:
>= 99%), the top-1 and top-5 accuracy against images/labels.csv beside the full decode's, the largest change of
a crop pixel, and the decode + resize time per image (one core). Then what 99% agreement would cost a reduced
decode that re-decodes in full the photos whose top-1 is a near tie (the smallest gaps between their first two
raw scores): the gap below which it must, and the share of photos that then take both decodes. It also says which scale
:func:`wanwu.imaging.draft_scale` picks for these photos, so the figures belong to the rule as shipped.

``--model float`` runs the same measurement through the model's float twin (``_float_twin.py``: the same weights,
dequantized, with the int8 graph's saturation kept and its rounding left out): what the decode rule costs a float
network such as the seed ResNeSt-101, apart from what it costs this int8 model.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LABELS, MODEL, PHOTOS, SHARED, require_shared
from _float_twin import float_twin
from wanwu.backends.int8 import cpu_has_vnni
from wanwu.imaging import _resize_crop, _to_rgb, _upright, draft_scale
from wanwu.spec import PreprocessSpec

SCALES = (1, 4, 8)  # 1/2 is never what a phone photo gets; full size is the reference
PHONE = (4032, 3024)
SPEC = PreprocessSpec()


def phone_jpeg(path: Path) -> bytes:
    """The photo at phone size, as bench_core.make_phone_photos writes it."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize(PHONE, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def crop_at(data: bytes, scale: int) -> tuple[npt.NDArray[np.uint8], float]:
    """The model's crop of ``data`` decoded at 1/``scale``, and the seconds decoding and resizing took."""
    start = time.perf_counter()
    image = Image.open(io.BytesIO(data))
    if scale > 1:
        image.draft("RGB", (image.size[0] // scale, image.size[1] // scale))
    image.load()
    assert image.size == (-(-PHONE[0] // scale), -(-PHONE[1] // scale)), image.size
    pixels = _resize_crop(_to_rgb(_upright(image)), SPEC)
    return pixels, time.perf_counter() - start


def one(path: Path) -> tuple[str, list[npt.NDArray[np.uint8]], list[float]]:
    data = phone_jpeg(path)
    crops, seconds = zip(*(crop_at(data, s) for s in SCALES), strict=True)
    return path.name, list(crops), list(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--int8", choices=["exact", "native"], default="exact" if not cpu_has_vnni() else "native")
    parser.add_argument("--model", choices=["int8", "float"], default="int8",
                        help="the int8 model as it is, or its float twin")
    args = parser.parse_args()
    require_shared()
    from wanwu.backends import BackendOptions
    from wanwu.engine import Engine

    truth = {Path(row["file"]).name: int(row["class_index"])
             for row in csv.DictReader((SHARED / "images" / "labels.csv").open(encoding="utf-8"))}
    files = sorted(PHOTOS.iterdir())[: args.n]
    workdir = tempfile.TemporaryDirectory()
    model = MODEL
    if args.model == "float":
        model = Path(workdir.name) / f"{MODEL.stem}-float.onnx"
        model.write_bytes(float_twin(MODEL))
    engine = Engine.load(str(model), LABELS, BackendOptions(int8=args.int8))
    # the float twin's own check: how often it names what the int8 model names, on the full decodes
    original = Engine.load(str(MODEL), LABELS, BackendOptions(int8=args.int8)) if args.model == "float" else None
    original_top1: list[int] = []
    top5: dict[int, list[list[int]]] = {s: [] for s in SCALES}
    gaps: dict[int, list[float]] = {s: [] for s in SCALES}  # top-1 minus top-2 raw score
    seconds: dict[int, list[float]] = {s: [] for s in SCALES}
    worst = {s: 0 for s in SCALES}
    names = []
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        for k, (name, crops, took) in enumerate(pool.map(one, files, chunksize=4), 1):
            names.append(name)
            for s, crop, t in zip(SCALES, crops, took, strict=True):
                top = engine.infer([crop])[0]
                top5[s].append(top.indices[:5].tolist())
                gaps[s].append(float(top.values[0] - top.values[1]))
                seconds[s].append(t)
                worst[s] = max(worst[s], int(np.abs(crop.astype(int) - crops[0].astype(int)).max()))
            if original is not None:
                original_top1.append(int(original.infer([crops[0]])[0].indices[0]))
            if k % 100 == 0:
                print(f"  {k}/{len(files)} photos ({time.perf_counter() - started:.0f}s)", flush=True)
    engine.close()
    if original is not None:
        original.close()
    workdir.cleanup()
    gt = [truth[n] for n in names]
    n = len(names)

    def accuracy(s: int, k: int) -> float:
        return sum(g in t[:k] for g, t in zip(gt, top5[s], strict=True)) / n * 100

    picked = draft_scale(*PHONE, engine.spec.preprocess)  # the rule as resolved for this model
    numerics = f"int8={args.int8}" if args.model == "int8" else "the float twin"
    print(f"{n} photos at {PHONE[0]}x{PHONE[1]} (JPEG q90), {numerics}; wanwu's rule decodes them at 1/{picked}")
    print(f"{'scale':>6} {'decoded':>10} {'agree top-1':>12} {'top-1 acc':>10} {'top-5 acc':>10} "
          f"{'max |Δpx|':>10} {'ms/image':>9}")
    for s in SCALES:
        agree = sum(a[0] == b[0] for a, b in zip(top5[s], top5[1], strict=True)) / n * 100
        size = f"{-(-PHONE[0] // s)}x{-(-PHONE[1] // s)}"
        print(f"{'1/' + str(s):>6} {size:>10} {agree:>11.1f}% {accuracy(s, 1):>9.1f}% {accuracy(s, 5):>9.1f}% "
              f"{worst[s]:>10} {np.median(seconds[s]) * 1e3:>9.1f}")
    if original_top1:
        same = sum(a == b[0] for a, b in zip(original_top1, top5[1], strict=True)) / n * 100
        right = sum(a == g for a, g in zip(original_top1, gt, strict=True)) / n * 100
        print(f"the float twin's top-1 on the full decodes is the int8 model's on {same:.1f}% of the photos "
              f"(the int8 model's top-1 accuracy: {right:.1f}%)")
    for s in SCALES[1:]:
        agrees = [a[0] == b[0] for a, b in zip(top5[s], top5[1], strict=True)]
        if sum(agrees) >= 0.99 * n:
            print(f"1/{s} is at 99% agreement or above as it is")
            continue
        share, gap = _full_decodes_for(0.99, agrees, gaps[s])
        print(f"1/{s} reaching 99% agreement by also decoding in full every photo whose top-1 leads by less than "
              f"{gap:.2f}: {share * 100:.1f}% of the photos")


def _full_decodes_for(target: float, agrees: list[bool], gaps: list[float]) -> tuple[float, float]:
    """The smallest share of photos that, re-decoded in full (nearest ties first), lifts the agreement to
    ``target``; and the gap below which a photo is re-decoded then."""
    order = sorted(range(len(gaps)), key=gaps.__getitem__)
    wrong = sum(not a for a in agrees)
    allowed = int((1 - target) * len(agrees))
    for taken, i in enumerate(order):
        if wrong <= allowed:
            return taken / len(agrees), gaps[i]
        wrong -= not agrees[i]
    return 1.0, float("inf")


if __name__ == "__main__":
    main()
