"""The result cache: model outputs keyed by (model/preprocessing namespace, sha256 of the file's bytes).

:class:`ResultCache` is the interface the orchestrator uses; :class:`MemoryCache` is a bounded in-process
implementation (tests, and in-run dedupe of repeated content). Persistent caches are chosen by location
(:func:`open_cache`): a path is a SQLite file (:mod:`wanwu.cache.sqlite`, one machine), ``redis://HOST:PORT/DB``
a Redis database (:mod:`wanwu.cache.redis`, shared by a cluster). Both store the same keys and the same bytes
(:mod:`wanwu.cache.codec`). The schemes are a :class:`~wanwu.registry.Registry` (:data:`CACHES`, entry-point
group ``wanwu.caches``): a plug-in adds one as ``scheme = "package.module:opener"``, ``opener(location)``
returning a :class:`ResultCache`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from wanwu.errors import CacheError, MissingExtraError, UsageError
from wanwu.records import TopScores
from wanwu.registry import Registry


@dataclass(slots=True)
class CachedResult:
    """A result as the caches keep it. Treated as immutable (runs share it), not frozen: see TopScores."""

    top: TopScores
    width: int
    height: int
    warnings: tuple[str, ...] = ()  # what the decoder said about the file: part of its record


class ResultCache(Protocol):
    def get_many(self, namespace: str, keys: list[str]) -> dict[str, CachedResult]: ...

    def put_many(self, namespace: str, items: Iterable[tuple[str, CachedResult]]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class NamespaceStats:
    name: str
    entries: int
    payload_bytes: int
    oldest: int | None  # unix seconds the oldest entry was written
    newest: int | None
    last_access: int | None


@dataclass(frozen=True)
class CacheStats:
    path: str
    exists: bool
    entries: int = 0
    bytes_on_disk: int = 0  # the database file plus its write-ahead log
    oldest: int | None = None
    newest: int | None = None
    last_access: int | None = None
    namespaces: list[NamespaceStats] = field(default_factory=list)

    @property
    def bytes_per_entry(self) -> float:
        return self.bytes_on_disk / self.entries if self.entries else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_per_entry"] = round(self.bytes_per_entry, 1)
        return out


@dataclass(frozen=True)
class PruneResult:
    removed: int
    bytes_before: int
    bytes_after: int


class PersistentCache(ResultCache, Protocol):
    """A cache that outlives the process (SQLite, Redis): the maintenance calls of ``wanwu cache``."""

    def stats(self) -> CacheStats: ...

    def clear(self, namespace: str | None = None) -> int: ...

    def prune(self, *, older_than: float | None = None, max_size: int | None = None) -> PruneResult: ...

    def __enter__(self) -> PersistentCache: ...

    def __exit__(self, *exc: object) -> None: ...


class OneThreadCache:
    """Opens a :class:`ResultCache` and runs every call on it on one thread of its own.

    Implementations need not be thread-safe (a sqlite connection, an LRU), yet concurrent runs of one
    :class:`~wanwu.pipeline.Recognizer` (the service's requests) share the cache through this.
    """

    def __init__(self, open: Callable[[], ResultCache]) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="wanwu-cache")
        try:
            self.inner = self._thread.submit(open).result()
        except BaseException:
            self._thread.shutdown(wait=False)
            raise

    def get_many(self, namespace: str, keys: list[str]) -> dict[str, CachedResult]:
        return self._thread.submit(self.inner.get_many, namespace, keys).result()

    def put_many(self, namespace: str, items: Iterable[tuple[str, CachedResult]]) -> None:
        self._thread.submit(self.inner.put_many, namespace, list(items)).result()

    def close(self) -> None:
        try:
            self._thread.submit(self.inner.close).result()
        finally:
            self._thread.shutdown(wait=True)


class MemoryCache:
    """An LRU of at most ``capacity`` results."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._data: OrderedDict[tuple[str, str], CachedResult] = OrderedDict()

    def get_many(self, namespace: str, keys: list[str]) -> dict[str, CachedResult]:
        out = {}
        for key in keys:
            hit = self._data.get((namespace, key))
            if hit is not None:
                self._data.move_to_end((namespace, key))
                out[key] = hit
        return out

    def put_many(self, namespace: str, items: Iterable[tuple[str, CachedResult]]) -> None:
        for key, value in items:
            self._data[(namespace, key)] = value
            self._data.move_to_end((namespace, key))
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def close(self) -> None:
        self._data.clear()


# --- choosing a cache by location -------------------------------------------------------------------------

CacheOpener = Callable[[str], PersistentCache]
CACHES: Registry[CacheOpener] = Registry("result cache", group="wanwu.caches")
CACHES.lazy("sqlite", "wanwu.cache.sqlite:open_location")
CACHES.lazy("redis", "wanwu.cache.redis:RedisCache", extra="queue")
CACHES.lazy("rediss", "wanwu.cache.redis:RedisCache", extra="queue")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def cache_scheme(location: str) -> str:
    """The registry entry for ``location``: its ``SCHEME://``, or ``sqlite`` for a plain path. An unknown
    scheme is a :class:`~wanwu.errors.UsageError` (never a file named after it)."""
    match = _SCHEME.match(location)
    if match is None:
        return "sqlite"
    scheme = match.group(1).lower()
    if scheme not in CACHES:
        raise UsageError(
            f"--cache {location!r}: unsupported scheme '{scheme}://'; a cache is a file path or "
            f"one of {', '.join(f'{name}://' for name in CACHES.names())}"
        )
    return scheme


def open_cache(location: str) -> PersistentCache:
    """The persistent result cache at ``location`` (a path, ``sqlite:///path``, ``redis://HOST:PORT/DB``)."""
    scheme = cache_scheme(location)
    try:
        opener = CACHES.get(scheme)
    except MissingExtraError:
        raise
    except ImportError as e:  # a Python built without sqlite3, say
        raise CacheError(f"the result cache is not available ({e}); run with --no-cache") from e
    return opener(location)
