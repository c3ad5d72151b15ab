"""Inputs: what the user named, expanded lazily into items (:mod:`wanwu.fetch` reads their bytes).

Expansion is a registry of :class:`Source` kinds tried in order (object storage, URL, other schemes, folder,
glob, file; ``-`` = stdin), and it is lazy: a folder of a million photos is walked as it is consumed, never
listed in memory. A file named explicitly is always attempted, whatever its extension; folder walks pick files
by image extension. Anything that yields no item still yields one (an error record), so no input silently
disappears. Third parties add sources through the ``wanwu.sources`` entry-point group.
"""

from __future__ import annotations

import errno
import glob as globlib
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TextIO

from wanwu.errors import ERROR_TYPES, ErrorType
from wanwu.registry import Registry

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".mpo"}
)
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
ItemKind = str
"""``file``, ``url``, ``bytes`` (content given), ``missing`` (an error record), ``object`` (``s3://``,
:mod:`wanwu.objstore`), ``shard`` (a WebDataset ``.tar`` not yet read: :mod:`wanwu.shards` expands it), or a
kind a plug-in adds with a reader of its own (:data:`wanwu.fetch.FETCHERS`)."""
ROW_FIELDS = ("input", "kind", "locator", "error_type", "error", "meta", "stamp")


@dataclass(frozen=True, slots=True)
class InputItem:
    """One thing to recognize. ``input`` is what appears in its record.

    Its wire form (:meth:`to_row`: a Ray row, a queued task's input, an HTTP request's) is the same five
    strings everywhere; ``bytes`` content travels beside it (the queue stores it by sha256 in ``locator``)."""

    input: str
    kind: ItemKind
    locator: str = ""  # path, URL, object URL; sha256 of ``data`` on a queue
    data: bytes | None = None  # kind == "bytes": the content
    error_type: ErrorType = "not_found"  # kind == "missing": why it gets an error record
    error: str = ""
    meta: dict[str, Any] | None = None  # rides along into the record (a shard sample's .json, a table's columns)
    stamp: str | None = None  # kind == "object": size, ETag, version from the listing (wanwu.cache.memo)

    def with_meta(self, meta: dict[str, Any]) -> InputItem:
        return replace(self, meta=meta)

    def to_row(self) -> dict[str, str]:
        """The wire form: ``input``, ``kind``, ``locator``, ``error_type``, ``error``, ``meta``, ``stamp`` (all
        strings; ``meta`` as JSON; empty when there is none)."""
        return {"input": self.input, "kind": self.kind, "locator": self.locator,
                "error_type": self.error_type if self.kind == "missing" else "", "error": self.error,
                "meta": json.dumps(self.meta, ensure_ascii=False) if self.meta else "", "stamp": self.stamp or ""}

    @classmethod
    def from_row(cls, row: dict[str, str], data: bytes | None = None) -> InputItem:
        """Back from :meth:`to_row` (an unknown error type reads as ``internal``)."""
        if row["kind"] == "missing":
            error_type = row.get("error_type", "")
            return cls.failed(row["input"], row.get("error", ""),
                              error_type if error_type in ERROR_TYPES else "internal")
        meta = row.get("meta")
        return cls(row["input"], row["kind"], row.get("locator", ""), data, meta=json.loads(meta) if meta else None,
                   stamp=row.get("stamp") or None)

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> InputItem:
        return cls(name, "bytes", data=data)

    @classmethod
    def failed(cls, name: str, message: str, error_type: ErrorType = "not_found") -> InputItem:
        """An input that cannot be read at all: it still gets its (error) record."""
        return cls(name, "missing", error_type=error_type, error=message)


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """What some sources need beyond the argument: a URL table's columns, a shard's metadata, the byte limit
    of what a source reads itself (shard members)."""

    url_column: str = "url"
    keep_columns: tuple[str, ...] = ()
    with_meta: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    defer_shards: bool = False  # a .tar stays one "shard" item, read later where it runs (the Ray runner)


class Source(Protocol):
    @property
    def name(self) -> str: ...

    def claims(self, arg: str) -> bool: ...

    def expand(self, arg: str, options: SourceOptions | None = None) -> Iterator[InputItem]: ...


@dataclass(frozen=True)
class _Source:
    name: str
    claims_fn: Callable[[str], bool]
    expand_fn: Callable[[str], Iterator[InputItem]]

    def claims(self, arg: str) -> bool:
        return self.claims_fn(arg)

    def expand(self, arg: str, options: SourceOptions | None = None) -> Iterator[InputItem]:
        return self.expand_fn(arg)


