"""URL and path tables as input: ``.parquet``, ``.csv`` and ``.tsv`` files with one image per row.

img2dataset's input format: a column of URLs (``--url-column``, default ``url``), read row by row (Parquet a
record batch at a time, CSV/TSV as a stream), so a table of millions of rows is never held in memory. Each
row's cell is an http(s) URL (fetched with the usual guards), an ``s3://`` object or a local path, and gives
exactly one record, in row order; a row whose cell is empty gets an error record that names its row.
``--keep-columns a,b`` carries other columns into each record's ``meta`` (img2dataset's
``--save_additional_columns``). A table that cannot be read, or lacks a named column, is one error record.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import ExitStack
from typing import IO, Any

from wanwu.errors import MissingExtraError
from wanwu.sources import TABLE_SUFFIXES, InputItem, SourceOptions, is_url

SUFFIXES = TABLE_SUFFIXES
BATCH_ROWS = 4096


def is_table(arg: str) -> bool:
    return arg.lower().endswith(SUFFIXES)


def _open(path: str, stack: ExitStack) -> IO[bytes]:
    if path.lower().startswith("s3://"):
        from wanwu import objstore

        return stack.enter_context(objstore.filesystem().open(path[len("s3://"):], "rb"))
    return stack.enter_context(open(path, "rb"))


class _MissingColumn(Exception):
    pass


def _parquet_rows(stream: IO[bytes], columns: list[str]) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise MissingExtraError("pyarrow", "parquet", "Reading Parquet tables") from None
    table = pq.ParquetFile(stream)
    missing = [c for c in columns if c not in table.schema_arrow.names]
    if missing:
        raise _MissingColumn(f"no column {missing[0]!r} (it has {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        yield from batch.to_pylist()


def _text_rows(text: IO[str], columns: list[str], delimiter: str) -> Iterator[dict[str, Any]]:
    reader = csv.DictReader(text, delimiter=delimiter)
    names = reader.fieldnames or []
    missing = [c for c in columns if c not in names]
    if missing:
        raise _MissingColumn(f"no column {missing[0]!r} (it has {', '.join(names) or 'no header'})")
    for row in reader:
        yield {c: row.get(c) for c in columns}


def _item(value: Any, row: int, table: str) -> InputItem:
    text = "" if value is None else str(value).strip()
    if not text:
        return InputItem.failed(f"{table}#row{row}", f"row {row} has no URL or path", "not_found")
    if is_url(text):
        return InputItem(text, "url", text)
    if text.lower().startswith("s3://"):
        return InputItem(text, "object", text)
    return InputItem(text, "file", text)


def read_table(path: str, options: SourceOptions | None = None) -> Iterator[InputItem]:
    """One item per row, in row order (rows count from 1, after the header)."""
    options = options or SourceOptions()
    columns = list(dict.fromkeys([options.url_column, *options.keep_columns]))
    row = 0
    with ExitStack() as stack:
        try:
            stream = _open(path, stack)
            lower = path.lower()
            if lower.endswith((".parquet", ".pq")):
                rows = _parquet_rows(stream, columns)
            else:
                text = stack.enter_context(io.TextIOWrapper(stream, encoding="utf-8-sig", newline=""))
                rows = _text_rows(text, columns, "\t" if lower.endswith(".tsv") else ",")
            for values in rows:
                row += 1
                item = _item(values.get(options.url_column), row, path)
                if options.keep_columns:
                    item = item.with_meta({c: values.get(c) for c in options.keep_columns})
                yield item
        except FileNotFoundError:
            yield InputItem.failed(path, "no such table")
        except _MissingColumn as e:
            yield InputItem.failed(path, f"the table has {e}; name the URL column with --url-column", "unsupported")
        except (OSError, ValueError, csv.Error) as e:  # pyarrow's ArrowInvalid/ArrowIOError derive from these
            where = f"after row {row}" if row else "before its first row"
            yield InputItem.failed(path, f"cannot read the table ({where}): {e}", "decode_error")


class TableSource:
    """The ``table`` entry of :data:`wanwu.sources.SOURCES`."""

    name = "table"

    def claims(self, arg: str) -> bool:
        return is_table(arg)

    def expand(self, arg: str, options: SourceOptions | None = None) -> Iterator[InputItem]:
        return read_table(arg, options)


SOURCE = TableSource()
