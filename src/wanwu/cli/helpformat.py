"""--help wrapped for Chinese: lines break between Chinese characters, never inside a Latin word.

click wraps at spaces and cuts any longer "word" wherever the width runs out; Chinese text has no spaces, so a
whole sentence is one word to it and a flag or a word such as ``all`` could be cut in two. Here a Chinese
character is a place to break (closing punctuation stays with the character before it), a Latin word or flag is
kept whole, and widths count a Chinese character as two columns, as a terminal shows it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import click
from click.formatting import measure_table

_CLOSING = "，。、；：？！）」』》〉】”’%,.;:)!?"
# one chunk: a run of spaces; a run of non-space, non-wide characters (a word, a flag, a path) with any
# closing punctuation after it; or one wide character with its closing punctuation. Compiled at its first use
# (re keeps it): compiling it costs 4 ms, which a run that prints no help never pays.
_CHUNK = rf"\s+|[^\s\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef]+[{_CLOSING}]*|.[{_CLOSING}]*"


def display_width(text: str) -> int:
    """Terminal columns of ``text``: East Asian wide and full-width characters count two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def wrap(text: str, width: int) -> list[str]:
    """One paragraph as lines of at most ``width`` columns (a single chunk wider than that stands alone)."""
    lines: list[str] = []
    line = ""
    for chunk in re.findall(_CHUNK, " ".join(text.split())):
        if line and display_width(line + chunk.rstrip()) > width:
            lines.append(line.rstrip())
            line = "" if chunk.isspace() else chunk
        else:
            line += chunk
    if line.strip():
        lines.append(line.rstrip())
    return lines


def _unwrappable(text: str, width: int) -> str:
    """``text`` wrapped here, each paragraph marked with click's ``\\b`` so that click leaves it as it is."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "\n\n".join("\b\n" + "\n".join(wrap(p, width)) for p in paragraphs)


class WideTextHelpFormatter(click.HelpFormatter):
    """click's help formatter, with Chinese-aware wrapping for the text of commands and options."""

    def write_text(self, text: str) -> None:
        super().write_text(_unwrappable(text, max(self.width - self.current_indent, 11)))

    def write_dl(self, rows: Iterable[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        rows = list(rows)
        first_col = min(measure_table(rows)[0], col_max) + col_spacing if rows else 0
        text_width = max(self.width - first_col - 2, 10)
        super().write_dl([(first, _unwrappable(second, text_width) if second else second)
                          for first, second in rows], col_max, col_spacing)
