"""Inputs: what the user named, expanded lazily into items, and each item's bytes fetched.

Expansion is a registry of :class:`Source` kinds tried in order (stdin, URL, folder, glob, file), and it is
lazy: a folder of a million photos is walked as it is consumed, never listed in memory. A file named
explicitly is always attempted, whatever its extension; folder walks pick files by image extension.
Anything that yields no item still yields one (an error record), so no input silently disappears.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TextIO

from wanwu.errors import ErrorType, FetchError, InputError, NotFoundError, TooLargeError

if TYPE_CHECKING:
    import httpx

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".mpo"}
)
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
ItemKind = Literal["file", "url", "bytes", "missing"]


@dataclass(frozen=True, slots=True)
class InputItem:
    """One thing to recognize. ``input`` is what appears in its record."""

    input: str
    kind: ItemKind
    locator: str = ""  # path or URL; for "missing" the reason
    data: bytes | None = None  # kind == "bytes": uploaded content
    error_type: ErrorType = "not_found"

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> InputItem:
        return cls(name, "bytes", data=data)


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


def _is_url(arg: str) -> bool:
    return arg.lower().startswith(("http://", "https://"))


def _is_glob(arg: str) -> bool:
    return globlib.has_magic(arg) and not os.path.exists(arg)


def _expand_url(arg: str) -> Iterator[InputItem]:
    yield InputItem(arg, "url", arg)


def _expand_dir(arg: str) -> Iterator[InputItem]:
    found = False
    for path in walk_images(Path(arg)):
        found = True
        yield InputItem(str(path), "file", str(path))
    if not found:
        yield InputItem(arg, "missing", "folder contains no image files")


def _expand_glob(arg: str) -> Iterator[InputItem]:
    found = False
    for match in globlib.iglob(arg, recursive=True):
        if os.path.isdir(match):
            continue
        found = True
        yield InputItem(match, "file", match)
    if not found:
        yield InputItem(arg, "missing", "no file matches this pattern")


def _expand_file(arg: str) -> Iterator[InputItem]:
    yield InputItem(arg, "file", arg)


SOURCES: list[Source] = [
    _Source("url", _is_url, _expand_url),
    _Source("folder", os.path.isdir, _expand_dir),
    _Source("glob", _is_glob, _expand_glob),
    _Source("file", lambda arg: True, _expand_file),
]


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
    for source in SOURCES:
        if source.claims(arg):
            yield from source.expand(arg)
            return


def walk_images(root: Path) -> Iterator[Path]:
    """Image files under ``root``, depth-first, sorted by name in each folder; symlinked dirs not followed."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(Path(entry.path))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    yield Path(entry.path)
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


# --- fetching -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fetched:
    data: bytes
    sha256: str


class Fetcher:
    """Reads files and downloads URLs with a size limit and timeouts; thread-safe."""

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 30.0, allow_private: bool = False
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout  # the whole download, not each read
        self.allow_private = allow_private  # see wanwu.netguard: by default only public addresses
        self._client: httpx.Client | None = None

    def fetch(self, item: InputItem) -> Fetched:
        """Raises :class:`~wanwu.errors.InputError` with the reason."""
        if item.kind == "missing":
            raise NotFoundError(item.locator)
        if item.kind == "bytes":
            data = item.data or b""
            self._check_size(len(data))
        elif item.kind == "url":
            data = self._download(item.locator)
        else:
            data = self._read(item.locator)
        return Fetched(data, hashlib.sha256(data).hexdigest())

    def _check_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise TooLargeError(f"{size:,} bytes, above the limit of {self.max_bytes:,}")

    def _read(self, path: str) -> bytes:
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it would hold the thread for ever);
            # anything but a regular file is then refused before a byte is read.
            with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                if stat.S_ISDIR(mode):
                    raise NotFoundError("is a folder, not a file")
                if not stat.S_ISREG(mode):
                    raise FetchError("not a regular file (a pipe, socket or device)")
                self._check_size(os.fstat(f.fileno()).st_size)
                return f.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise NotFoundError("no such file") from None
        except IsADirectoryError:
            raise NotFoundError("is a folder, not a file") from None
        except PermissionError:
            raise FetchError("permission denied") from None
        except InputError:
            raise
        except OSError as e:
            raise FetchError(f"cannot read file: {e.strerror or e}") from None

    def _download(self, url: str) -> bytes:
        import httpx

        from wanwu.netguard import deadline

        client = self._http()
        try:
            with deadline(self.timeout), client.stream("GET", url) as response:
                if response.status_code in (404, 410):
                    raise NotFoundError(f"HTTP {response.status_code} from {url}")
                if response.status_code >= 400:
                    raise FetchError(f"HTTP {response.status_code} from {url}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit():
                    self._check_size(int(declared))
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    self._check_size(size)
                    chunks.append(chunk)
                return b"".join(chunks)
        except InputError:
            raise
        except httpx.TimeoutException:
            raise FetchError(f"timed out after {self.timeout:g}s fetching {url}") from None
        except httpx.HTTPError as e:
            raise FetchError(f"cannot fetch {url}: {type(e).__name__}: {e}") from None

    def _http(self) -> httpx.Client:
        from wanwu.netguard import guarded_client

        if self._client is None:
            self._client = guarded_client(self.timeout, self.allow_private)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None
