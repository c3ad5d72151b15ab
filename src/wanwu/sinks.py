"""Output sinks: where records go. Registered by format name; each writes and flushes record by record.

* ``jsonl`` — one JSON object per line (the canonical format; ``--resume`` reads it back);
* ``json``  — the same objects in one array, streamed (``[`` first, ``]`` on close);
* ``csv``   — flattened columns ``label_1, index_1, score_1, …`` up to top-k, optional UTF-8 BOM for Excel;
  text cells that a spreadsheet would run as formulas are neutralised (:func:`csv_cell`);
* ``table`` — a terminal table (rich): aligned columns that never wrap inside a cell, printed through the
  progress bar's console when there is one, so rows appear above the bar.
* ``parquet`` — columns with predictions as a list of structs, in row groups (see :mod:`wanwu.parquet`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from wanwu.errors import UsageError
from wanwu.records import Prediction, Record
from wanwu.registry import Registry


@dataclass(frozen=True)
class SinkOptions:
    top_k: int = 5
    bom: bool = False  # csv: start with a UTF-8 BOM so Excel reads Chinese correctly
    append: bool = False  # resuming into an existing file: no header / BOM again
    english: bool = False  # csv: label_en_i columns (the label file has English names)
    console: Any = None  # table: print through this rich Console (the one a live progress bar draws on)
    meta: bool = False  # csv, parquet: a ``meta`` column (JSON text) for what rode along with each input
    embeddings: bool = False  # parquet: an ``embedding`` column (a fixed-size list of float32)


class Sink(Protocol):
    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


SinkFactory = Callable[[TextIO, SinkOptions], Sink]
SINKS: Registry[SinkFactory] = Registry("format", group="wanwu.sinks")  # third parties: entry points
SINKS.lazy("parquet", "wanwu.parquet:ParquetSink", extra="parquet")
register_sink = SINKS.register


def create_sink(name: str, stream: TextIO, options: SinkOptions) -> Sink:
    return SINKS.get(name)(stream, options)


class DeferredFlush:
    """A text stream whose ``flush()`` waits for :meth:`flush_now`: a sink that flushes after every record then
    costs one write per burst of records, not one per record. The caller flushes whenever no further record is
    ready at once, so a reader of the output never waits for a record that is done."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.write = stream.write

    def flush(self) -> None:
        pass

    def flush_now(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def dumps(record: Record) -> str:
    """The record as one compact JSON object: ``json.dumps(record.to_dict(), ensure_ascii=False)`` exactly,
    written out directly for an ``ok`` record (a rerun answered from the cache writes tens of thousands a
    second, and the generic encoder would be a third of its time)."""
    predictions = record.predictions
    scores = [repr(p.score) for p in predictions]
    if record.status != "ok" or record.meta is not None or record.embedding is not None or "n" in "".join(scores):
        # an error, what rode along with the input, an embedding, or a score of nan/inf (JSON: NaN, Infinity)
        return json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":"))
    heads, text = _HEADS, _text
    body = ",".join([
        (heads.get((p.index, p.label, p.label_en)) or _head(p)) + score + "}"
        for p, score in zip(predictions, scores, strict=True)
    ])
    sha, width, height = record.sha256, record.width, record.height
    out = (
        f'{{"input":{text(record.input)},"status":"ok","predictions":[{body}],'
        f'"sha256":{"null" if sha is None else text(sha)},"width":{"null" if width is None else repr(int(width))},'
        f'"height":{"null" if height is None else repr(int(height))}'
    )
    if record.warnings:
        return out + ',"warnings":[' + ",".join([text(w) for w in record.warnings]) + "]}"
    return out + "}"


_text = json.encoder.encode_basestring  # what json.dumps(..., ensure_ascii=False) writes a str as
# A prediction's JSON up to its score, by (index, label, English label): a model has a few thousand labels, and
# a run writes each of them many times. Bounded, for a process that runs many models in turn.
_HEADS: dict[tuple[int, str, str | None], str] = {}
_MAX_HEADS = 1 << 17


def _head(p: Prediction) -> str:
    text = _text
    head = (f'{{"index":{int(p.index)!r},"label":{text(p.label)},"score":' if p.label_en is None else
            f'{{"index":{int(p.index)!r},"label":{text(p.label)},"label_en":{text(p.label_en)},"score":')
    if len(_HEADS) >= _MAX_HEADS:
        _HEADS.clear()
    _HEADS[(p.index, p.label, p.label_en)] = head
    return head


