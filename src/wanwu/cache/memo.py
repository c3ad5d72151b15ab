"""The stat memo: what an input's sha256 was, the last time it was read, and how to tell it is unchanged.

A rerun over a collection where almost nothing changed should not read almost everything again. The memo
maps an input to the sha256 of its bytes together with a *stamp* observed before those bytes were read:

* a local file: ``device:inode:size:mtime_ns`` (:func:`file_stamp`), under a key that names this machine and
  the file's absolute path (:func:`file_key`), so an entry written on another machine never matches. (Not the
  ctime: it changes whenever a hard link to the file is made or removed anywhere, or its owner or mode
  changes, and backup tools do that every night without touching a byte);
* an object (``s3://``): ``size:ETag:version`` from the listing;
* a URL: the response's ``ETag`` (or ``Last-Modified``), revalidated with a conditional GET.

An entry is only ever a hint about *which* content a file holds: the answer itself still comes from the result
cache, keyed by that content. A file's entry is trusted (:func:`trusted_file`) when its stamp is the same and
the file was last modified at least :data:`RACY_NS` before the entry was taken (git's "racy timestamp" rule: a
change within the same timestamp tick as the read leaves the stamp as it was).

:class:`Memo` is the protocol a store implements (:class:`~wanwu.cache.memo_sqlite.SqliteMemo`, one file beside
the result cache). A damaged store, or an entry that cannot be read back, is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Protocol

RACY_NS = 2_000_000_000
"""A file modified less than this before its entry was taken is read again next time (FAT's 2 s tick)."""


class Remembered(NamedTuple):
    """One memo entry: the stamp observed before reading, the sha256 of what was read, and when (ns)."""

    stamp: str
    sha256: str
    checked_ns: int


class Memo(Protocol):
    """Keys to :class:`Remembered` entries. Implementations are thread-safe, and never raise for a store
    that cannot be read or written during a run (a miss, an entry not kept)."""

    def get_many(self, keys: list[str]) -> dict[str, Remembered]: ...

    def put_many(self, entries: Iterable[tuple[str, Remembered]]) -> None: ...

    def close(self) -> None: ...


@lru_cache(maxsize=1)
def machine_id() -> str:
    """A short, stable name of this machine (``/etc/machine-id`` and the host name, hashed)."""
    ident = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            ident = Path(path).read_text().strip()
        except OSError:
            continue
        if ident:
            break
    return hashlib.sha256(f"{ident}\0{os.uname().nodename}".encode()).hexdigest()[:16]


def file_key(path: str, machine: str) -> str:
    """The memo key of a local file: this machine, then the absolute path."""
    return f"f:{machine}:{path if path.startswith('/') else os.path.abspath(path)}"


def file_stamp(st: os.stat_result) -> str | None:
    """The stamp of a regular file (None for anything else: pipes, folders, devices are never memoized)."""
    if not stat.S_ISREG(st.st_mode):
        return None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def trusted_file(entry: Remembered, stamp: str, mtime_ns: int) -> bool:
    """The file is unchanged since ``entry`` was taken: the same stamp (device, inode, size, mtime), and it had
    not been modified within :data:`RACY_NS` of the moment the entry's stamp was observed."""
    return entry.stamp == stamp and mtime_ns < entry.checked_ns - RACY_NS


def object_stamp(size: object, etag: object, version: object = None) -> str | None:
    """The stamp of an object from its listing: size, ETag (quotes dropped) and version id (None: no ETag)."""
    if not etag or size is None:
        return None
    return f"{size}:{str(etag).strip(chr(34))}:{version or ''}"


@dataclass(frozen=True)
class MemoStats:
    path: str
    exists: bool
    entries: int = 0
    files: int = 0  # entries of local files (any machine)
    bytes_on_disk: int = 0


def memo_path(cache_path: Path) -> Path:
    """The memo file beside a SQLite result cache: ``cache.sqlite3`` → ``cache-memo.sqlite3``."""
    return cache_path.with_name(f"{cache_path.stem}-memo{cache_path.suffix}")
