"""Entry point: the ``wanwu`` command group, and the one place errors become exit codes.

Exit codes: 0 all inputs ok · 3 finished, some inputs failed · 2 usage error · 1 fatal error ·
130 interrupted (Ctrl-C; what was done is flushed first).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from typing import Any

import click

from wanwu import __version__
from wanwu.cli.localized import localize, show_error
from wanwu.cli.messages import h, short_help, t
from wanwu.cli.progress import ReportedInterrupt
from wanwu.errors import UsageError, WanwuError

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a command that wrote into a closed pipe
# Each module defines ``command`` (or ``commands``); one whose extra is missing still registers (fails on use).
COMMAND_MODULES = ("recognize", "cache", "convert", "serve", "jobs", "worker", "report", "search")


VERBOSE_HELP = h("verbose")


def _verbosity(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """``-v`` before or after the subcommand: each raises the log level, never lowers it."""
    if value:
        level = logging.INFO if value == 1 else logging.DEBUG
        logging.getLogger().setLevel(min(logging.getLogger().getEffectiveLevel(), level))
    return int(value)


class _OutputClosed(Exception):
    """Stdout was closed by its reader (``wanwu recognize ... | head``): the run ends quietly."""


class _Group(click.Group):
    """The ``wanwu`` group: a closed stdout leaves click's own handling (exit 1) for the broken-pipe status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            raise _OutputClosed from e


@click.group(cls=_Group, help=h("wanwu"),
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True})
@click.version_option(__version__, prog_name="wanwu")
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP, show_default=False)
def cli(verbose: int) -> None:
    """The ``wanwu`` group: -v, then a subcommand."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="wanwu: %(message)s", stream=sys.stderr, force=True)


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"wanwu.cli.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"wanwu.cli.{_name}":
            raise
        continue
    for _command in getattr(_module, "commands", None) or (_module.command,):
        cli.add_command(_command)


def _localize_short_help(group: click.Group, prefix: str = "") -> None:
    """Under a Chinese locale, the command lists of ``wanwu --help`` and its groups in Chinese too."""
    for name, command in group.commands.items():
        text = short_help(prefix + name)
        if text is not None:
            command.short_help = text
        if isinstance(command, click.Group):
            _localize_short_help(command, f"{prefix}{name} ")


def _accept_verbose(group: click.Group) -> None:
    """Every subcommand also takes -v/--verbose (``wanwu recognize -v ...`` as well as ``wanwu -v recognize``)."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _accept_verbose(command)
        elif not any("--verbose" in p.opts for p in command.params):
            command.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False,
                                               callback=_verbosity, help=VERBOSE_HELP, show_default=False))


_accept_verbose(cli)
_localize_short_help(cli)
localize(cli)


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
    sys.exit(main())