@register_sink("jsonl")
class JsonlSink:
    def __init__(self, stream: TextIO, options: SinkOptions) -> None:
        self.stream = stream

    def write(self, record: Record) -> None:
        self.stream.write(dumps(record) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


@register_sink("json")
class JsonSink:
    def __init__(self, stream: TextIO, options: SinkOptions) -> None:
        if options.append:
            raise UsageError("--resume works with jsonl, csv and parquet output, not json")
        self.stream = stream
        self.count = 0
        self.stream.write("[")

    def write(self, record: Record) -> None:
        self.stream.write(("," if self.count else "") + "\n" + dumps(record))
        self.stream.flush()
        self.count += 1

    def close(self) -> None:
        self.stream.write("\n]\n" if self.count else "]\n")
        self.stream.flush()


def csv_header(top_k: int, english: bool = False, meta: bool = False) -> list[str]:
    cols = ["input", "status", "sha256", "width", "height"]
    for i in range(1, top_k + 1):
        cols += [f"label_{i}", *([f"label_en_{i}"] if english else []), f"index_{i}", f"score_{i}"]
    return [*cols, "error_type", "error_message", *(["meta"] if meta else [])]


def meta_text(record: Record) -> str:
    """A record's ``meta`` as one JSON text cell ("" when it has none)."""
    return "" if record.meta is None else json.dumps(record.meta, ensure_ascii=False, separators=(",", ":"))


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_LINE_BREAK_FORMULA = re.compile(r"([\r\n])(?=[=+\-@\t\r])")


def csv_cell(value: object) -> object:
    """OWASP's rule against CSV (formula) injection: a text cell that a spreadsheet would run as a formula
    (it starts with = + - @ tab or CR) gets a leading apostrophe, and so does every line of it that would
    start like one after a line break (CR or LF). Numbers are left as they are."""
    if not isinstance(value, str):
        return value
    if "\r" in value or "\n" in value:
        value = _LINE_BREAK_FORMULA.sub(r"\1'", value)
    if value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


@register_sink("csv")
class CsvSink:
    """Rows end with LF; a cell holding a CR or an LF is quoted (the csv module quotes only the characters of
    its line terminator, so rows are formatted with CRLF ones and each row's terminator is swapped for LF)."""

    def __init__(self, stream: TextIO, options: SinkOptions) -> None:
        self.stream = stream
        self.top_k = options.top_k
        self.english = options.english
        self.meta = options.meta
        self.buffer = io.StringIO()
        self.writer = csv.writer(self.buffer, lineterminator="\r\n")
        if not options.append:
            if options.bom:
                stream.write("\ufeff")
            self._write_row(csv_header(self.top_k, self.english, self.meta))
            stream.flush()

    def _write_row(self, row: Sequence[object]) -> None:
        self.buffer.seek(0)
        self.buffer.truncate()
        self.writer.writerow(row)
        self.stream.write(self.buffer.getvalue()[:-2] + "\n")

    def write(self, record: Record) -> None:
        row: list[object] = [record.input, record.status, record.sha256 or "", record.width or "",
                             record.height or ""]
        for i in range(self.top_k):
            if i < len(record.predictions):
                p = record.predictions[i]
                row += [p.label, *([p.label_en or ""] if self.english else []), p.index, p.score]
            else:
                row += [""] * (4 if self.english else 3)
        err = record.error
        row += [err.type if err else "", err.message if err else ""]
        if self.meta:
            row.append(meta_text(record))
        self._write_row([csv_cell(cell) for cell in row])
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


@register_sink("table")
class TableSink:
    """A rich table streamed row by row: status, input (its tail when long), top label, score, the others.

    Column widths are fixed from the console width at the start, so the rows of separate prints line up;
    every cell is one line, cut with an ellipsis rather than wrapped.
    """

    LABEL, SCORE = 16, 6

    def __init__(self, stream: TextIO, options: SinkOptions) -> None:
        from rich.console import Console

        from wanwu.cli.messages import t

        self.console = options.console or Console(file=stream, highlight=False)
        self.headings = (t("table.input"), t("table.label"), t("table.score"), t("table.more"))
        rest = max(24, self.console.width - 1 - self.LABEL - self.SCORE - 8)  # 8: padding between 5 columns
        self.input_width = rest // 2
        self.more_width = rest - self.input_width
        self.first = True

    def write(self, record: Record) -> None:
        from rich.table import Table

        table = Table(box=None, show_header=self.first, pad_edge=False, padding=(0, 1), header_style="bold")
        for heading, width, justify in (("", 1, "left"), (self.headings[0], self.input_width, "left"),
                                        (self.headings[1], self.LABEL, "left"),
                                        (self.headings[2], self.SCORE, "right"),
                                        (self.headings[3], self.more_width, "left")):
            table.add_column(heading, width=width, min_width=width, max_width=width, no_wrap=True,
                             overflow="ellipsis", justify=justify)  # type: ignore[arg-type]
        name = _tail(visible(record.input), self.input_width)
        if record.ok:
            preds = record.predictions
            more = visible("  ".join(f"{p.label} {_fmt_score(p.score)}" for p in preds[1:]))
            table.add_row("[green]✓[/green]", _escape(name), _escape(visible(preds[0].label)) if preds else "",
                          _fmt_score(preds[0].score) if preds else "", f"[dim]{_escape(more)}[/dim]")
        else:
            err = record.error
            table.add_row("[red]✗[/red]", _escape(name), f"[red]{err.type if err else 'error'}[/red]", "",
                          f"[red]{_escape(visible(err.message) if err else '')}[/red]")
        self.console.print(table)
        self.first = False

    def close(self) -> None:
        self.console.file.flush()


# Characters a terminal acts on rather than shows: C0/C1 controls (ESC starts colour, cursor and title
# sequences), DEL, and the bidirectional overrides that reorder what follows them.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """``text`` with every character a terminal would act on shown as an escape (``\\x1b``, ``\\u202e``)."""
    if text.isprintable():
        return text
    return _INVISIBLE.sub(lambda m: (f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                     else f"\\u{ord(m.group()):04x}"), text)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _tail(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal cells from the left ("…" + its end): a path's file name matters most."""
    from rich.cells import cell_len

    if cell_len(text) <= width:
        return text
    out = ""
    for ch in reversed(text):
        if cell_len(ch + out) > width - 1:
            break
        out = ch + out
    return "…" + out


def _fmt_score(score: float) -> str:
    return f"{score * 100:.1f}%" if 0.0 <= score <= 1.0 else f"{score:.2f}"


SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
                  ".pq": "parquet"}


def format_for_path(path: Path) -> str:
    """The output format an output file's suffix names; an unknown suffix is a usage error."""
    try:
        return SUFFIX_FORMATS[path.suffix.lower()]
    except KeyError:
        known = ", ".join(sorted(SUFFIX_FORMATS))
        raise UsageError(
            f"cannot tell the output format from {path.name!r}: use a suffix {known}, or name it with --format "
            f"({', '.join(f for f in SINKS.names() if f != 'table')})"
        ) from None
