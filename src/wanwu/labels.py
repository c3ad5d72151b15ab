"""Label files: one class per line, line i names class i.

Formats (picked by file name, registry below): plain text, ModelScope ``meta_info.txt`` (tab-separated, the
label in column 2) and ``label_mapping.txt`` (``index<TAB>label`` or plain). Labels may repeat; wanwu keys
everything by class index, never by name.

Tables: a ``.tsv`` or ``.csv`` file with a header row (e.g. ``index<TAB>wnid<TAB>zh<TAB>en``). The label is
the ``column`` asked for (``--label-column``), by default the first of ``zh``, ``label``, ``name`` present, else
the last column. An ``index`` column, when there is one, must number the rows 0..N-1 (in any order). A second
language rides along: an ``en`` column that is not the label column becomes each prediction's ``label_en``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wanwu.errors import ModelError, UsageError
from wanwu.registry import Registry

LabelParser = Callable[[list[str]], list[str]]


def _plain(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines]


def _meta_info(lines: list[str]) -> list[str]:
    out = []
    for n, line in enumerate(lines, 1):
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) < 2:
            raise ModelError(f"meta_info line {n}: expected at least 2 tab-separated columns: {line!r}")
        out.append(cols[1].strip())
    return out


def _tab_or_plain(lines: list[str]) -> list[str]:
    if all("\t" in line for line in lines):
        return [line.rstrip("\r\n").split("\t")[-1].strip() for line in lines]
    return _plain(lines)


# By file name; anything else is plain text. Third parties add parsers through the wanwu.label_parsers group.
LABEL_PARSERS: Registry[LabelParser] = Registry("label file format", group="wanwu.label_parsers")
LABEL_PARSERS.register("meta_info.txt", _meta_info)
LABEL_PARSERS.register("label_mapping.txt", _tab_or_plain)


TABLE_DELIMITERS = {".tsv": "\t", ".csv": ","}
DEFAULT_COLUMNS = ("zh", "label", "name")
SECOND_LANGUAGE = "en"  # carried along as each prediction's label_en when it is not the label column


@dataclass(frozen=True)
class LabelTable:
    """Labels (line i = class i) and, from a table with an ``en`` column beside the label, the English names."""

    labels: tuple[str, ...]
    english: tuple[str, ...] = ()


def is_table(path: Path) -> bool:
    return path.suffix.lower() in TABLE_DELIMITERS


def load_labels(path: Path) -> tuple[str, ...]:
    return load_label_table(path).labels


def load_label_table(path: Path, column: str | None = None) -> LabelTable:
    """Read a label file; ``column`` picks the label column of a ``.tsv``/``.csv`` table."""
    lines = _read_lines(path)
    if is_table(path):
        return _table(path, lines, column)
    if column is not None:
        raise UsageError(f"--label-column {column!r} needs a .tsv or .csv label file with a header, not {path.name}")
    parser = LABEL_PARSERS.get(path.name) if path.name in LABEL_PARSERS else _plain
    return LabelTable(tuple(parser(lines)))


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ModelError(f"label file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ModelError(f"label file {path} is not UTF-8: {e}") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ModelError(f"label file {path} is empty")
    return lines


def _table(path: Path, lines: list[str], column: str | None) -> LabelTable:
    rows = list(csv.reader(lines, delimiter=TABLE_DELIMITERS[path.suffix.lower()]))
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    if not body:
        raise ModelError(f"label table {path} has a header and no rows")
    if column is None:
        column = next((c for c in DEFAULT_COLUMNS if c in header), header[-1])
    elif column not in header:
        raise UsageError(f"label table {path} has no column {column!r}; its columns: {', '.join(header)}")
    for n, row in enumerate(body, 2):
        if len(row) != len(header):
            raise ModelError(f"label table {path} line {n}: {len(row)} columns, the header has {len(header)}")
    order = _row_order(path, header, body)
    second = SECOND_LANGUAGE if SECOND_LANGUAGE in header and column != SECOND_LANGUAGE else ""

    def values(name: str) -> tuple[str, ...]:
        i = header.index(name)
        return tuple(body[r][i].strip() for r in order)

    return LabelTable(values(column), values(second) if second else ())


def _row_order(path: Path, header: list[str], body: list[list[str]]) -> list[int]:
    """Rows by class: by the ``index`` column when there is one, else as written."""
    if "index" not in header:
        return list(range(len(body)))
    i = header.index("index")
    by_class: dict[int, int] = {}
    for r, row in enumerate(body):
        try:
            by_class[int(row[i])] = r
        except ValueError:
            raise ModelError(f"label table {path} line {r + 2}: index {row[i]!r} is not a number") from None
    if sorted(by_class) != list(range(len(body))):
        raise ModelError(f"label table {path}: the index column must number the {len(body)} rows 0..{len(body) - 1}"
                         " once each")
    return [by_class[c] for c in range(len(body))]
