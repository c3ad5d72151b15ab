"""An image index on disk: L2-normalised float16 rows, memory-mapped, with one metadata line per row.

A folder holds ``index.json`` (what made it: the model's cache namespace, which names the weights and the
preprocessing; the embedding's size; how many rows are committed and how many bytes of metadata they take),
``vectors.f16`` (the rows, ``count * dim`` float16) and ``rows.jsonl`` (per row: input, sha256, top labels).

Adding is append-then-commit: rows are appended to both data files and flushed, then ``index.json`` is
replaced atomically with the new counts. A run killed midway leaves bytes past the committed counts, which
every reader ignores and the next writer cuts off: the index is always the last committed one. A folder
without ``index.json``, with one of another kind, or with data files shorter than it says is refused with
:class:`~wanwu.errors.IndexFolderError`, never rebuilt. One writer at a time (an exclusive lock on the folder).

From :data:`~wanwu.ann.ANN_FROM_ROWS` rows on, search goes through an ANN structure kept beside the rows
(:mod:`wanwu.ann`: derived data, rebuilt when missing or unusable); rows committed after it was built are
searched exactly and merged. ``exact=True`` (``--exact``), or no faiss installed, keeps every search exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wanwu import ann as ann_files
from wanwu.ann import Ann
from wanwu.errors import IndexFolderError
from wanwu.paths import try_lock

FORMAT = "wanwu-index"
VERSION = 1
SEARCH_CHUNK = 65536  # rows scored at once: memory stays bounded whatever the index's size
ANN_TAIL_ROWS = 2_500  # rows past the ANN's that search scores exactly before it extends the ANN


@dataclass(frozen=True, slots=True)
class IndexRow:
    input: str
    sha256: str
    labels: tuple[str, ...] = ()

    def to_json(self) -> str:
        # ASCII escapes: a file name that is not UTF-8 (surrogate escapes) still makes valid JSON
        return json.dumps({"input": self.input, "sha256": self.sha256, "labels": list(self.labels)})


@dataclass(frozen=True, slots=True)
class Hit:
    row: int
    score: float


class ImageIndex:
    """One index folder, opened for reading (and, through :meth:`add`, appending)."""

    def __init__(self, folder: Path, header: dict[str, Any], exact: bool = False) -> None:
        self.folder = folder
        self.exact = exact  # every search exact, whatever the size (``--exact``)
        self.header = header
        self.model: str = header["model"]
        self.dim: int = int(header["dim"])
        self.count: int = int(header["count"])
        self.rows: list[IndexRow] = _read_rows(folder / "rows.jsonl", self.count, int(header["rows_bytes"]))
        self._shas = {row.sha256 for row in self.rows}
        self._by_sha: dict[str, IndexRow] | None = None
        self._vectors = self._map()
        self._ann: Ann | None = None
        self._ann_state = "unopened"  # "unopened", "opened", "unavailable" (no faiss)
        self._ann_guard = threading.Lock()

    # -- opening ------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: Path | str, model: str | None = None, *, exact: bool = False) -> ImageIndex:
        """The committed index in ``folder``; ``model``: refuse an index another model (or preprocessing)
        made; ``exact``: never search through the ANN."""
        folder = Path(folder)
        header = _read_header(folder)
        if model is not None and header["model"] != model:
            raise IndexFolderError(
                f"{folder} was made by another model or preprocessing ({header['model']}), not {model}"
            )
        return cls(folder, header, exact)

    @classmethod
    def open_or_create(cls, folder: Path | str, model: str, dim: int, info: dict[str, Any]) -> ImageIndex:
        """Open the index in ``folder``, or make an empty one there if the folder is new or empty."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise IndexFolderError(f"{folder} is not a folder")
        if not (folder / "index.json").exists() and (not folder.exists() or not any(folder.iterdir())):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "vectors.f16").touch()
            (folder / "rows.jsonl").touch()
            header = {"format": FORMAT, "version": VERSION, "model": model, "dim": dim, "count": 0,
                      "rows_bytes": 0, **info}
            _write_header(folder, header)
        index = cls.open(folder, model)
        if index.dim != dim:
            raise IndexFolderError(f"{folder} holds {index.dim}-d rows, this model gives {dim}-d embeddings")
        return index

    def _map(self) -> npt.NDArray[np.float16]:
        path = self.folder / "vectors.f16"
        need = self.count * self.dim * 2
        size = path.stat().st_size if path.exists() else -1
        if size < need:
            raise IndexFolderError(f"{self.folder}: vectors.f16 holds {max(size, 0)} bytes, the index needs {need}")
        if self.count == 0:
            return np.zeros((0, self.dim), dtype=np.float16)
        return np.memmap(path, dtype=np.float16, mode="r", shape=(self.count, self.dim))

    # -- reading ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.count

    def __contains__(self, sha256: object) -> bool:
        return sha256 in self._shas

    def row_of(self, sha256: str) -> IndexRow | None:
        """The first row whose content has this sha256, or None."""
        if self._by_sha is None:
            self._by_sha = {}
            for row in self.rows:
                self._by_sha.setdefault(row.sha256, row)
        return self._by_sha.get(sha256)

    @property
    def vectors(self) -> npt.NDArray[np.float16]:
        """[count, dim] float16, memory-mapped (read-only)."""
        return self._vectors

    def search(
        self, queries: npt.NDArray[np.float32], k: int = 10, threshold: float | None = None,
        exact: bool | None = None,
    ) -> list[list[Hit]]:
        """Cosine search: the ``k`` best rows for each normalised query, best first (ties by row). Exact below
        :data:`~wanwu.ann.ANN_FROM_ROWS` rows or with ``exact`` (default: the index's ``exact``), else the ANN
        over the rows it holds merged with the exact scores of the rows past them."""
        q = np.asarray(queries, dtype=np.float32).reshape(len(queries), -1)
        if q.shape[1] != self.dim:
            raise IndexFolderError(f"queries are {q.shape[1]}-d, the index holds {self.dim}-d rows")
        ann = None if (self.exact if exact is None else exact) else self.ann()
        best_scores, best_rows = self._exact_top(q, k, ann.rows if ann else 0)
        if ann is not None:
            scores, rows = ann.search(q, k)
            best_scores = np.concatenate([np.where(rows >= 0, scores, -np.inf), best_scores], axis=1)
            best_rows = np.concatenate([rows, best_rows], axis=1)
        out = []
        for scores, rows in zip(best_scores, best_rows, strict=True):
            order = np.lexsort((rows, -scores))[:k]
            hits = [Hit(int(rows[i]), float(scores[i])) for i in order if rows[i] >= 0]
            out.append([h for h in hits if threshold is None or h.score >= threshold])
        return out

    def _exact_top(
        self, q: npt.NDArray[np.float32], k: int, first: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The ``k`` best of rows ``first …`` for each query (unordered)."""
        best_scores = np.full((len(q), 0), -np.inf, dtype=np.float32)
        best_rows = np.zeros((len(q), 0), dtype=np.int64)
        for start, scores in self._scored(q, first):
            rows = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
            best_scores = np.concatenate([best_scores, scores], axis=1)
            best_rows = np.concatenate([best_rows, rows], axis=1)
            if best_scores.shape[1] > k:
                keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
                best_scores = np.take_along_axis(best_scores, keep, axis=1)
                best_rows = np.take_along_axis(best_rows, keep, axis=1)
        return best_scores, best_rows

    def _scored(self, q: npt.NDArray[np.float32], first: int = 0) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
        for start in range(first, self.count, SEARCH_CHUNK):
            block = np.asarray(self._vectors[start : start + SEARCH_CHUNK], dtype=np.float32)
            yield start, q @ block.T

    def ann(self, tail: int = ANN_TAIL_ROWS) -> Ann | None:
        """The ANN to search with (None below :data:`~wanwu.ann.ANN_FROM_ROWS` rows or without faiss): the
        one in the folder, built when missing or unusable, extended when more than ``tail`` rows lack from it."""
        if self.count < ann_files.ANN_FROM_ROWS or self._ann_state == "unavailable":
            return None
        with self._ann_guard:
            if self._ann_state == "unopened":
                if ann_files.load_faiss() is None:
                    self._ann_state = "unavailable"
                    return None
                self._ann = ann_files.open_ann(self.folder, self._vectors, self.count)
                self._ann_state = "opened"
            if self._ann is None or self.count - self._ann.rows > tail:
                self._ann = ann_files.build_ann(self.folder, self._vectors, self.count, self._ann) or self._ann
            return self._ann

    def duplicates(self, threshold: float, exact: bool | None = None) -> list[list[int]]:
        """Groups of rows (two or more) linked by cosine >= ``threshold``, each in row order (pairs found
        through the ANN, as :meth:`search` does, unless ``exact``)."""
        parent = list(range(self.count))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, j in self._linked(threshold, exact):
            if i != j:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
        groups: dict[int, list[int]] = {}
        for i in range(self.count):
            groups.setdefault(find(i), []).append(i)
        return [g for g in groups.values() if len(g) > 1]

    def _linked(self, threshold: float, exact: bool | None) -> Iterator[tuple[int, int]]:
        """Pairs of rows with cosine >= ``threshold``: the ANN's rows by its range search, the rest exactly."""
        ann = None if (self.exact if exact is None else exact) else self.ann()
        covered, step = (ann.rows if ann else 0), 4096
        if ann is not None:
            for start in range(0, covered, step):
                q = np.asarray(self._vectors[start : min(start + step, covered)], dtype=np.float32)
                for a, j, _ in ann.pairs(q, threshold):
                    yield start + a, j
        for start in range(covered, self.count, step):
            q = np.asarray(self._vectors[start : start + step], dtype=np.float32)
            for offset, scores in self._scored(q):
                for a, b in np.argwhere(scores >= threshold):
                    yield start + int(a), offset + int(b)

    # -- writing ------------------------------------------------------------------------------------------

    def add(self, rows: list[IndexRow], vectors: npt.NDArray[np.float32]) -> int:
        """Append ``rows`` (those whose content is not in the index yet) and commit; returns how many."""
        keep, seen = [], set(self._shas)
        for i, row in enumerate(rows):
            if row.sha256 not in seen:
                seen.add(row.sha256)
                keep.append(i)
        if not keep:
            return 0
        block = np.asarray(vectors, dtype=np.float32)[keep].astype(np.float16)
        if block.shape[1] != self.dim:
            raise IndexFolderError(f"rows are {block.shape[1]}-d, the index holds {self.dim}-d rows")
        lines = "".join(rows[i].to_json() + "\n" for i in keep).encode()
        with _locked(self.folder):
            header = _read_header(self.folder)
            if header["count"] != self.count:
                raise IndexFolderError(f"{self.folder} was changed by another writer meanwhile")
            rows_bytes = int(header["rows_bytes"])
            _append(self.folder / "vectors.f16", self.count * self.dim * 2, block.tobytes())
            _append(self.folder / "rows.jsonl", rows_bytes, lines)
            header.update(count=self.count + len(keep), rows_bytes=rows_bytes + len(lines))
            _write_header(self.folder, header)
        self.header = header
        self.count = header["count"]
        for i in keep:
            self.rows.append(rows[i])
            self._shas.add(rows[i].sha256)
        self._vectors = self._map()
        return len(keep)


def _read_header(folder: Path) -> dict[str, Any]:
    path = folder / "index.json"
    if not folder.is_dir():
        raise IndexFolderError(f"no index at {folder} (make one with `wanwu index {folder} INPUTS…`)")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFolderError(f"{folder} is not a wanwu index (no index.json): half-written or foreign") from None
    except (OSError, ValueError) as e:
        raise IndexFolderError(f"{folder}: cannot read index.json: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise IndexFolderError(f"{folder} is not a wanwu index (index.json of another kind)")
    if header.get("version") != VERSION:
        raise IndexFolderError(f"{folder}: index version {header.get('version')} is not supported")
    for key in ("model", "dim", "count", "rows_bytes"):
        if key not in header:
            raise IndexFolderError(f"{folder}: index.json lacks {key!r}")
    return header


def _write_header(folder: Path, header: dict[str, Any]) -> None:
    tmp = folder / f"index.json.{os.getpid()}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(header, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / "index.json")


def _append(path: Path, committed: int, data: bytes) -> None:
    """Cut ``path`` back to its committed size (a killed writer's leftovers), append, flush to disk."""
    with path.open("r+b") as f:
        f.truncate(committed)
        f.seek(committed)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_rows(path: Path, count: int, size: int) -> list[IndexRow]:
    try:
        with path.open("rb") as f:
            data = f.read(size)
    except OSError as e:
        raise IndexFolderError(f"cannot read {path}: {e}") from None
    lines = data.decode("utf-8").splitlines()
    if len(data) < size or len(lines) != count:
        raise IndexFolderError(f"{path} holds fewer rows than index.json says ({len(lines)} of {count})")
    rows = []
    for line in lines:
        item = json.loads(line)
        rows.append(IndexRow(item["input"], item["sha256"], tuple(item.get("labels") or ())))
    return rows


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with try_lock(folder / ".lock") as held:
        if not held:
            raise IndexFolderError(f"{folder} is being written by another process")
        yield
