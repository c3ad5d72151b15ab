"""Every ``wanwu …`` command that README.md and docs/*.md show exists, with the options and choices it uses.

Fenced code lines and inline code spans that start a ``wanwu`` command are parsed against the click CLI (no
command is run, so none needs the network, a model or an extra): the subcommand must exist, every option must
be one of that command's (or -h/-v), and a value given to a choice option must be one of its choices.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from wanwu.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_SPAN = re.compile(r"`(wanwu [^`]+)`")


def commands_in(text: str) -> list[str]:
    """The ``wanwu …`` commands of a Markdown page: fenced shell lines (continuations joined, comments and
    what other commands are piped into it dropped) and inline code spans."""
    found: list[str] = []
    for lang, body in _FENCE.findall(text):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#\s.*$", "", line)
            for part in re.split(r"\s(?:\||&&|;)\s", line):
                words = part.split()
                while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the command
                    words = words[1:]
                if words[:1] == ["wanwu"]:
                    found.append(part[part.index("wanwu"):].strip())
    for span in _SPAN.findall(re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)):
        found.append(re.split(r"\s(?:\||&&|;)\s", span)[0])
    return found


def problems_of(command_line: str) -> list[str]:
    """What in ``command_line`` the CLI does not accept (empty: all of it exists)."""
    try:
        words = [w.strip("[]") for w in shlex.split(command_line)][1:]
    except ValueError as e:
        return [f"{command_line!r}: {e}"]
    command: click.Command = cli
    path = ["wanwu"]
    while isinstance(command, click.Group):
        words = [w for w in words if w not in ("-v", "-vv", "--verbose")] if command is cli else words
        if not words or words[0].startswith("-") or words[0] in ("...", "…"):
            return []  # `wanwu --help`, `wanwu jobs`: the group itself; `wanwu …`: any command
        sub = command.commands.get(words[0])
        if sub is None:
            return [f"{command_line!r}: no command {' '.join([*path, words[0]])!r}"]
        command, path, words = sub, [*path, words[0]], words[1:]
    return _option_problems(command, " ".join(path), words, command_line)


def _option_problems(command: click.Command, name: str, words: list[str], line: str) -> list[str]:
    options = {opt: p for p in command.params if isinstance(p, click.Option) for opt in p.opts + p.secondary_opts}
    known = {*options, "-h", "--help", "-v", "--verbose", "-vv"}
    problems: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":
            break
        if not word.startswith("-") or word == "-" or word in ("...", "…"):
            continue
        flag, _, inline = word.partition("=")
        if flag not in known:
            problems.append(f"{line!r}: {name} has no option {flag}")
            continue
        option = options.get(flag)
        if option is None or option.is_flag or option.count:
            continue
        value = inline or (words[i] if i < len(words) else "")
        i += 0 if inline else 1
        if isinstance(option.type, click.Choice) and value not in option.type.choices and value.isidentifier():
            problems.append(f"{line!r}: {flag} {value}: not one of {', '.join(map(str, option.type.choices))}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_wanwu_command_in_the_docs_exists(page: Path) -> None:
    commands = commands_in(page.read_text(encoding="utf-8"))
    problems = [p for c in commands for p in problems_of(c)]
    assert not problems, "\n".join(problems)


def test_the_readme_shows_commands_and_the_check_finds_them() -> None:
    commands = commands_in((ROOT / "README.md").read_text(encoding="utf-8"))
    assert any(c.startswith("wanwu recognize --model ../shared/data/models/") for c in commands)
    assert "wanwu report out.jsonl -o report.html" in commands


def test_the_check_names_a_removed_command_option_or_choice() -> None:
    page = (
        "```bash\n"
        "find . | wanwu recognize - --no-such-flag -o x.jsonl   # a comment --not-an-option\n"
        "WANWU_X=1 wanwu recognize photos/ -f yaml\n"
        "wanwu jobs vanish --queue q JOB\n"
        "wanwu serve --model m.onnx \\\n    --gone 3\n"
        "```\n"
        "Also `wanwu cache stats --what` inline.\n"
    )
    problems = [p for c in commands_in(page) for p in problems_of(c)]
    assert len(problems) == 5, problems
    assert "recognize has no option --no-such-flag" in problems[0]
    assert "-f yaml: not one of" in problems[1]
    assert "no command 'wanwu jobs vanish'" in problems[2]
    assert "serve has no option --gone" in problems[3]
    assert "cache stats has no option --what" in problems[4]
