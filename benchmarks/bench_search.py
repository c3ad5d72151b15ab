"""Search quality and speed.

    python benchmarks/bench_search.py recall [--queries 300]
    python benchmarks/bench_search.py scale [--rows 1000000] [--dim 512] [--queries 200]

``recall``: index the 1,000 photos of ../shared/data with the real int8 MobileNetV2, then query with altered
copies of ``--queries`` of them (shrunk to half and recompressed at JPEG quality 40, mirrored and turned by
8 degrees, cropped to the central 70%, recoloured); reports how often the original is the first hit, for
pooled features (the default) and for the logits (``--embedding-output output``).

``scale``: ``--rows`` synthetic L2-normalised vectors (a mixture of 2,000 clusters, as real embeddings are
clustered), exact search (float16 rows, one matrix product per query, as ``wanwu.index`` does, timed at
several sizes) against ANN indexes (faiss IVF with float16 storage, as ``wanwu.ann`` builds it, searched from
its memory-mapped file; usearch HNSW with f16 storage, optionally on fewer rows: ``--usearch-rows``): build
seconds, resident memory added, p50/p99 latency of single queries, recall@10 against the exact answer, for
queries from the rows' mixture (photo-like) and from another mixture (far from every row, like text queries).
"""

from __future__ import annotations

import argparse
import os
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


