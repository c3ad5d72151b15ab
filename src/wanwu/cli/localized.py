"""click's own words (Usage, Options, [default: …], usage errors) in the CLI's language, through click's public
classes (a ``Context`` subclass whose formatter translates) rather than by replacing anything inside click, and
wrapped for Chinese (:mod:`wanwu.cli.helpformat`)."""

from __future__ import annotations

import re
from collections.abc import Iterable

import click

from wanwu.cli.helpformat import WideTextHelpFormatter
from wanwu.cli.messages import click_zh, language

_BRACKET = re.compile(r"\[([^\[\]]*)\]$")


class LocalizedFormatter(WideTextHelpFormatter):
    def write_usage(self, prog: str, args: str = "", prefix: str | None = None) -> None:
        super().write_usage(prog, args, prefix if prefix is not None else f"{click_zh('Usage:')} ")

    def write_heading(self, heading: str) -> None:
        super().write_heading(click_zh(heading))

    def write_dl(self, rows: Iterable[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        super().write_dl([(term, _help_text(text)) for term, text in rows], col_max, col_spacing)


def _help_text(text: str) -> str:
    """An option's help: click's own sentences, and the ``[default: …; required]`` tail, translated."""
    text = click_zh(text)
    match = _BRACKET.search(text)
    if match is None:
        return text
    parts = []
    for part in match.group(1).split("; "):
        key, sep, value = part.partition(": ")
        parts.append(f"{click_zh(key)}：{value}" if sep and key == "default" else click_zh(part))
    return text[: match.start()] + "[" + "; ".join(parts) + "]"


class LocalizedContext(click.Context):
    formatter_class = LocalizedFormatter


def localize(command: click.Command, deep: bool = True) -> None:
    """``command`` (and, ``deep``, every command under it) formats its help in the CLI's language. The ``wanwu``
    group itself is localized shallowly: its commands are localized as they are loaded."""
    if language() == "en":
        return
    command.context_class = LocalizedContext
    if deep and isinstance(command, click.Group):
        for sub in command.commands.values():
            localize(sub)


def show_error(e: click.ClickException) -> None:
    """What ``e.show()`` prints, in the CLI's language."""
    if language() == "en":
        e.show()
        return
    message = e.format_message()
    if isinstance(e, click.BadParameter) and e.param_hint is None and e.param is not None and e.ctx is not None:
        hint = e.param.get_error_hint(e.ctx)
        message = click_zh("Invalid value for {param_hint}: {message}").format(param_hint=hint, message=e.message)
    if isinstance(e, click.UsageError) and e.ctx is not None:
        click.echo(e.ctx.get_usage(), err=True)
        if e.ctx.command.get_help_option(e.ctx) is not None:
            option = e.ctx.help_option_names[0]
            click.echo(click_zh("Try '{command} {option}' for help.").format(
                command=e.ctx.command_path, option=option), err=True)
        click.echo(err=True)
    click.echo(click_zh("Error: {message}").format(message=message), err=True)