def is_url(arg: str) -> bool:
    """An http(s) URL: the one test of it (sources, job inputs, service requests)."""
    return arg.lower().startswith(("http://", "https://"))


def _is_glob(arg: str) -> bool:
    return globlib.has_magic(arg) and not os.path.exists(arg)


# --- names that are not UTF-8 ------------------------------------------------------------------------------
#
# A POSIX file name is bytes. Python hands over the bytes that are not UTF-8 as lone surrogates
# (U+DC80..U+DCFF, "surrogateescape"), which no UTF-8 output (jsonl, csv, SQLite, a queue) can hold. Every
# record's ``input`` and every path a job carries is therefore written in one escaped form, valid UTF-8 and
# reversible: such a byte becomes ``\xHH``, any other lone surrogate ``\uDXXX``, and a backslash that would
# otherwise read as the start of an escape (one followed by ``\``, ``x`` or ``u``) is doubled. A name that is
# valid UTF-8 and holds no such backslash (nearly every name) is left exactly as it is.

_ESCAPE = re.compile(r"\\(?=[\\xu\ud800-\udfff])|[\ud800-\udfff]")
_UNESCAPE = re.compile(r"\\(\\|x[89a-fA-F][0-9a-fA-F]|u[dD][89a-fA-F][0-9a-fA-F]{2})")


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def _unescape_one(match: re.Match[str]) -> str:
    code = match.group(1)
    if code == "\\":
        return "\\"
    return chr(0xDC00 + int(code[1:], 16)) if code[0] == "x" else chr(int(code[1:], 16))


def escape_name(name: str) -> str:
    r"""``name`` (a path as the OS gave it) in the form records, outputs, caches and queues hold: valid UTF-8,
    undecodable bytes as ``\xHH``; :func:`unescape_name` gives the original back."""
    if ("\\" not in name and name.isprintable()) or not _ESCAPE.search(name):
        return name
    return _ESCAPE.sub(_escape_one, name)


def unescape_name(name: str) -> str:
    """The path :func:`escape_name` was given (with its undecodable bytes as surrogates, as ``open`` takes)."""
    return _UNESCAPE.sub(_unescape_one, name) if "\\" in name else name


def file_item(path: str) -> InputItem:
    """The item for a local file: its record names it escaped, the fetcher opens it as it is."""
    return InputItem(escape_name(path), "file", path)


def _expand_url(arg: str) -> Iterator[InputItem]:
    yield InputItem(escape_name(arg), "url", arg)


def _expand_dir(arg: str) -> Iterator[InputItem]:
    found = False
    for path, problem in walk_entries(arg):
        found = True
        if problem is None:
            yield file_item(path)
        else:
            yield InputItem.failed(escape_name(path), problem, "fetch_error")
    if not found:
        yield InputItem.failed(escape_name(arg), "folder contains no image files")


def _expand_glob(arg: str) -> Iterator[InputItem]:
    found = False
    for match in globlib.iglob(arg, recursive=True):
        if os.path.isdir(match):
            continue
        found = True
        yield file_item(match)
    if not found:
        yield InputItem.failed(escape_name(arg), "no file matches this pattern")


def _expand_file(arg: str) -> Iterator[InputItem]:
    yield file_item(arg)


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _is_other_scheme(arg: str) -> bool:
    """``s3://…``, ``oss://…``, ``ftp://…``: a URL of a kind no registered source reads."""
    return _SCHEME.match(arg) is not None


def _expand_other_scheme(arg: str) -> Iterator[InputItem]:
    match = _SCHEME.match(arg)
    scheme = match.group(1).lower() if match else "?"
    yield InputItem.failed(
        escape_name(arg), f"unsupported scheme '{scheme}://': inputs are files, folders, globs and http(s) URLs",
        "unsupported",
    )




SHARD_SUFFIXES = (".tar",)
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv")
OBJECT_SCHEMES = ("s3://",)


@dataclass(frozen=True)
class _Deferred:
    """A built-in source whose module is imported only to expand an argument it claims: the claim is a
    suffix or a scheme, so a run of plain files never imports tarfile, csv or the object store client."""

    name: str
    claims_fn: Callable[[str], bool]
    target: str  # "module:attr"

    def claims(self, arg: str) -> bool:
        return self.claims_fn(arg)

    def expand(self, arg: str, options: SourceOptions | None = None) -> Iterator[InputItem]:
        import importlib

        module, _, attr = self.target.partition(":")
        source: Source = getattr(importlib.import_module(module), attr)
        return source.expand(arg, options)