def clustered(rows: int, dim: int, seed: int = 0, centres_seed: int = 0) -> np.ndarray:
    """``rows`` L2-normalised float16 vectors from one mixture of 2,000 clusters (``centres_seed`` picks the
    mixture, ``seed`` the members): queries drawn with another ``seed`` come from the same mixture."""
    centres = np.random.default_rng(centres_seed).standard_normal((2000, dim)).astype(np.float32)
    rng = np.random.default_rng(seed + 1000)
    out = np.empty((rows, dim), dtype=np.float16)
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        x = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
        out[start : start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def rss_mb() -> float:
    """Resident memory now (MiB), file-backed pages of a memory-mapped index included."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
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
    return float(np.mean([len(set(np.asarray(f)[:k].tolist()) & set(t[:k].tolist())) / k
                          for f, t in zip(found, truth, strict=True)]))


def recalls(found: list[np.ndarray], truth: list[np.ndarray]) -> str:
    """recall@10 of the photo-like half of the queries (same mixture) and of the foreign half."""
    half = len(truth) // 2
    return (f"recall@10 {recall_at(found[:half], truth[:half]):.3f} same mixture, "
            f"{recall_at(found[half:], truth[half:]):.3f} foreign")


def exact_truth(data: np.ndarray, queries: np.ndarray, k: int = 10) -> list[np.ndarray]:
    """The exact top ``k`` of every query, all queries at once (fast; latency is measured one by one)."""
    best = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    rows = np.zeros((len(queries), 0), dtype=np.int64)
    for s in range(0, len(data), 65536):
        scores = queries @ data[s : s + 65536].astype(np.float32).T
        best = np.concatenate([best, scores], axis=1)
        rows = np.concatenate([rows, np.broadcast_to(np.arange(s, s + scores.shape[1]), scores.shape)], axis=1)
        keep = np.argpartition(-best, k - 1, axis=1)[:, :k]
        best, rows = np.take_along_axis(best, keep, axis=1), np.take_along_axis(rows, keep, axis=1)
    return [r[np.argsort(-b)] for b, r in zip(best, rows, strict=True)]


def run_exact(data: np.ndarray, queries: np.ndarray, n: int) -> None:
    from wanwu.index import SEARCH_CHUNK

    def exact(q: np.ndarray) -> np.ndarray:
        scores = np.concatenate([q @ data[s : s + SEARCH_CHUNK].astype(np.float32).T
                                 for s in range(0, len(data), SEARCH_CHUNK)], axis=1)[0]
        top = np.argpartition(-scores, 10)[:10]
        return top[np.argsort(-scores[top])]

    for rows in sorted({r for r in (5_000, 10_000, 20_000, 50_000, 100_000, len(data)) if r <= len(data)}):
        timed = queries[: n if rows <= 200_000 else min(n, 10)]  # a second or more each beyond
        p50, p99, _ = latency(lambda q, r=rows: exact(q) if r == len(data) else _exact_on(data[:r], q), timed)
        print(f"exact (numpy, float16 rows) over {rows:>9,} rows: p50 {p50:7.1f} ms, p99 {p99:7.1f} ms "
              f"({len(timed)} queries)")


def _exact_on(data: np.ndarray, q: np.ndarray) -> np.ndarray:
    scores = (q @ data.astype(np.float32).T)[0]
    return np.argpartition(-scores, 10)[:10]


def run_faiss(data: np.ndarray, queries: np.ndarray, truth: list[np.ndarray], probes: list[int]) -> None:
    import faiss

    from wanwu.ann import faiss_lists, nprobe_for

    rows, dim = data.shape
    lists = faiss_lists(rows)
    start, before = time.perf_counter(), rss_mb()
    ivf = faiss.index_factory(dim, f"IVF{lists},SQfp16", faiss.METRIC_INNER_PRODUCT)
    sample = data[np.random.default_rng(2).choice(rows, min(rows, lists * 40), replace=False)]
    ivf.train(sample.astype(np.float32))
    for s in range(0, rows, 100_000):
        ivf.add(data[s : s + 100_000].astype(np.float32))
    built = time.perf_counter() - start
    after = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "ann.faiss")
        faiss.write_index(ivf, path)
        freed = rss_mb()
        ivf = faiss.read_index(path, faiss.IO_FLAG_MMAP)
        print(f"faiss IVF-SQfp16 ({lists} lists): build {built:.0f}s, +{after - before:.0f} MiB resident when built; "
              f"memory-mapped from its file ({Path(path).stat().st_size / 2**20:.0f} MiB): "
              f"+{rss_mb() - freed:.0f} MiB on opening")
        chosen = nprobe_for(lists, rows)
        print(f"  (wanwu.ann probes {chosen} lists at this size; every setting is timed after one untimed pass "
              f"over the queries, as in a running server)")
        for nprobe in sorted({*probes, chosen}):
            faiss.extract_index_ivf(ivf).nprobe = nprobe
            latency(lambda q: ivf.search(q, 10), queries)
            p50, p99, found = latency(lambda q: ivf.search(q, 10)[1][0], queries)
            print(f"  nprobe {nprobe:3d}: p50 {p50:.1f} ms, p99 {p99:.1f} ms, {recalls(found, truth)}")
        print(f"  resident after the queries: +{rss_mb() - freed:.0f} MiB (file pages touched)")


def run_usearch(data: np.ndarray, queries: np.ndarray, truth: list[np.ndarray], efs: list[int],
                connectivity: int) -> None:
    from usearch.index import Index

    rows, dim = data.shape
    start, before = time.perf_counter(), rss_mb()
    hnsw = Index(ndim=dim, metric="ip", dtype="f16", connectivity=connectivity, expansion_add=128)
    hnsw.add(np.arange(rows), data, threads=0)
    built = time.perf_counter() - start
    print(f"usearch HNSW (f16, M={connectivity}, expansion_add 128): build {built:.0f}s, "
          f"+{rss_mb() - before:.0f} MiB resident")
    for ef in efs:
        hnsw.expansion_search = ef
        latency(lambda q: hnsw.search(q[0], 10), queries)
        p50, p99, found = latency(lambda q: hnsw.search(q[0], 10).keys, queries)
        print(f"  ef {ef:3d}: p50 {p50:.1f} ms, p99 {p99:.1f} ms, {recalls(found, truth)}")


def scale(args: argparse.Namespace) -> None:
    base = rss_mb()
    data = clustered(args.rows, args.dim)
    half = args.queries // 2
    queries = np.concatenate([clustered(half, args.dim, seed=1), clustered(half, args.dim, seed=1, centres_seed=1)])
    queries = queries.astype(np.float32)
    print(f"{args.rows} x {args.dim} rows ({data.nbytes / 2**20:.0f} MiB as float16); {2 * half} single queries: "
          f"half from the rows' mixture (as photos are), half from another (far from every row, as text queries "
          f"are from photos); {os.cpu_count()} cores")
    truth = exact_truth(data, queries)
    if args.exact_queries:
        run_exact(data, queries, args.exact_queries)
    if "faiss" not in args.skip:
        run_faiss(data, queries, truth, args.nprobe)
    if "usearch" not in args.skip:
        usearch_rows = min(args.rows, args.usearch_rows or args.rows)
        sub = data[:usearch_rows]
        sub_truth = truth if usearch_rows == args.rows else exact_truth(sub, queries)
        if usearch_rows != args.rows:
            print(f"usearch on the first {usearch_rows} rows:")
        run_usearch(sub, queries, sub_truth, args.ef, args.connectivity)
    print(f"peak RSS of the whole run: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base:.0f} MiB "
          f"above the start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    r = sub.add_parser("recall")
    r.add_argument("--queries", type=int, default=300)
    s = sub.add_parser("scale")
    s.add_argument("--rows", type=int, default=1_000_000)
    s.add_argument("--dim", type=int, default=512)
    s.add_argument("--queries", type=int, default=200)
    s.add_argument("--exact-queries", type=int, default=50, help="queries timed one by one on exact search")
    s.add_argument("--skip", action="append", default=[], choices=["faiss", "usearch"])
    s.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    s.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256, 512])
    s.add_argument("--connectivity", type=int, default=16)
    s.add_argument("--usearch-rows", type=int, default=None, help="build usearch on the first N rows only")
    args = parser.parse_args()
    if args.part == "recall":
        recall(args.queries)
    else:
        scale(args)


if __name__ == "__main__":
    main()
