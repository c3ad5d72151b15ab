"""Parquet output: a sink streamed in row groups, and ``--resume`` over what a killed run left.

Layout while a run is going: finished row groups are kept as small, complete Parquet files in a hidden
folder beside the output (``.out.parquet.parts/00000000.parquet`` …), each written to a temporary name and
renamed when whole. Only :meth:`ParquetSink.close` joins them, row group by row group, into the final file
(again through a temporary name and a rename) and removes the folder. So:

* memory stays bounded by one row group (``ROW_GROUP_SIZE`` records), whatever the run's size;
* a run killed at any moment (even SIGKILL) loses at most the records of the row group it was filling;
  every finished part is a valid Parquet file, and the final file is either absent, the old one, or whole;
* ``--resume`` reads the final file (if any) and the parts, skips their inputs, and the resumed run's
  close joins old and new into one file.

This was chosen over writing one ``ParquetWriter`` straight into the output: a killed writer leaves a file
without its footer, which no Parquet reader can open, so nothing of it could be resumed.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from wanwu.errors import MissingExtraError, UsageError
from wanwu.records import Record
from wanwu.sinks import meta_text

if TYPE_CHECKING:
    import pyarrow as pa

ROW_GROUP_SIZE = 2048


def require_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.parquet
    except ModuleNotFoundError:
        raise MissingExtraError("pyarrow", "parquet", "Parquet output") from None
    return pyarrow


def schema(meta: bool = False, embedding_dim: int | None = None) -> pa.Schema:
    """The record columns; ``meta``: plus a ``meta`` column (JSON text) for what rode along with each input;
    ``embedding_dim``: plus an ``embedding`` column, a fixed-size list of float32 (0: a list of any size, what
    the parts are written with until the size is known)."""
    pa = require_pyarrow()
    embedding = [] if embedding_dim is None else [
        ("embedding", pa.list_(pa.float32(), embedding_dim) if embedding_dim else pa.list_(pa.float32()))]
    prediction = pa.struct([("index", pa.int32()), ("label", pa.string()), ("score", pa.float64())])
    return pa.schema([
        ("input", pa.string()), ("status", pa.string()), ("predictions", pa.list_(prediction)),
        ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("error_type", pa.string()), ("error_message", pa.string()),
        *([("meta", pa.string())] if meta else []),
        *embedding,
    ])


def parts_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}.parts")


def _row(record: Record) -> dict[str, Any]:
    err = record.error
    return {
        "input": record.input, "status": record.status,
        "predictions": [p.to_dict() for p in record.predictions],
        "sha256": record.sha256, "width": record.width, "height": record.height,
        "error_type": err.type if err else None, "error_message": err.message if err else None,
        "meta": meta_text(record) if record.meta is not None else None,
        "embedding": None if record.embedding is None else record.embedding.tolist(),
    }


def _write_atomic(table: pa.Table, dest: Path) -> None:
    pq = require_pyarrow().parquet
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ParquetSink:
    """Writes to the file the CLI opened (its ``name``); needs a real file, not stdout."""

    def __init__(self, stream: TextIO, options: Any, row_group_size: int | None = None) -> None:
        name = getattr(stream, "name", None)
        if not isinstance(name, str) or name.startswith("<"):
            raise UsageError("parquet output needs --output FILE.parquet (it cannot stream to stdout)")
        self._pa = require_pyarrow()
        self.path = Path(name)
        self.parts = parts_dir(self.path)
        self.row_group_size = row_group_size or ROW_GROUP_SIZE
        self._meta = bool(getattr(options, "meta", False))
        self._embeddings = bool(getattr(options, "embeddings", False))
        self.schema = schema(self._meta, 0 if self._embeddings else None)
        self._rows: list[dict[str, Any]] = []
        if not options.append:
            shutil.rmtree(self.parts, ignore_errors=True)
        self.parts.mkdir(exist_ok=True)
        self._next = 1 + max((int(p.stem) for p in self.parts.glob("*.parquet") if p.stem.isdigit()), default=0)
        if options.append and self.path.exists() and self.path.stat().st_size > 0:
            # Resuming after a finished run: the old file becomes the first part (it sorts before all others).
            os.replace(self.path, self.parts / "00000000.parquet")

    def write(self, record: Record) -> None:
        self._rows.append(_row(record))
        if len(self._rows) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        table = self._pa.Table.from_pylist(self._rows, schema=self.schema)
        _write_atomic(table, self.parts / f"{self._next:08d}.parquet")
        self._next += 1
        self._rows = []

    def close(self) -> None:
        self._flush()
        pq = self._pa.parquet
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        parts = sorted(self.parts.glob("*.parquet"))
        final = schema(self._meta, _embedding_size(parts)) if self._embeddings else self.schema
        try:
            with pq.ParquetWriter(tmp, final) as writer:
                for part in parts:
                    pf = pq.ParquetFile(part)
                    for i in range(pf.num_row_groups):
                        writer.write_table(pf.read_row_group(i).cast(final))
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        shutil.rmtree(self.parts, ignore_errors=True)


def _embedding_size(parts: list[Path]) -> int:
    """The size of the embeddings in ``parts`` (the first one found; 0 when none has one)."""
    pq = require_pyarrow().parquet
    for part in parts:
        column = pq.read_table(part, columns=["embedding"]).column("embedding").drop_null()
        if len(column):
            return len(column[0])
    return 0


def _files(path: Path) -> list[Path]:
    files = [path] if path.exists() and path.stat().st_size > 0 else []
    parts = parts_dir(path)
    if parts.is_dir():
        for tmp in parts.glob(".*.tmp"):  # a part whose writer was killed before its rename
            tmp.unlink(missing_ok=True)
        files += sorted(parts.glob("*.parquet"))
    return files


def scan(path: Path, retry_errors: bool) -> tuple[Counter[str], int, int, int, bool]:
    """(done inputs, records kept, error records kept, error records removed, anything there) for resume.

    With ``retry_errors`` each file holding error records is rewritten without them (temporary file, rename).
    """
    pa = require_pyarrow()
    pq = pa.parquet
    done: Counter[str] = Counter()
    kept = errors_kept = errors_removed = 0
    files = _files(path)
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except (OSError, pa.ArrowInvalid) as e:
            raise UsageError(f"{file}: not a readable Parquet file ({e}); refusing to resume into it") from None
        if not {"input", "status"} <= set(pf.schema_arrow.names):
            raise UsageError(f"{file}: no input and status columns; not wanwu output, refusing to resume into it")
        removed_here = 0
        for batch in pf.iter_batches(columns=["input", "status"]):
            for inp, status in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                if status == "error" and retry_errors:
                    removed_here += 1
                    continue
                errors_kept += status == "error"
                kept += 1
                done[inp] += 1
        errors_removed += removed_here
        if removed_here:
            table = pq.read_table(file)
            _write_atomic(table.filter(pa.compute.not_equal(table["status"], "error")), file)
    return done, kept, errors_kept, errors_removed, bool(files)
