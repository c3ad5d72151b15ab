"""Output sinks: where records go. Registered by format name; each writes and flushes record by record.

* ``jsonl`` — one JSON object per line (the canonical format; ``--resume`` reads it back);
* ``json``  — the same objects in one array, streamed (``[`` first, ``]`` on close);
* ``csv``   — flattened columns ``label_1, index_1, score_1, …`` up to top-k, optional UTF-8 BOM for Excel;
  text cells that a spreadsheet would run as formulas are neutralised (:func:`csv_cell`);
* ``table`` — readable terminal lines.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TextIO

from wanwu.errors import UsageError
from wanwu.records import Record


@dataclass(frozen=True)
class SinkOptions:
    top_k: int = 5
    bom: bool = False  # csv: start with a UTF-8 BOM so Excel reads Chinese correctly
    append: bool = False  # resuming into an existing file: no header / BOM again


class Sink(Protocol):
    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


SinkFactory = Callable[[TextIO, SinkOptions], Sink]
SINKS: dict[str, SinkFactory] = {}


def register_sink(name: str) -> Callable[[SinkFactory], SinkFactory]:
    def wrap(factory: SinkFactory) -> SinkFactory:
        SINKS[name] = factory
        return factory

    return wrap


def create_sink(name: str, stream: TextIO, options: SinkOptions) -> Sink:
    try:
        factory = SINKS[name]
    except KeyError:
        raise UsageError(f"unknown format {name!r}; choose from {', '.join(SINKS)}") from None
    return factory(stream, options)


def dumps(record: Record) -> str:
    return json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":"))


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
            raise UsageError("--resume works with jsonl and csv output, not json")
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


def csv_header(top_k: int) -> list[str]:
    cols = ["input", "status", "sha256", "width", "height"]
    for i in range(1, top_k + 1):
        cols += [f"label_{i}", f"index_{i}", f"score_{i}"]
    return [*cols, "error_type", "error_message"]


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """OWASP's rule against CSV (formula) injection: a text cell that a spreadsheet would run as a formula
    (it starts with = + - @ tab or CR) gets a leading apostrophe. Numbers are left as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


@register_sink("csv")
class CsvSink:
    def __init__(self, stream: TextIO, options: SinkOptions) -> None:
        self.stream = stream
        self.top_k = options.top_k
        self.writer = csv.writer(stream, lineterminator="\n")
        if not options.append:
            if options.bom:
                stream.write("\ufeff")
            self.writer.writerow(csv_header(self.top_k))
            stream.flush()

    def write(self, record: Record) -> None:
        row: list[object] = [record.input, record.status, record.sha256 or "", record.width or "",
                             record.height or ""]
        for i in range(self.top_k):
            if i < len(record.predictions):
                p = record.predictions[i]
                row += [p.label, p.index, p.score]
            else:
                row += ["", "", ""]
        err = record.error
        row += [err.type if err else "", err.message if err else ""]
        self.writer.writerow([csv_cell(cell) for cell in row])
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


@register_sink("table")
class TableSink:
    """One readable line per record: ✓/✗, the input, then the top labels with percentages."""

    def __init__(self, stream: TextIO, options: SinkOptions) -> None:
        from rich.console import Console

        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.top_k = options.top_k

    def write(self, record: Record) -> None:
        from rich.markup import escape

        if record.ok:
            labels = "  ".join(
                f"[bold]{escape(p.label)}[/bold] [dim]{_fmt_score(p.score)}[/dim]" for p in record.predictions
            )
            self.console.print(f"[green]✓[/green] {escape(record.input)}  {labels}")
        else:
            err = record.error
            what = f"{err.type}: {err.message}" if err else "error"
            self.console.print(f"[red]✗[/red] {escape(record.input)}  [red]{escape(what)}[/red]")

    def close(self) -> None:
        self.console.file.flush()


def _fmt_score(score: float) -> str:
    return f"{score * 100:.1f}%" if 0.0 <= score <= 1.0 else f"{score:.2f}"
