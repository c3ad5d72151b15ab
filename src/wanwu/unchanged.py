"""Inputs answered without being read: the stat memo (:mod:`wanwu.cache.memo`) asked before any fetch.

:class:`Prober` is the one place that decides whether an input is unchanged since it was last read, for every
runner (the orchestrator, the Ray stage, through it the queue workers):

* :meth:`Prober.probe` takes a batch of inputs, stats the local files, looks their keys (and those of objects
  and URLs) up in the memo in one go, and the trusted sha256s up in the result cache in one go. An input whose
  stamp is unchanged and whose result is cached is answered from it, never opened or downloaded. A URL whose
  result is cached is revalidated (a conditional GET; a 304 is a hit).
* :func:`remember` turns what a fetch read into the memo entry to store, keyed by the stamp observed *before*
  the read, so that any later change shows as a different stamp.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wanwu.cache import CachedResult, ResultCache, cache_scheme
from wanwu.cache import memo as memos
from wanwu.cache.memo import Memo, Remembered
from wanwu.config import RecognizeOptions
from wanwu.fetch import Fetched
from wanwu.sources import InputItem

_MD5 = re.compile(r"[0-9a-f]{32}")


@dataclass(slots=True)
class Look:
    """What the memo says about one input: its key, the stamp seen now (files, objects; a URL's comes with
    its response), and the memo's sha256 when it may be used (``revalidate``: only after a conditional GET)."""

    key: str
    stamp: str | None
    checked_ns: int
    mtime_ns: int = 0  # a file's
    sha256: str | None = None
    known: Remembered | None = None  # URL: the entry to revalidate
    revalidate: bool = False
    cached: CachedResult | None = None  # URL: its cached result, if the server says it is not modified


@dataclass(frozen=True, slots=True)
class Probed:
    looks: list[Look | None]  # one per input (None: not memoized, e.g. uploaded bytes)
    hits: dict[str, CachedResult]  # by sha256: results of inputs the memo vouches for

    def answer(self, i: int) -> tuple[str, CachedResult] | None:
        """Input ``i``'s sha256 and cached result, when it is answered without any read."""
        look = self.looks[i]
        if look is None or look.sha256 is None or look.revalidate:
            return None
        hit = self.hits.get(look.sha256)
        return None if hit is None else (look.sha256, hit)


class Prober:
    """Stats, memo lookups and cache lookups for batches of inputs. Thread-safe (the memo and cache are)."""

    def __init__(self, memo: Memo, *, rehash: bool = False, max_bytes: int | None = None) -> None:
        self.memo = memo
        self.rehash = rehash  # look nothing up (every input is read again), but remember what is read
        self.max_bytes = max_bytes  # a larger file is read (and refused as too large), never answered
        self.machine = memos.machine_id()

    def close(self) -> None:
        self.memo.close()

    def probe(self, items: Sequence[InputItem], cache: ResultCache | None, namespace: str) -> Probed:
        looks = [self._look(item) for item in items]
        if self.rehash:
            return Probed(looks, {})
        keyed = [look for look in looks if look is not None]
        known = self.memo.get_many([look.key for look in keyed]) if keyed else {}
        for look in keyed:
            entry = known.get(look.key)
            if entry is not None:
                self._judge(look, entry)
        shas = list({look.sha256 for look in keyed if look.sha256 is not None})
        hits = cache.get_many(namespace, shas) if cache is not None and shas else {}
        for look in keyed:
            if look.revalidate and look.sha256 is not None:
                look.cached = hits.get(look.sha256)
        return Probed(looks, hits)

    def _look(self, item: InputItem) -> Look | None:
        if item.kind == "file":
            checked = time.time_ns()  # before the stat: a change after it shows in a later stamp
            try:
                st = os.stat(item.locator)
            except (OSError, ValueError):  # the fetch says what is wrong with it
                return None
            stamp = memos.file_stamp(st)
            if stamp is None or (self.max_bytes is not None and st.st_size > self.max_bytes):
                return None
            return Look(memos.file_key(item.locator, self.machine), stamp, checked, st.st_mtime_ns)
        if item.kind == "object":
            size = item.stamp.split(":", 1)[0] if item.stamp else ""
            if not size.isdigit() or (self.max_bytes is not None and int(size) > self.max_bytes):
                return None  # no listing to vouch for it, or too large: read (and refused)
            return Look(item.locator, item.stamp, time.time_ns())
        if item.kind == "url":
            return Look(item.locator, None, time.time_ns())
        return None

    @staticmethod
    def _judge(look: Look, entry: Remembered) -> None:
        if look.stamp is None:  # a URL: its result may be used once the server says it is not modified
            look.sha256, look.known, look.revalidate = entry.sha256, entry, True
        elif look.key.startswith("f:"):
            if memos.trusted_file(entry, look.stamp, look.mtime_ns):
                look.sha256 = entry.sha256
        elif entry.stamp == look.stamp:
            look.sha256 = entry.sha256


def open_memo(options: RecognizeOptions) -> Memo | None:
    """The stat memo beside the options' result cache: a SQLite file beside a SQLite cache, keys beside a Redis
    cache's in the same database (a cluster's shared memo); None for a cache of a plug-in's scheme, or a Python
    without sqlite3 (every input is then read)."""
    location = options.cache_location()
    opener = _MEMOS.get(cache_scheme(location))
    if opener is None:
        return None
    try:
        return opener(location)
    except ImportError:
        return None


def _sqlite_memo(location: str) -> Memo:
    from wanwu.cache.memo_sqlite import SqliteMemo

    if location.lower().startswith("sqlite://"):
        location = location[len("sqlite://"):]
    return SqliteMemo(memos.memo_path(Path(location)))


def _redis_memo(location: str) -> Memo:
    from wanwu.cache.memo_redis import RedisMemo
    from wanwu.cache.redis import client_for, safe_url

    return RedisMemo(client_for(location), safe_url(location))


_MEMOS: dict[str, Callable[[str], Memo]] = {"sqlite": _sqlite_memo, "redis": _redis_memo, "rediss": _redis_memo}


def remember(look: Look | None, fetched: Fetched) -> tuple[str, Remembered] | None:
    """The memo entry for what a fetch read (None: nothing to remember, or nothing that can be vouched for)."""
    if look is None:
        return None
    stamp = look.stamp if look.stamp is not None else fetched.validator
    if stamp is None:
        return None
    if not look.key.startswith("f:") and look.stamp is not None and not fetched.not_modified:
        etag = stamp.split(":")[1]  # an object: a single-part ETag is the MD5 of the bytes; they must agree
        if _MD5.fullmatch(etag) and hashlib.md5(fetched.data, usedforsecurity=False).hexdigest() != etag:
            return None  # overwritten between the listing and the read: not remembered
    return look.key, Remembered(stamp, fetched.sha256, look.checked_ns)
