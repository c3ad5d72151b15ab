"""The live progress bar of ``wanwu recognize`` and ``wanwu jobs wait``, and how an interrupted run ends.

The bar owns a rich Console; anything printed while it runs (the ``table`` format's rows) goes through that
same Console, so rows appear above the bar instead of on its line.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from typing import Any

import click

from wanwu.cli.messages import t


class ReportedInterrupt(KeyboardInterrupt):
    """Ctrl-C, after the command already said how far it got (the entry point then says nothing more)."""


class WholeRecords:
    """Ctrl-C never lands between writing a record and counting it: inside ``with guard.writing():`` it is held
    back until the block ends, elsewhere it interrupts at once (a pipeline waiting on a slow input, say).

    Without it, "interrupted: 40 of 1000 done" could follow a file holding 41 records. Installed only from the
    main thread (signal handlers can be set nowhere else); a no-op elsewhere."""

    def __init__(self) -> None:
        self._busy = False
        self._held = False
        self._previous: Any = None
        self._writing = _Writing(self)

    def __enter__(self) -> WholeRecords:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._busy:
            self._held = True
        else:
            raise KeyboardInterrupt

    def writing(self) -> _Writing:
        """``with guard.writing():`` around writing and counting one record (a class, not a generator: it
        runs once per record, tens of thousands of times a second on a rerun answered from the cache)."""
        return self._writing


class _Writing:
    def __init__(self, guard: WholeRecords) -> None:
        self.guard = guard

    def __enter__(self) -> None:
        self.guard._busy = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        guard = self.guard
        guard._busy = False
        if guard._held and exc_type is None:
            guard._held = False
            raise KeyboardInterrupt


def say(markup: str) -> None:
    """One line of the messages' markup (their one tag: ``[red]…[/red]``) on stderr, styled by click, which is
    loaded already and drops the style where stderr is no terminal. Not through rich: importing it costs 16 ms,
    7% of a one-photo run."""
    click.echo(re.sub(r"\[red\](.*?)\[/red\]", lambda m: click.style(m[1], fg="red"), markup), err=True)


def terminal_console(stdout: bool = False) -> Any:
    """A rich Console on stderr, or on stdout when records are printed there as a table."""
    from rich.console import Console

    return Console(file=sys.stdout) if stdout else Console(stderr=True, highlight=False)


class RunProgress:
    """A bar with done/total, rate, failures, elapsed and ETA; a no-op when not ``enabled``."""

    def __init__(self, label: str, enabled: bool, console: Any = None) -> None:
        self.done = 0
        self.failed = 0
        self.total: int | None = None
        self._bar: Any = None
        self._start = time.perf_counter()
        self.enabled = enabled
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
            TextColumn(f"[bold]{label}[/bold]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TextColumn("[red]{task.fields[failed]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console or terminal_console(), transient=False,
        )
        self._task = self._bar.add_task(label, total=None, rate="", failed="")
        self._bar.start()

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self, ok: bool) -> None:
        self.show(self.done + 1, self.failed + (not ok))

    def show(self, done: int, failed: int) -> None:
        """Set the absolute counts (``done`` includes ``failed``)."""
        self.done, self.failed = done, failed
        if self._bar is None:
            return
        elapsed = time.perf_counter() - self._start
        self._bar.update(
            self._task, completed=done, rate=t("progress.rate", rate=done / elapsed) if elapsed > 0 else "",
            failed=t("progress.failed", n=failed) if failed else "",
        )

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def interrupted_message(done: int, total: int | None, resumable: bool) -> str:
    """``interrupted: 416 of 1000 done; rerun with --resume to finish`` (in the current language)."""
    text = t("interrupted.count", done=done, total=total) if total is not None else t(
        "interrupted.count_open", done=done)
    return text + (t("interrupted.resume") if resumable else t("interrupted.no_file"))
