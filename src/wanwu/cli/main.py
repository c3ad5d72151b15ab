"""Entry point: the ``wanwu`` command group, and the one place errors become exit codes.

Exit codes: 0 all inputs ok · 3 finished, some inputs failed · 2 usage error · 1 fatal error ·
130 interrupted (Ctrl-C; what was done is flushed first).
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from wanwu import __version__
from wanwu.errors import UsageError, WanwuError

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# Each module defines ``command``; a module whose extra is missing still registers (it fails on use).
COMMAND_MODULES = ("recognize", "cache", "convert", "serve", "jobs", "worker", "report")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="wanwu")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def cli(verbose: int) -> None:
    """万物 wanwu — recognize what is in large numbers of images, named in Chinese."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="wanwu: %(message)s", stream=sys.stderr)


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"wanwu.cli.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"wanwu.cli.{_name}":
            raise
        continue
    cli.add_command(_module.command)


def main(argv: list[str] | None = None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="wanwu", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as e:
        e.show()
        return EXIT_USAGE
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    except UsageError as e:
        click.echo(f"wanwu: error: {e}", err=True)
        return EXIT_USAGE
    except WanwuError as e:
        click.echo(f"wanwu: error: {e}", err=True)
        return EXIT_FATAL
    return rv if isinstance(rv, int) else EXIT_OK


def run() -> None:
    sys.exit(main())
