"""``wanwu recognize``: inputs in, one record per input out, streamed."""

from __future__ import annotations

import glob
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import click

from wanwu.cli.aside import ray_log_path, stderr_aside
from wanwu.cli.collector import collecting_less
from wanwu.cli.messages import h, t
from wanwu.cli.options import model_options, prompt_option, recognize_options, run_options, runner_options
from wanwu.cli.progress import (
    ReportedInterrupt,
    RunProgress,
    WholeRecords,
    interrupted_message,
    say,
    terminal_console,
)
from wanwu.config import RecognizeOptions
from wanwu.errors import UsageError
from wanwu.models import resolve_model
from wanwu.runners import RunnerConfig, create_runner
from wanwu.sinks import SINKS, DeferredFlush, SinkOptions, create_sink, format_for_path
from wanwu.sources import SourceOptions, count_items, expand

if TYPE_CHECKING:
    from wanwu.resume import ResumeState  # imported where a run resumes: a plain run does without it

log = logging.getLogger("wanwu")

@click.command("recognize", help=h("recognize"))
@click.argument("inputs", nargs=-1, required=True)
@model_options
@prompt_option
@run_options
@runner_options
@click.option(
    "-f", "--format", "fmt", type=click.Choice(sorted(SINKS.names())), default=None,
    help=h("format"),
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=h("output"))
@click.option("--bom", is_flag=True, help=h("bom"))
@click.option("--url-column", default="url", show_default=True, help=h("url_column"))
@click.option("--keep-columns", default="", help=h("keep_columns"))
@click.option("--with-meta", is_flag=True, help=h("with_meta"))
@click.option("--embeddings", is_flag=True, help=h("embeddings"))
@click.option("--embeddings-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help=h("embeddings_dir"))
@click.option("--embedding-output", metavar="NAME", default=None, help=h("embedding_output"))
@click.option(
    "--resume", is_flag=True,
    help=h("resume"),
)
@click.option(
    "--retry-errors", is_flag=True,
    help=h("retry_errors"),
)
@click.option("-q", "--quiet", is_flag=True, help=h("quiet"))
def command(inputs: tuple[str, ...], fmt: str | None, output: Path | None, bom: bool, url_column: str,
            keep_columns: str, with_meta: bool, resume: bool, retry_errors: bool, quiet: bool, **kw: Any) -> int:
    """``wanwu recognize`` (its help text is ``h("recognize")``, in the locale's language)."""
    if output == Path("-"):  # the Unix convention: - is standard output, not a file named "-"
        output = None
    options = _options(kw)
    keep = tuple(c.strip() for c in keep_columns.split(",") if c.strip())
    # On Ray, a .tar shard is read by a task on the cluster; resuming needs its samples named on the driver.
    defer = kw["runner"] == "ray" and not (resume or retry_errors)
    sources = SourceOptions(url_column, keep, with_meta, options.max_bytes, defer_shards=defer)
    fmt = fmt or _default_format(output)
    if (resume or retry_errors) and output is None:
        raise UsageError("--resume needs --output FILE (the file of the run to continue)")
    with ExitStack() as stack:
        # The model loads first: a run that cannot start leaves an existing output untouched.
        model = resolve_model(kw["model"], kw["labels"], kw["label_column"], kw["prompts"]) if kw["prompts"] \
            else kw["model"]
        few = _few_files(inputs)
        runner_config = RunnerConfig(model, kw["labels"], options, kw["ray_address"], kw["label_column"],
                                     kw["ray_actors"], long=not few, sources=sources)
        if kw["runner"] == "ray":
            _set_ray_logs_aside(stack)
        recognizer = stack.enter_context(create_runner(kw["runner"], runner_config))
        stack.enter_context(collecting_less())  # after the model: what it loaded is never scanned again
        shape = options.record
        expect = min(shape.top_k, recognizer.spec.num_classes) if shape.threshold is None else None
        state = _resume_state(output, fmt, shape.top_k, retry_errors, expect) if resume or retry_errors else None
        if output is not None and state is None:
            _warn_if_overwriting(output)
        stream: TextIO = (
            stack.enter_context(output.open("a" if state else "w", encoding="utf-8", newline="",
                                            buffering=OUTPUT_BUFFER))
            if output is not None
            else sys.stdout
        )
        # A table on the terminal and the progress bar share one console: rows print above the bar.
        shared = fmt == "table" and output is None and sys.stdout.isatty()
        console = terminal_console(stdout=True) if shared else None  # else rich is imported only for a bar
        sink_options = SinkOptions(
            top_k=options.record.top_k, bom=bom, append=state is not None and state.exists,
            english=bool(recognizer.spec.labels_en), console=console,
            meta=with_meta or bool(keep), embeddings=options.record.embeddings,
        )
        # Records written in a burst are flushed once, when no further record is ready at once.
        deferred = DeferredFlush(stream) if fmt in _DEFERRED_FLUSH and not shared else None
        sink = create_sink(fmt, cast(TextIO, deferred) if deferred is not None else stream, sink_options)
        folder = None
        if kw["embeddings_dir"] is not None:
            from wanwu.embfolder import EmbeddingFolder  # numpy and pyarrow: only for a run that writes one

            folder = EmbeddingFolder(kw["embeddings_dir"])
        items = expand(inputs, options=sources)
        items = items if state is None else state.pending(items)
        progress = _progress(inputs, not quiet and not few, state, console)  # a few files: done before a bar
        stack.callback(progress.stop)
        counts = {"ok": 0, "error": 0}
        start = time.perf_counter()
        interrupted = False
        guard = stack.enter_context(WholeRecords())
        records = recognizer.recognize(items)
        ready: Callable[[], bool] = getattr(records, "ready", lambda: False)
        try:
            for record in records:
                with guard.writing():
                    sink.write(record)
                    if folder is not None:
                        folder.write(record)
                    counts[record.status] += 1
                    progress.advance(record.ok)
                    if deferred is not None and not ready():
                        deferred.flush_now()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sink.close()
            if deferred is not None:
                deferred.flush_now()
            if folder is not None:
                folder.close()
            progress.stop()
        if interrupted:
            earlier = _already_recorded(state)
            if progress.total is None and not quiet:  # no bar counted them: count now, for the message
                _count_within(progress, inputs, state, COUNT_AT_INTERRUPT_S)
            total = None if progress.total is None else progress.total + earlier
            from wanwu.resume import resumable_formats

            resumable = output is not None and fmt in resumable_formats()
            click.echo(interrupted_message(earlier + progress.done, total, resumable), err=True)
            raise ReportedInterrupt
        if not quiet:
            _summary(counts, time.perf_counter() - start, state, recognizer.cache_hits,
                     recognizer.unchanged)
    return 3 if counts["error"] or (state is not None and state.errors_kept) else 0


def _set_ray_logs_aside(stack: ExitStack) -> None:
    """Ray's own log lines (its Python loggers, its C++ core, the processes it starts) go to a file for the
    rest of the run; wanwu's messages keep stderr."""
    from wanwu.ray.dataset import import_ray

    # Its loggers exist from here on, printing to the stderr of the moment. Not ray.data (pandas, pyarrow: a
    # second or two of CPU before Ray starts): the runner imports it when a run reads shards on the cluster.
    import_ray(data=False)
    aside = stack.enter_context(stderr_aside(ray_log_path()))
    if aside is not None:
        aside.claim_loggers("ray")
        log.info("Ray's own log lines: %s", aside.path)


def _few_files(inputs: tuple[str, ...]) -> bool:
    """At most :data:`~wanwu.run.SHORT_RUN` arguments, each a file (no folder, glob, URL or stdin list):
    a run that decodes in this process, so no decode process is started for it."""
    from wanwu.run import SHORT_RUN

    return len(inputs) <= SHORT_RUN and all(os.path.isfile(i) and not glob.has_magic(i) for i in inputs)


def _warn_if_overwriting(output: Path) -> None:
    """Say so on stderr before a run without --resume replaces an earlier output that holds records."""
    try:
        size = output.stat().st_size
    except OSError:
        return
    if size > 0:
        click.echo(
            f"wanwu: overwriting {output} ({size:,} bytes); use --resume to continue it instead", err=True
        )


_DEFERRED_FLUSH = ("jsonl", "json", "csv")
# Bytes an output file gathers between writes: records are flushed whenever none is ready at once anyway, and
# each write to the file lets the run's other threads take the interpreter for up to its switch interval.
OUTPUT_BUFFER = 1 << 20


def _default_format(output: Path | None) -> str:
    """By the output file's suffix (unknown: a usage error); else jsonl, or a table on a terminal."""
    if output is not None:
        return format_for_path(output)
    return "table" if sys.stdout.isatty() else "jsonl"


def _resume_state(
    output: Path | None, fmt: str, top_k: int, retry_errors: bool, expect: int | None = None
) -> ResumeState:
    from wanwu.resume import prepare_resume, resumable_formats

    if output is None:
        raise UsageError("--resume needs --output FILE (the file of the run to continue)")
    if fmt not in resumable_formats():
        raise UsageError(f"--resume works with {', '.join(resumable_formats())} output, not {fmt}")
    state = prepare_resume(output, fmt, top_k=top_k, retry_errors=retry_errors, expect_predictions=expect)
    if state.torn_bytes:
        log.warning("%s: removed a torn last record (%d bytes) left by an interrupted run", output,
                    state.torn_bytes)
    return state


def _options(kw: dict[str, Any]) -> RecognizeOptions:
    options = recognize_options(kw)
    if kw["embeddings"] or kw["embeddings_dir"] is not None or kw["embedding_output"] is not None:
        return options.with_embeddings(kw["embedding_output"])
    return options


def _summary(counts: dict[str, int], elapsed: float, state: ResumeState | None, cached: int,
             unchanged: int = 0) -> None:
    total = counts["ok"] + counts["error"]
    resumed = ""
    if state is not None:
        resumed = t("summary.skipped", n=state.skipped)
        if state.errors_removed:
            resumed += t("summary.retried", n=state.errors_removed)
        if state.errors_kept:
            resumed += t("summary.kept", n=state.errors_kept)
    say("wanwu: " + t(
        "summary", total=total, ok=counts["ok"], elapsed=elapsed, rate=total / elapsed if elapsed > 0 else 0.0,
        failed=t("summary.failed", n=counts["error"]) if counts["error"] else "",
        cached=(t("summary.cached", n=cached) + (t("summary.unchanged", n=unchanged) if unchanged else ""))
        if cached else "", resumed=resumed,
    ))


def _already_recorded(state: ResumeState | None) -> int:
    """Inputs a resumed run found already recorded (they count as done, not as this run's work)."""
    return sum(state.done.values()) + state.skipped if state is not None else 0


COUNT_AT_INTERRUPT_S = 5.0  # after Ctrl-C, the longest the total is counted for; past it the message has none


def _progress(inputs: tuple[str, ...], loud: bool, state: ResumeState | None, console: Any) -> RunProgress:
    """The bar (on a terminal), its total counted in the background (never for stdin). Without a bar nothing is
    counted while the run goes (a second walk of a big folder costs a rerun of unchanged files a sixth of its
    time); the message after Ctrl-C counts then."""
    progress = RunProgress(t("progress.recognize"), loud and sys.stderr.isatty(), console)
    if progress.enabled:
        threading.Thread(target=_count, args=(progress, inputs, state), daemon=True).start()
    return progress


def _count_within(progress: RunProgress, inputs: tuple[str, ...], state: ResumeState | None, seconds: float) -> None:
    counting = threading.Thread(target=_count, args=(progress, inputs, state), daemon=True)
    counting.start()
    counting.join(seconds)


def _count(progress: RunProgress, inputs: tuple[str, ...], state: ResumeState | None) -> None:
    try:
        total = count_items(inputs)
    except Exception as e:  # the count only sizes the bar; the run itself reports the cause, as a record
        log.debug("inputs not counted: %s", e)
        return
    if total is not None:
        progress.set_total(max(0, total - _already_recorded(state)))  # resuming: only what is left
