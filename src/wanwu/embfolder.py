"""``wanwu recognize --embeddings-dir DIR``: embeddings in clip-retrieval's layout, so its ``index`` (autofaiss)
can take wanwu's output as it takes its own ``inference``'s.

``DIR/img_emb/img_emb_N.npy`` holds float16 rows (L2-normalised) and ``DIR/metadata/metadata_N.parquet`` one
row per embedding in the same order: ``image_path`` (the record's input), ``sha256``, ``labels`` (the top labels).
Only records with an embedding are written (an error record has none). A part holds at most
:data:`PART_ROWS` rows, so memory stays bounded; each file is written under a temporary name and renamed when
whole, the metadata first. A later run into the same folder starts at the next free ``N`` and never rewrites a
part.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wanwu.errors import UsageError
from wanwu.parquet import require_pyarrow
from wanwu.records import Record

PART_ROWS = 100_000  # rows per part (1280-d: 256 MB of float16 at most held)
_PART = re.compile(r"img_emb_(\d+)\.npy$")


class EmbeddingFolder:
    """Appends records' embeddings to ``folder`` in clip-retrieval's layout; :meth:`close` writes the last part."""

    def __init__(self, folder: Path, part_rows: int = PART_ROWS) -> None:
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--embeddings-dir {folder}: not a folder")
        self._pa = require_pyarrow()
        self.folder = folder
        self.part_rows = part_rows
        (folder / "img_emb").mkdir(parents=True, exist_ok=True)
        (folder / "metadata").mkdir(parents=True, exist_ok=True)
        found = [int(m.group(1)) for p in (folder / "img_emb").iterdir() if (m := _PART.match(p.name))]
        self._next = max(found, default=-1) + 1
        self._rows: list[dict[str, Any]] = []
        self._vectors: list[npt.NDArray[np.float32]] = []
        self.written = 0

    def write(self, record: Record) -> None:
        if record.embedding is None:
            return
        if self._vectors and len(record.embedding) != len(self._vectors[0]):
            raise UsageError(f"embeddings of {len(record.embedding)} and {len(self._vectors[0])} values in one run")
        self._rows.append({"image_path": record.input, "sha256": record.sha256,
                           "labels": [p.label for p in record.predictions]})
        self._vectors.append(record.embedding)
        if len(self._rows) >= self.part_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        pa = self._pa
        n = self._next
        table = pa.Table.from_pylist(self._rows, schema=pa.schema(
            [("image_path", pa.string()), ("sha256", pa.string()), ("labels", pa.list_(pa.string()))]))
        meta = self.folder / "metadata" / f"metadata_{n}.parquet"
        emb = self.folder / "img_emb" / f"img_emb_{n}.npy"
        _atomic(meta, lambda tmp: pa.parquet.write_table(table, tmp))
        _atomic(emb, lambda tmp: np.save(tmp, np.stack(self._vectors).astype(np.float16), allow_pickle=False))
        self.written += len(self._rows)
        self._next += 1
        self._rows, self._vectors = [], []

    def close(self) -> None:
        self._flush()


def _atomic(dest: Path, write: Any) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
