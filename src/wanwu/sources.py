"""Inputs: what the user named, expanded lazily into items (:mod:`wanwu.fetch` reads their bytes).

Expansion is a registry of :class:`Source` kinds tried in order (object storage, URL, other schemes, folder,
glob, file; ``-`` = stdin), and it is lazy: a folder of a million photos is walked as it is consumed, never
listed in memory. A file named explicitly is always attempted, whatever its extension; folder walks pick files
by image extension. Anything that yields no item still yields one (an error record), so no input silently
disappears. Third parties add sources through the ``wanwu.sources`` entry-point group.
"""

from __future__ import annotations

import glob as globlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TextIO

from wanwu.errors import ErrorType
from wanwu.registry import Registry

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".mpo"}
)
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
ItemKind = Literal["file", "url", "bytes", "missing", "object"]  # object: s3:// (wanwu.objstore)


@dataclass(frozen=True, slots=True)
class InputItem:
    """One thing to recognize. ``input`` is what appears in its record."""

    input: str
    kind: ItemKind
    locator: str = ""  # path, URL or object URL
    data: bytes | None = None  # kind == "bytes": uploaded content
    error_type: ErrorType = "not_found"  # kind == "missing": why it gets an error record
    error: str = ""
    stamp: str | None = None  # kind == "object": size, ETag, version from the listing (wanwu.cache.memo)

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> InputItem:
        return cls(name, "bytes", data=data)

    @classmethod
    def failed(cls, name: str, message: str, error_type: ErrorType = "not_found") -> InputItem:
        """An input that cannot be read at all: it still gets its (error) record."""
        return cls(name, "missing", error_type=error_type, error=message)


class Source(Protocol):
    @property
    def name(self) -> str: ...

    def claims(self, arg: str) -> bool: ...

    def expand(self, arg: str) -> Iterator[InputItem]: ...


@dataclass(frozen=True)
class _Source:
    name: str
    claims_fn: Callable[[str], bool]
    expand_fn: Callable[[str], Iterator[InputItem]]

    def claims(self, arg: str) -> bool:
        return self.claims_fn(arg)

    def expand(self, arg: str) -> Iterator[InputItem]:
        return self.expand_fn(arg)


def is_url(arg: str) -> bool:
    """An http(s) URL: the one test of it (sources, job inputs, service requests)."""
    return arg.lower().startswith(("http://", "https://"))


def _is_glob(arg: str) -> bool:
    return globlib.has_magic(arg) and not os.path.exists(arg)


def _expand_url(arg: str) -> Iterator[InputItem]:
    yield InputItem(arg, "url", arg)


def _expand_dir(arg: str) -> Iterator[InputItem]:
    found = False
    for path in walk_image_paths(arg):
        found = True
        yield InputItem(path, "file", path)
    if not found:
        yield InputItem.failed(arg, "folder contains no image files")


def _expand_glob(arg: str) -> Iterator[InputItem]:
    found = False
    for match in globlib.iglob(arg, recursive=True):
        if os.path.isdir(match):
            continue
        found = True
        yield InputItem(match, "file", match)
    if not found:
        yield InputItem.failed(arg, "no file matches this pattern")


def _expand_file(arg: str) -> Iterator[InputItem]:
    yield InputItem(arg, "file", arg)


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _is_other_scheme(arg: str) -> bool:
    """``s3://…``, ``oss://…``, ``ftp://…``: a URL of a kind no registered source reads."""
    return _SCHEME.match(arg) is not None


def _expand_other_scheme(arg: str) -> Iterator[InputItem]:
    match = _SCHEME.match(arg)
    scheme = match.group(1).lower() if match else "?"
    yield InputItem.failed(
        arg, f"unsupported scheme '{scheme}://': inputs are files, folders, globs and http(s) URLs", "unsupported"
    )




SOURCES: Registry[Source] = Registry("input source", group="wanwu.sources")
SOURCES.lazy("object", "wanwu.objstore:SOURCE", extra="s3")
for _source in (
    _Source("url", is_url, _expand_url),
    _Source("other-scheme", _is_other_scheme, _expand_other_scheme),
    _Source("folder", os.path.isdir, _expand_dir),
    _Source("glob", _is_glob, _expand_glob),
    _Source("file", lambda arg: True, _expand_file),
):
    SOURCES.register(_source.name, _source)


def expand(args: Iterable[str], stdin: TextIO | None = None) -> Iterator[InputItem]:
    """Expand CLI arguments lazily; ``-`` reads newline-separated inputs from ``stdin``."""
    for arg in args:
        if arg == "-":
            for line in stdin if stdin is not None else sys.stdin:
                line = line.strip()
                if line:
                    yield from _expand_one(line)
        else:
            yield from _expand_one(arg)


def _expand_one(arg: str) -> Iterator[InputItem]:
    for _, source in SOURCES.items():
        if source.claims(arg):
            yield from source.expand(arg)
            return


def walk_images(root: Path) -> Iterator[Path]:
    """Image files under ``root``, depth-first, sorted by name in each folder; symlinked dirs not followed."""
    for path in walk_image_paths(str(root)):
        yield Path(path)


def walk_image_paths(root: str) -> Iterator[str]:
    """:func:`walk_images` as strings (what a folder argument expands to: no Path object per file)."""
    stack = [root]
    splitext, images = os.path.splitext, IMAGE_EXTENSIONS
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
                elif splitext(entry.name)[1].lower() in images and entry.is_file():
                    yield entry.path
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def count_items(args: Iterable[str]) -> int | None:
    """How many items ``args`` will expand to, or None if unknowable (stdin). Walks, stores nothing."""
    total = 0
    for arg in args:
        if arg == "-":
            return None
        total += sum(1 for _ in _expand_one(arg))
    return total