SOURCES: Registry[Source] = Registry("input source", group="wanwu.sources")
for _source in (
    # *.tar (local, s3://, globs, brace ranges): before the others
    _Deferred("shards", lambda arg: arg.lower().endswith(SHARD_SUFFIXES), "wanwu.shards:SOURCE"),
    _Deferred("table", lambda arg: arg.lower().endswith(TABLE_SUFFIXES), "wanwu.tables:SOURCE"),  # of URLs/paths
    _Deferred("object", lambda arg: arg.lower().startswith(OBJECT_SCHEMES), "wanwu.objstore:SOURCE"),
    _Source("url", is_url, _expand_url),
    _Source("other-scheme", _is_other_scheme, _expand_other_scheme),
    _Source("folder", os.path.isdir, _expand_dir),
    _Source("glob", _is_glob, _expand_glob),
    _Source("file", lambda arg: True, _expand_file),
):
    SOURCES.register(_source.name, _source)


def expand(
    args: Iterable[str], stdin: TextIO | None = None, options: SourceOptions | None = None
) -> Iterator[InputItem]:
    """Expand CLI arguments lazily; ``-`` reads newline-separated inputs from ``stdin``."""
    for arg in args:
        if arg == "-":
            for line in stdin if stdin is not None else _stdin_lines():
                line = line.strip()
                if line:
                    yield from _expand_one(line, options)
        else:
            yield from _expand_one(arg, options)


def _stdin_lines() -> Iterable[str]:
    """Standard input's lines as the OS would decode file names (bytes that are not UTF-8 as surrogates, which
    :func:`escape_name` then shows as ``\\xHH``), so a list of paths from ``find`` never stops a run."""
    binary = getattr(sys.stdin, "buffer", None)
    if binary is None:
        return sys.stdin
    return (os.fsdecode(line) for line in binary)


def _expand_one(arg: str, options: SourceOptions | None = None) -> Iterator[InputItem]:
    for _, source in SOURCES.items():
        if source.claims(arg):
            yield from source.expand(arg, options)
            return


def walk_images(root: Path) -> Iterator[Path]:
    """Image files under ``root``, depth-first, sorted by name in each folder; symlinked dirs not followed.
    Entries that cannot be read (see :func:`walk_entries`) are left out."""
    return (Path(path) for path, problem in walk_entries(str(root)) if problem is None)


def walk_entries(root: str) -> Iterator[tuple[str, str | None]]:
    """Every image-named entry under ``root`` and every folder that cannot be listed, depth-first, sorted by
    name in each folder (symlinked folders are not followed): ``(path, None)`` for a file to read, or
    ``(path, why)`` for what cannot be one (a folder that cannot be read, a dangling link, a link loop, a pipe
    or device named like an image), so that nothing a user named disappears without a record."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as e:
            yield folder, f"cannot read folder: {e.strerror or e}"
            continue
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
                    continue
            except OSError as e:
                yield entry.path, f"cannot read: {e.strerror or e}"
                continue
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                yield entry.path, _not_a_file(entry)
        stack.extend(reversed(subdirs))


def _not_a_file(entry: os.DirEntry[str]) -> str | None:
    """Why an image-named entry cannot be read as a file, or None when it can be tried."""
    try:
        if entry.is_file():  # a regular file: known from the listing, no system call
            return None
    except OSError:
        pass
    try:
        mode = os.stat(entry.path).st_mode  # follows links, never opens: a FIFO cannot block here
    except OSError as e:
        if entry.is_symlink():
            if e.errno == errno.ELOOP:
                return "symbolic link loop"
            if e.errno == errno.ENOENT:
                return "dangling symbolic link (its target does not exist)"
        return f"cannot read: {e.strerror or e}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a link to a folder (folder links are not followed)"
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    what = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"{what}, not an image file"


def count_items(args: Iterable[str], options: SourceOptions | None = None) -> int | None:
    """How many items ``args`` will expand to, or None if unknowable (stdin; shards and tables, which
    counting would read). Walks, stores nothing."""
    total = 0
    for arg in args:
        if arg == "-" or SOURCES.get("shards").claims(arg) or SOURCES.get("table").claims(arg):
            return None
        total += sum(1 for _ in _expand_one(arg, options))
    return total
