"""``wanwu recognize``: inputs in, one record per input out, streamed."""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

import click

from wanwu.cli.options import model_options, recognize_options, run_options, runner_options
from wanwu.config import RecognizeOptions
from wanwu.errors import UsageError
from wanwu.records import Record
from wanwu.resume import ResumeState, prepare_resume, resumable_formats
from wanwu.runners import RunnerConfig, create_runner
from wanwu.sinks import SINKS, SinkOptions, create_sink
from wanwu.sources import count_items, expand

log = logging.getLogger("wanwu")

@click.command("recognize")
@click.argument("inputs", nargs=-1, required=True)
@model_options
@run_options
@runner_options
@click.option(
    "-f", "--format", "fmt", type=click.Choice(sorted(SINKS)), default=None,
    help="Output format (default: from --output's suffix .csv/.json/.jsonl, else table on a terminal, "
    "else jsonl).",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write records here instead of stdout.")
@click.option("--bom", is_flag=True, help="csv: begin with a UTF-8 BOM (for Excel).")
@click.option(
    "--resume", is_flag=True,
    help="Continue into an existing --output (jsonl or csv): skip the inputs it already records and "
    "append the rest; a torn last line left by a killed run is repaired.",
)
@click.option(
    "--retry-errors", is_flag=True,
    help="With --resume (implied): also redo the inputs recorded as errors, replacing their records.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
def command(inputs: tuple[str, ...], fmt: str | None, output: Path | None, bom: bool, resume: bool,
            retry_errors: bool, quiet: bool, **kw: Any) -> int:
    """Recognize INPUTS: files, folders (recursive), globs, http(s) URLs, or - for a list on stdin.

    Records come out in input order, one per input, as soon as each is ready. Rerun with --resume and
    the same INPUTS to finish an interrupted run.
    """
    options = _options(kw)
    fmt = fmt or _default_format(output)
    state = _resume_state(output, fmt, options.top_k, retry_errors) if resume or retry_errors else None
    with ExitStack() as stack:
        stream: TextIO = (
            stack.enter_context(output.open("a" if state else "w", encoding="utf-8", newline=""))
            if output is not None
            else sys.stdout
        )
        sink_options = SinkOptions(top_k=options.top_k, bom=bom, append=state is not None and state.exists)
        sink = create_sink(fmt, stream, sink_options)
        runner_config = RunnerConfig(kw["model"], kw["labels"], options, kw["ray_address"])
        recognizer = stack.enter_context(create_runner(kw["runner"], runner_config))
        items = expand(inputs) if state is None else state.pending(expand(inputs))
        progress = _Progress(inputs, enabled=not quiet and sys.stderr.isatty(), state=state)
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
                _summary(counts, time.perf_counter() - start, state)
    return 3 if counts["error"] or (state is not None and state.errors_kept) else 0


_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}


def _default_format(output: Path | None) -> str:
    """By the output file's suffix; else jsonl, or a table when writing to a terminal."""
    if output is not None:
        return _SUFFIX_FORMATS.get(output.suffix.lower(), "jsonl")
    return "table" if sys.stdout.isatty() else "jsonl"


def _resume_state(output: Path | None, fmt: str, top_k: int, retry_errors: bool) -> ResumeState:
    if output is None:
        raise UsageError("--resume needs --output FILE (the file of the run to continue)")
    if fmt not in resumable_formats():
        raise UsageError(f"--resume works with {' and '.join(resumable_formats())} output, not {fmt}")
    state = prepare_resume(output, fmt, top_k=top_k, retry_errors=retry_errors)
    if state.torn_bytes:
        log.warning("%s: removed a torn last record (%d bytes) left by an interrupted run", output,
                    state.torn_bytes)
    return state


def _options(kw: dict[str, Any]) -> RecognizeOptions:
    return recognize_options(kw)


def _summary(counts: dict[str, int], elapsed: float, state: ResumeState | None) -> None:
    total = counts["ok"] + counts["error"]
    rate = total / elapsed if elapsed > 0 else 0.0
    failed = f", [red]{counts['error']} failed[/red]" if counts["error"] else ""
    resumed = ""
    if state is not None:
        resumed = f"; {state.skipped} already recorded, skipped"
        if state.errors_removed:
            resumed += f" ({state.errors_removed} earlier error record(s) retried)"
        if state.errors_kept:
            resumed += f" ([red]{state.errors_kept} earlier error record(s) kept[/red])"
    from rich.console import Console

    Console(stderr=True, highlight=False).print(
        f"wanwu: {total} input(s): {counts['ok']} ok{failed} in {elapsed:.1f}s ({rate:.1f}/s){resumed}"
    )


class _Progress:
    """A rich progress bar on stderr; its total is counted in the background (never for stdin)."""

    def __init__(self, inputs: tuple[str, ...], enabled: bool, state: ResumeState | None = None) -> None:
        self.enabled = enabled
        self._state = state
        self._bar: Any = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

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
            # Resuming: inputs already recorded are not part of this run's work.
            done = sum(self._state.done.values()) + self._state.skipped if self._state is not None else 0
            self._bar.update(self._task, total=max(0, total - done))

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
