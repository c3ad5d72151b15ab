"""Search quality and speed.

    python benchmarks/bench_search.py recall [--queries 300]
    python benchmarks/bench_search.py scale [--rows 1000000] [--dim 512] [--queries 200]

``recall``: index the 1,000 photos of ../shared/data with the real int8 MobileNetV2, then query with altered
copies of ``--queries`` of them (shrunk to half and recompressed at JPEG quality 40, mirrored and turned by
8 degrees, cropped to the central 70%, recoloured); reports how often the original is the first hit, for
pooled features (the default) and for the logits (``--embedding-output output``).

``scale``: ``--rows`` synthetic L2-normalised vectors (a mixture of 2,000 clusters, as real embeddings are
clustered), exact search (float16 rows, one matrix product per query, as ``wanwu.index`` does) against ANN
indexes (faiss IVF-flat, usearch HNSW with f16 storage): build seconds, resident memory added, p50/p99
latency of single queries, recall@10 against the exact answer.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LABELS, MODEL, PHOTOS, require_shared
from wanwu.config import RecognizeOptions
from wanwu.index import ImageIndex
from wanwu.pipeline import Recognizer
from wanwu.search import build_index, embedding_options, search_images


def shrink(image: Image.Image) -> Image.Image:
    return image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.Resampling.BILINEAR)


def mirror_turn(image: Image.Image) -> Image.Image:
    return ImageOps.mirror(image).rotate(8, resample=Image.Resampling.BILINEAR, expand=False)


def crop(image: Image.Image) -> Image.Image:
    w, h = image.size
    return image.crop((int(w * 0.15), int(h * 0.15), int(w * 0.85), int(h * 0.85)))


def recolour(image: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(ImageEnhance.Color(image).enhance(0.6)).enhance(1.15)


ALTERATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "shrunk+recompressed": shrink, "mirrored+turned": mirror_turn, "cropped": crop, "recoloured": recolour,
}


def recall(queries: int) -> None:
    require_shared()
    work = Path(tempfile.mkdtemp(prefix="wanwu-bench-search-"))
    photos = sorted(PHOTOS.glob("*.JPEG"))
    step = max(1, len(photos) // queries)
    chosen = photos[::step][:queries]
    names = list(ALTERATIONS)
    made: list[tuple[Path, str, str]] = []
    for i, photo in enumerate(chosen):
        kind = names[i % len(names)]
        out = work / "queries" / f"{i:04d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        ALTERATIONS[kind](Image.open(photo).convert("RGB")).save(out, quality=40 if kind.startswith("shrunk") else 85)
        made.append((out, photo.name, kind))
    for label, tensor in (("pooled features", None), ("logits", "output")):
        options = embedding_options(RecognizeOptions(cache_path=work / "cache.sqlite3"), tensor)
        with Recognizer(str(MODEL), labels=LABELS, options=options) as rec:
            start = time.perf_counter()
            build_index(rec, work / f"index-{tensor}", [str(PHOTOS)])
            built = time.perf_counter() - start
            index = ImageIndex.open(work / f"index-{tensor}")
            results = list(search_images(rec, index, [str(p) for p, _, _ in made], k=5))
        first: dict[str, list[bool]] = {k: [] for k in names}
        for (_, original, kind), result in zip(made, results, strict=True):
            top = Path(index.rows[result.hits[0].row].input).name if result.hits else None
            first[kind].append(top == original)
        every = [ok for oks in first.values() for ok in oks]
        print(f"{label}: original first for {sum(every)}/{len(every)} = {100 * np.mean(every):.1f}% "
              f"(index of {len(index)} built in {built:.1f}s)")
        for kind, oks in first.items():
            print(f"  {kind:22s} {100 * np.mean(oks):5.1f}% of {len(oks)}")


def clustered(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, dim)).astype(np.float32)
    out = np.empty((rows, dim), dtype=np.float16)
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        x = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
        out[start : start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def latency(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> tuple[float, float, list[Any]]:
    times, answers = [], []
    for q in queries:
        start = time.perf_counter()
        answers.append(fn(q[None, :]))
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), answers


def recall_at(found: list[np.ndarray], truth: list[np.ndarray], k: int = 10) -> float:
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth,
                                                                                            strict=True)]))


def scale(rows: int, dim: int, n_queries: int, skip: set[str]) -> None:
    base = rss_mb()
    data = clustered(rows, dim)
    queries = clustered(n_queries, dim, seed=1).astype(np.float32)
    print(f"{rows} x {dim} rows ({data.nbytes / 2**20:.0f} MiB as float16); {n_queries} single queries")

    def exact(q: np.ndarray) -> np.ndarray:
        scores = np.concatenate([q @ data[s : s + 65536].astype(np.float32).T for s in range(0, rows, 65536)],
                                axis=1)[0]
        top = np.argpartition(-scores, 10)[:10]
        return top[np.argsort(-scores[top])]

    p50, p99, truth = latency(exact, queries)
    print(f"exact (numpy, float16 rows):  build 0s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, recall@10 1.000")
    if "faiss" not in skip:
        import faiss

        start, before = time.perf_counter(), rss_mb()
        lists = int(4 * np.sqrt(rows))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = data[np.random.default_rng(2).choice(rows, min(rows, lists * 40), replace=False)]
        ivf.train(sample.astype(np.float32))
        for s in range(0, rows, 100_000):
            ivf.add(data[s : s + 100_000].astype(np.float32))
        built = time.perf_counter() - start
        print(f"faiss IVF-flat ({lists} lists): build {built:.0f}s, +{rss_mb() - before:.0f} MiB peak RSS")
        for nprobe in (8, 16, 32, 64):
            ivf.nprobe = nprobe
            p50, p99, found = latency(lambda q: ivf.search(q, 10)[1][0], queries)
            print(f"  nprobe {nprobe:3d}: p50 {p50:.1f} ms, p99 {p99:.1f} ms, recall@10 {recall_at(found, truth):.3f}")
        del ivf
    if "usearch" not in skip:
        from usearch.index import Index

        start, before = time.perf_counter(), rss_mb()
        hnsw = Index(ndim=dim, metric="cos", dtype="f16", connectivity=16, expansion_add=128)
        hnsw.add(np.arange(rows), data, threads=0)
        built = time.perf_counter() - start
        print(f"usearch HNSW (f16, M=16): build {built:.0f}s, +{rss_mb() - before:.0f} MiB peak RSS")
        for ef in (32, 64, 128):
            hnsw.expansion_search = ef
            p50, p99, found = latency(lambda q: hnsw.search(q[0], 10).keys, queries)
            print(f"  ef {ef:3d}: p50 {p50:.1f} ms, p99 {p99:.1f} ms, recall@10 {recall_at(found, truth):.3f}")
    print(f"peak RSS of the whole run: {rss_mb() - base:.0f} MiB above the start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    r = sub.add_parser("recall")
    r.add_argument("--queries", type=int, default=300)
    s = sub.add_parser("scale")
    s.add_argument("--rows", type=int, default=1_000_000)
    s.add_argument("--dim", type=int, default=512)
    s.add_argument("--queries", type=int, default=200)
    s.add_argument("--skip", action="append", default=[], choices=["faiss", "usearch"])
    args = parser.parse_args()
    if args.part == "recall":
        recall(args.queries)
    else:
        scale(args.rows, args.dim, args.queries, set(args.skip))


if __name__ == "__main__":
    main()
