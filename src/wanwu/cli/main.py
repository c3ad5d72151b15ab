"""Entry point: the ``wanwu`` command group, and the one place errors become exit codes.

Exit codes: 0 all inputs ok · 3 finished, some inputs failed · 2 usage error · 1 fatal error ·
130 interrupted (Ctrl-C; what was done is flushed first).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import signal
import sys
import threading
from typing import Any

import click

from wanwu import __version__
from wanwu.cli.localized import localize, show_error
from wanwu.cli.messages import h, short_help, t
from wanwu.cli.progress import ReportedInterrupt
from wanwu.errors import UsageError, WanwuError

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a command that wrote into a closed pipe
# Each module defines ``command`` and is imported only when its command runs (``wanwu --help`` and a one-photo
# ``recognize`` import none of the others); beside it, the first sentence of its English help, which
# ``wanwu --help`` lists without importing anything (tests/test_cli.py checks both stay the same).
COMMANDS = {
    "cache": "Inspect and trim the result cache (model outputs keyed by file content).",
    "convert": "Convert a PyTorch model to ONNX, checking that both give the same logits.",
    "jobs": "Asynchronous jobs for large catalogues: submit now, let workers run, collect later.",
    "recognize": "Recognize INPUTS: files, folders (recursive), globs, http(s) URLs, or - for a list on stdin.",
    "report": "Write one self-contained HTML report (no network needed) about RESULTS (jsonl or parquet files).",
    "serve": "Serve recognition over HTTP, with a web page at / and the API under /v1.",
    "worker": "Recognize queued tasks with one loaded model; run as many as you like, on any machine.",
    "index": "Embed INPUTS (files, folders, globs, URLs, - for a list on stdin) and add what is new to INDEX_DIR.",
    "search": "Search INDEX_DIR by TEXT (models with a text tower) or by --image photos: one line per query.",
    "dedupe": "Groups of near-duplicates in INDEX_DIR, one JSON line per group.",
}
# Commands whose process runs the model and nothing that numpy's BLAS would do faster on threads (the service
# searches an index by matrix products, so it is not one). OpenBLAS starts a thread per core when numpy is
# imported, whose start-up spin cost a phone-photo run 0.1-0.2 s of CPU over its processes: these commands
# default to one BLAS thread (OPENBLAS_NUM_THREADS, when not set already). ONNX Runtime and torch have their own.
ONE_BLAS_THREAD = {"recognize", "worker"}
# Commands defined in a module of another name (the module's ``commands``); the others: ``wanwu.cli.NAME``.
MODULES = {"index": "search", "search": "search", "dedupe": "search"}


class _OutputClosed(Exception):
    """Stdout was closed by its reader (``wanwu recognize ... | head``): the run ends quietly."""


class LazyGroup(click.Group):
    """The ``wanwu`` group: a command's module is imported the first time that command is looked up. A closed
    stdout leaves click's own handling (exit 1) for the broken-pipe status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            raise _OutputClosed from e

    @property  # type: ignore[override]
    def commands(self) -> dict[str, click.Command]:
        """Every command, loaded (what tests and tools that walk the tree see)."""
        for name in COMMANDS:
            self._load(name)
        return self._loaded

    @commands.setter
    def commands(self, value: dict[str, click.Command]) -> None:
        self._loaded = dict(value)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                             list[str]]:
        if args and args[0] in ONE_BLAS_THREAD:
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy is imported: see ONE_BLAS_THREAD
        if args and args[0] == "recognize" and "--help" not in args and "-h" not in args:
            from wanwu.forkserver import start_early

            start_early(args[1:])  # before the command's modules are imported: see wanwu.forkserver
        return super().resolve_command(ctx, args)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if ctx.meta.get(_LISTING) and cmd_name in COMMANDS and cmd_name not in self._loaded:
            return click.Command(cmd_name, help=COMMANDS[cmd_name], short_help=short_help(cmd_name))
        return self._load(cmd_name)

    def _load(self, name: str) -> click.Command | None:
        if name in self._loaded or name not in COMMANDS:
            return self._loaded.get(name)
        module_name = f"wanwu.cli.{MODULES.get(name, name)}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            return None
        command: click.Command = next(c for c in getattr(module, "commands", ()) if c.name == name) \
            if name in MODULES else module.command
        _accept_verbose(command)
        _localize_short_help(command, name)
        localize(command)
        self._loaded[name] = command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's command list, from :data:`COMMANDS` (Chinese summaries by locale): nothing imported."""
        ctx.meta[_LISTING] = True
        try:
            super().format_commands(ctx, formatter)
        finally:
            del ctx.meta[_LISTING]


_LISTING = "wanwu.listing"  # set in ctx.meta while ``wanwu --help`` lists the commands


VERBOSE_HELP = h("verbose")


def _verbosity(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """``-v`` before or after the subcommand: each raises the log level, never lowers it."""
    if value:
        level = logging.INFO if value == 1 else logging.DEBUG
        logging.getLogger().setLevel(min(logging.getLogger().getEffectiveLevel(), level))
    return int(value)


@click.group(cls=LazyGroup, help=h("wanwu"), context_settings={
    "help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True})
@click.version_option(__version__, prog_name="wanwu")
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP, show_default=False)
def cli(verbose: int) -> None:
    """The ``wanwu`` group: -v, then a subcommand."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="wanwu: %(message)s", stream=sys.stderr, force=True)


def _localize_short_help(command: click.Command, path: str) -> None:
    """Under a Chinese locale, the command lists of ``wanwu --help`` and its groups in Chinese too."""
    text = short_help(path)
    if text is not None:
        command.short_help = text
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            _localize_short_help(sub, f"{path} {name}")


def _accept_verbose(command: click.Command) -> None:
    """Every subcommand also takes -v/--verbose (``wanwu recognize -v ...`` as well as ``wanwu -v recognize``)."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _accept_verbose(sub)
    elif not any("--verbose" in p.opts for p in command.params):
        command.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False,
                                           callback=_verbosity, help=VERBOSE_HELP, show_default=False))


localize(cli, deep=False)  # each command as it is loaded (LazyGroup._load)


def main(argv: list[str] | None = None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="wanwu", standalone_mode=False)
    except click.exceptions.Abort as e:
        if not isinstance(e.__cause__, ReportedInterrupt):  # the command said how far it got already
            click.echo(t("interrupted"), err=True)
        return EXIT_INTERRUPTED
    except _OutputClosed:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except click.ClickException as e:
        show_error(e)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        if not isinstance(e, ReportedInterrupt):
            click.echo(t("interrupted"), err=True)
        return EXIT_INTERRUPTED
    except UsageError as e:
        click.echo(f"wanwu: error: {e}", err=True)
        return EXIT_USAGE
    except WanwuError as e:
        click.echo(f"wanwu: error: {e}", err=True)
        return EXIT_FATAL
    return rv if isinstance(rv, int) else EXIT_OK


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of it cannot fail again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture): nothing will flush into a pipe
        pass
    finally:
        os.close(devnull)


def run() -> None:
    """The ``wanwu`` command (and ``python -m wanwu``): :func:`main`, then a quick exit.

    When the command is done and only the main thread is left, the exit handlers run (child processes are
    joined, log handlers flushed), stdout and stderr are flushed, and the process ends without the
    interpreter's teardown of every module, which costs 0.05-0.15 s after numpy and onnxruntime: a fifth of a
    one-photo run. A still-running thread gets the usual exit, which waits for it.
    """
    code = main()
    if any(not thread.daemon for thread in threading.enumerate() if thread is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away: the run's status already says so
            pass
    os._exit(code)
