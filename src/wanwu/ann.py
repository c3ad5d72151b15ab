"""An approximate nearest-neighbour (ANN) structure beside an image index: faiss IVF with float16 storage.

Chosen over usearch HNSW by ``benchmarks/bench_search.py scale`` (docs/search.md): on 200,000 rows and 2 cores
it built in 55 s against 632 s, and for queries far from every row it reached recall@10 0.95 where usearch
stayed at 0.83 for the same latency; its file is memory-mapped for search.

Files in the index folder (derived data, never trusted over the index's committed count):

- ``ann-N.faiss``: a faiss ``IVF…,SQfp16`` inner-product index over rows ``0 … N-1`` of ``vectors.f16``;
- ``ann.json``: which file is current, its row count and size, and a fingerprint of the rows it was built from.

A new file is written under a temporary name, fsynced and renamed, then ``ann.json`` is replaced atomically,
then older ``ann-*.faiss`` files are removed: a kill at any point leaves either the old pair or the new one.
A missing, truncated, corrupt or stale (fingerprint) file is rebuilt from the vectors, never an error. Rows
committed after the file was built are searched exactly by the caller and merged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from wanwu.paths import try_lock

log = logging.getLogger("wanwu")

ANN_FROM_ROWS = 10_000  # from this many rows on, search goes through the ANN (exact p99 reaches ~50 ms here)
SCAN_ROWS = 16_384  # rows a query scores: lists probed = SCAN_ROWS / the rows of a list (recall@10 >= 0.95)
MIN_NPROBE = 32
REBUILD_GROWTH = 4  # retrain the lists once the index holds this many times the rows they were trained on
ADD_CHUNK = 65_536  # rows converted to float32 and added at once: memory stays bounded
_told: set[str] = set()


def faiss_lists(rows: int) -> int:
    """Inverted lists for ``rows`` rows: about 4·√rows, with at least 39 training rows per list."""
    return max(1, min(int(4 * math.sqrt(rows)), rows // 39))


def nprobe_for(lists: int, rows: int) -> int:
    """Lists probed per query: enough for about :data:`SCAN_ROWS` rows (measured: recall@10 0.95 to 0.97 for
    queries far from every row, 1.0 for photo-like ones, at 200,000 and 1,000,000 rows)."""
    return min(lists, max(MIN_NPROBE, math.ceil(lists * SCAN_ROWS / max(rows, 1))))


def load_faiss() -> ModuleType | None:
    """faiss, or None (said once per process: search then stays exact)."""
    try:
        import faiss
    except ImportError:
        _tell_once("no-faiss", "faiss is not installed (pip install 'wanwu-vision[search]'): search is exact")
        return None
    return faiss


def _tell_once(key: str, message: str) -> None:
    if key not in _told:
        _told.add(key)
        log.warning(message)


@dataclass
class Ann:
    """An ANN over the first ``rows`` rows of an index."""

    index: Any  # a faiss index, memory-mapped from its file
    rows: int
    trained: int  # rows the lists were trained on

    def search(self, q: npt.NDArray[np.float32], k: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        scores, rows = self.index.search(np.ascontiguousarray(q, dtype=np.float32), min(k, self.rows))
        return scores, rows

    def pairs(self, q: npt.NDArray[np.float32], threshold: float) -> Iterator[tuple[int, int, float]]:
        """(query, row, score) for every row of the ANN that scores at least ``threshold`` with a query."""
        lims, scores, rows = self.index.range_search(np.ascontiguousarray(q, dtype=np.float32),
                                                     float(threshold) - 1e-6)
        for i in range(len(q)):
            for j in range(int(lims[i]), int(lims[i + 1])):
                if scores[j] >= threshold:
                    yield i, int(rows[j]), float(scores[j])


def fingerprint(vectors: npt.NDArray[np.float16], rows: int) -> str:
    """A digest of a few of the first ``rows`` rows: an ANN built from other vectors is told apart."""
    h = hashlib.sha256(str(rows).encode())
    for i in sorted({0, rows // 3, rows // 2, rows - 1}):
        h.update(np.asarray(vectors[i]).tobytes())
    return h.hexdigest()


def open_ann(folder: Path, vectors: npt.NDArray[np.float16], count: int) -> Ann | None:
    """The ANN in ``folder`` if it is whole and was built from these rows (at most ``count``), else None."""
    faiss = load_faiss()
    if faiss is None:
        return None
    try:
        meta = json.loads((folder / "ann.json").read_text(encoding="utf-8"))
        rows, name, size = int(meta["rows"]), str(meta["file"]), int(meta["size"])
        path = folder / name
        if "/" in name or not 0 < rows <= count or path.stat().st_size != size:
            raise ValueError(f"{name} does not match ann.json")
        if meta["fingerprint"] != fingerprint(vectors, rows):
            raise ValueError(f"{name} was built from other rows")
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        if index.ntotal != rows or index.d != vectors.shape[1]:
            raise ValueError(f"{name} holds {index.ntotal} {index.d}-d rows, ann.json says {rows}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        log.warning("%s: the ANN index is unusable (%s): it will be rebuilt", folder, e)
        return None
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = nprobe_for(ivf.nlist, rows)
    return Ann(index, rows, int(meta.get("trained", rows)))


def build_ann(folder: Path, vectors: npt.NDArray[np.float16], count: int, previous: Ann | None) -> Ann | None:
    """An ANN over the first ``count`` rows, saved in ``folder``: ``previous`` extended by the rows it lacks,
    or trained anew (no previous one, or the index has grown :data:`REBUILD_GROWTH` times since). None when
    another process is writing the ANN (the caller searches what it has)."""
    faiss = load_faiss()
    if faiss is None:
        return None
    try:
        # the ANN's own lock, not the index's: `wanwu index` may append meanwhile
        with try_lock(folder / ".ann.lock") as locked:
            if not locked:
                return None
            index, start, trained = _extendable(faiss, folder, previous, count)
            log.info("%s: %s the ANN index to %d rows", folder, "extending" if index is not None else "building",
                     count)
            if index is None:
                index, start, trained = _trained(faiss, vectors, count), 0, count
            for s in range(start, count, ADD_CHUNK):
                index.add(np.asarray(vectors[s : min(s + ADD_CHUNK, count)], dtype=np.float32))
            _save(faiss, folder, index, count, fingerprint(vectors, count), trained)
    except OSError as e:  # a folder this user cannot write: search what there is
        _tell_once(f"ann-write:{folder}", f"{folder}: cannot write the ANN index ({e})")
        return None
    log.info("%s: ANN index over %d rows written", folder, count)
    return open_ann(folder, vectors, count)


def _extendable(faiss: ModuleType, folder: Path, previous: Ann | None, count: int) -> tuple[Any, int, int]:
    """``previous``'s index read whole (to add to), its rows and trained rows; (None, 0, 0) to train anew."""
    if previous is None or count >= REBUILD_GROWTH * previous.trained:
        return None, 0, 0
    try:
        return faiss.read_index(str(folder / f"ann-{previous.rows}.faiss")), previous.rows, previous.trained
    except RuntimeError as e:
        log.warning("%s: cannot extend the ANN index (%s): it is rebuilt", folder, e)
        return None, 0, 0


