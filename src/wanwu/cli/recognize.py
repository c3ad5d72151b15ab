"""``wanwu recognize``: inputs in, one record per input out, streamed."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import click

from wanwu.cli.options import backend_options, model_options, run_options
from wanwu.config import RecognizeOptions
from wanwu.pipeline import Recognizer
from wanwu.records import Record
from wanwu.sinks import SINKS, SinkOptions, create_sink
from wanwu.sources import count_items, expand


@click.command("recognize")
@click.argument("inputs", nargs=-1, required=True)
@model_options
@run_options
@click.option(
    "-f", "--format", "fmt", type=click.Choice(sorted(SINKS)), default=None,
    help="Output format (default: table on a terminal, else jsonl).",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write records here instead of stdout.")
@click.option("--bom", is_flag=True, help="csv: begin with a UTF-8 BOM (for Excel).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
def command(inputs: tuple[str, ...], fmt: str | None, output: Path | None, bom: bool, quiet: bool,
            **kw: Any) -> int:
    """Recognize INPUTS: files, folders (recursive), globs, http(s) URLs, or - for a list on stdin.

    Records come out in input order, one per input, as soon as each is ready.
    """
    options = _options(kw)
    fmt = fmt or ("table" if output is None and sys.stdout.isatty() else "jsonl")
    with ExitStack() as stack:
        stream: IO[str] = (
            stack.enter_context(output.open("w", encoding="utf-8", newline=""))
            if output is not None
            else sys.stdout
        )
        sink = create_sink(fmt, stream, SinkOptions(top_k=options.top_k, bom=bom))
        recognizer = stack.enter_context(Recognizer(kw["model"], labels=kw["labels"], options=options))
        items = expand(inputs)
        progress = _Progress(inputs, enabled=not quiet and sys.stderr.isatty())
        stack.callback(progress.stop)
        counts = {"ok": 0, "error": 0}
        start = time.perf_counter()
        try:
            for record in recognizer.recognize(items):
                sink.write(record)
                counts[record.status] += 1
                progress.advance(record)
        finally:
            sink.close()
            progress.stop()
            if not quiet:
                _summary(counts, time.perf_counter() - start)
    return 3 if counts["error"] else 0


def _options(kw: dict[str, Any]) -> RecognizeOptions:
    base = RecognizeOptions()
    return RecognizeOptions(
        top_k=kw["top_k"],
        score=kw["score"],
        threshold=kw["threshold"],
        batch_size=kw["batch_size"],
        workers=kw["workers"],
        max_pixels=kw["max_pixels"] or base.max_pixels,
        max_bytes=kw["max_bytes"] or base.max_bytes,
        fetch_timeout=kw["timeout"],
        cache=not kw["no_cache"],
        cache_path=kw["cache_path"],
        backend=backend_options(kw["device"], kw["threads"], kw["precision"], kw["int8"]),
    )


def _summary(counts: dict[str, int], elapsed: float) -> None:
    total = counts["ok"] + counts["error"]
    rate = total / elapsed if elapsed > 0 else 0.0
    failed = f", [red]{counts['error']} failed[/red]" if counts["error"] else ""
    from rich.console import Console

    Console(stderr=True, highlight=False).print(
        f"wanwu: {total} input(s): {counts['ok']} ok{failed} in {elapsed:.1f}s ({rate:.1f}/s)"
    )


class _Progress:
    """A rich progress bar on stderr; its total is counted in the background (never for stdin)."""

    def __init__(self, inputs: tuple[str, ...], enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._bar = Progress(
            TextColumn("[bold]识别中[/bold]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TextColumn("[red]{task.fields[failed]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
        )
        self._task = self._bar.add_task("recognize", total=None, rate="", failed="")
        self._bar.start()
        self._failed = 0
        self._start = time.perf_counter()
        self._done = 0
        threading.Thread(target=self._count, args=(inputs,), daemon=True).start()

    def _count(self, inputs: tuple[str, ...]) -> None:
        total = count_items(inputs)
        if total is not None and self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self, record: Record) -> None:
        if self._bar is None:
            return
        self._done += 1
        if not record.ok:
            self._failed += 1
        elapsed = time.perf_counter() - self._start
        self._bar.update(
            self._task, advance=1, rate=f"{self._done / elapsed:.1f} 张/秒" if elapsed > 0 else "",
            failed=f"{self._failed} 失败" if self._failed else "",
        )

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
