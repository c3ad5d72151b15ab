"""Label files: one class per line, line i names class i.

Formats (picked by file name, registry below): plain text, ModelScope ``meta_info.txt`` (tab-separated, the
label in column 2) and ``label_mapping.txt`` (``index<TAB>label`` or plain). Labels may repeat; wanwu keys
everything by class index, never by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from wanwu.errors import ModelError

LabelParser = Callable[[list[str]], list[str]]


def _plain(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines]


def _meta_info(lines: list[str]) -> list[str]:
    out = []
    for n, line in enumerate(lines, 1):
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) < 2:
            raise ModelError(f"meta_info line {n}: expected at least 2 tab-separated columns: {line!r}")
        out.append(cols[1].strip())
    return out


def _tab_or_plain(lines: list[str]) -> list[str]:
    if all("\t" in line for line in lines):
        return [line.rstrip("\r\n").split("\t")[-1].strip() for line in lines]
    return _plain(lines)


LABEL_PARSERS: dict[str, LabelParser] = {
    "meta_info.txt": _meta_info,
    "label_mapping.txt": _tab_or_plain,
}


def load_labels(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ModelError(f"label file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ModelError(f"label file {path} is not UTF-8: {e}") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ModelError(f"label file {path} is empty")
    parser = LABEL_PARSERS.get(path.name, _plain)
    return tuple(parser(lines))