def _trained(faiss: ModuleType, vectors: npt.NDArray[np.float16], count: int) -> Any:
    lists = faiss_lists(count)
    dim = vectors.shape[1]
    index = faiss.index_factory(dim, f"IVF{lists},SQfp16", faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(0).choice(count, min(count, lists * 40), replace=False))
    index.train(np.asarray(vectors[sample], dtype=np.float32))
    return index


def _save(faiss: ModuleType, folder: Path, index: Any, rows: int, check: str, trained: int) -> None:
    name = f"ann-{rows}.faiss"
    tmp = folder / f"{name}.{os.getpid()}.tmp"
    faiss.write_index(index, str(tmp))
    _fsync(tmp)
    os.replace(tmp, folder / name)
    meta = {"library": "faiss", "kind": "IVF,SQfp16", "rows": rows, "file": name,
            "size": (folder / name).stat().st_size, "fingerprint": check, "trained": trained}
    tmp_meta = folder / f"ann.json.{os.getpid()}.tmp"
    tmp_meta.write_text(json.dumps(meta), encoding="utf-8")
    _fsync(tmp_meta)
    os.replace(tmp_meta, folder / "ann.json")
    for old in [*folder.glob("ann-*.faiss*"), *folder.glob("ann.json.*.tmp")]:
        if old.name != name:
            with contextlib.suppress(OSError):
                old.unlink()


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


__all__ = ["ANN_FROM_ROWS", "Ann", "build_ann", "faiss_lists", "load_faiss", "nprobe_for", "open_ann"]
