"""The shared result cache: one Redis database that every machine of a cluster reads and writes.

Chosen by location: ``--cache redis://[:PASSWORD@]HOST:PORT/DB`` (or ``rediss://`` for TLS), or ``WANWU_CACHE``;
the CLI, the service, the queue workers and every Ray node open the same one. Keys and content are the SQLite
cache's (:mod:`wanwu.cache.codec`), so a record from either is the same record:

* ``wanwu:r:<namespace>:<32 raw bytes of the sha256>`` → ``<BIIqH`` header (layout version, width, height,
  unix time written, length of the scores) + the encoded scores + the decoder's warnings (JSON, or nothing);
* ``wanwu:r:namespaces``: the set of namespaces written (for ``wanwu cache stats`` and ``clear``).

Everything lives under ``wanwu:r:``; other stores of wanwu's may sit beside it in the same database under
prefixes of their own, sharing this process's client (:func:`client_for`).

Redis bounds its own memory: give it ``maxmemory`` and ``maxmemory-policy allkeys-lru`` and the least
recently used results go first, which is what ``wanwu cache prune --max-size`` does for a SQLite file.

As with SQLite, recognition never fails because of the cache: a server that cannot be reached during a run is
a warning (once per outage) and misses; the maintenance calls raise :class:`~wanwu.errors.CacheError`.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from wanwu.cache import CachedResult, CacheStats, NamespaceStats, PruneResult
from wanwu.cache.codec import decode_top, decode_warnings, encode_top, key_blob
from wanwu.errors import CacheError, MissingExtraError, UsageError

log = logging.getLogger("wanwu")

PREFIX = b"wanwu:r:"
NAMESPACES = PREFIX + b"namespaces"
_VALUE = struct.Struct("<BIIqH")  # layout version, width, height, written (unix s), length of the scores
_LAYOUT = 1
_CHUNK = 500  # keys per MGET / MSET

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def client_for(url: str) -> Any:
    """One ``redis.Redis`` per URL in this process (thread-safe; redis-py reconnects after a fork)."""
    try:
        import redis
    except ImportError:
        raise MissingExtraError("redis", "queue", "A Redis result cache") from None
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            try:
                client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
            except ValueError as e:
                raise UsageError(f"--cache {safe_url(url)}: {e}") from None
            _clients[url] = client
        return client


def safe_url(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def encode_value(result: CachedResult, written: int) -> bytes:
    top = encode_top(result.top)
    said = json.dumps(list(result.warnings), ensure_ascii=False).encode() if result.warnings else b""
    return _VALUE.pack(_LAYOUT, int(result.width), int(result.height), written, len(top)) + top + said


def decode_value(value: bytes) -> tuple[CachedResult, int]:
    """The result and when it was written; ValueError for anything damaged."""
    if len(value) < _VALUE.size:
        raise ValueError("truncated entry")
    layout, width, height, written, size = _VALUE.unpack_from(value)
    if layout != _LAYOUT:
        raise ValueError(f"unknown entry layout {layout}")
    top = decode_top(value[_VALUE.size : _VALUE.size + size])
    said = value[_VALUE.size + size :]
    return CachedResult(top, width, height, decode_warnings(said.decode() if said else None)), written


class RedisCache:
    """A :class:`~wanwu.cache.ResultCache` in a Redis database. Thread-safe; shared by any number of machines."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = client_for(url)
        self._failing = False  # warned about an outage; reset by the next call that works

    def _key(self, namespace: str, key: str) -> bytes:
        return PREFIX + namespace.encode() + b":" + key_blob(key)

    # -- ResultCache --------------------------------------------------------------------------------

    def get_many(self, namespace: str, keys: list[str]) -> dict[str, CachedResult]:
        out: dict[str, CachedResult] = {}
        for chunk in _chunks(list(dict.fromkeys(keys)), _CHUNK):
            values = self._soft("read", lambda c=chunk: self.client.mget([self._key(namespace, k) for k in c]))
            for key, value in zip(chunk, values or [], strict=False):
                if value is None:
                    continue
                try:
                    out[key] = decode_value(value)[0]
                except ValueError as e:  # a damaged entry is a miss (and is rewritten), not a broken cache
                    log.debug("result cache %s: unreadable entry (%s); treated as a miss", safe_url(self.url), e)
        return out

    def put_many(self, namespace: str, items: Iterable[tuple[str, CachedResult]]) -> None:
        now = int(time.time())
        entries = {self._key(namespace, key): encode_value(result, now) for key, result in items}
        if not entries:
            return

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.sadd(NAMESPACES, namespace)
            for chunk in _chunks(list(entries), _CHUNK):
                pipe.mset({k: entries[k] for k in chunk})
            pipe.execute()

        self._soft("write", write)

    def close(self) -> None:
        """Nothing of its own to close: the connection pool is this process's, shared (:func:`client_for`)."""

    def __enter__(self) -> RedisCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- maintenance ---------------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        with self._errors("read"):
            namespaces = []
            for name in sorted(n.decode() for n in self.client.smembers(NAMESPACES)):
                entries, payload, written = 0, 0, []
                for keys in self._scan(name):
                    pipe = self.client.pipeline(transaction=False)
                    for key in keys:
                        pipe.strlen(key)
                        pipe.getrange(key, 0, _VALUE.size - 1)
                    answers = pipe.execute()
                    for size, head in zip(answers[::2], answers[1::2], strict=True):
                        if len(head) == _VALUE.size:
                            entries += 1
                            payload += size
                            written.append(_VALUE.unpack(head)[3])
                if entries:
                    namespaces.append(NamespaceStats(name, entries, payload, min(written), max(written), None))
            memory = int(self.client.info("memory").get("used_memory", 0))
        return CacheStats(
            safe_url(self.url), exists=True, entries=sum(n.entries for n in namespaces), bytes_on_disk=memory,
            oldest=min((n.oldest for n in namespaces if n.oldest is not None), default=None),
            newest=max((n.newest for n in namespaces if n.newest is not None), default=None),
            namespaces=namespaces,
        )

    def clear(self, namespace: str | None = None) -> int:
        """Remove every entry, or those of one namespace (a unique prefix is enough). Returns how many."""
        with self._errors("clear"):
            names = [n.decode() for n in self.client.smembers(NAMESPACES)]
            if namespace is not None:
                names = [_match(names, namespace)]
            removed = 0
            for name in names:
                for keys in self._scan(name):
                    removed += int(self.client.unlink(*keys))
                self.client.srem(NAMESPACES, name)
            return removed

    def prune(self, *, older_than: float | None = None, max_size: int | None = None) -> PruneResult:
        """Remove entries not used for ``older_than`` seconds. ``max_size`` is the server's own business."""
        if max_size is not None:
            raise CacheError("a Redis cache bounds its size itself: set maxmemory and maxmemory-policy "
                             "allkeys-lru on the server")
        before = self.stats().bytes_on_disk
        removed = 0
        with self._errors("prune"):
            for name in [n.decode() for n in self.client.smembers(NAMESPACES)]:
                for keys in self._scan(name):
                    pipe = self.client.pipeline(transaction=False)
                    for key in keys:
                        pipe.object("idletime", key)
                    idle = pipe.execute()
                    stale = [k for k, t in zip(keys, idle, strict=True) if older_than is not None
                             and t is not None and t >= older_than]
                    if stale:
                        removed += int(self.client.unlink(*stale))
        return PruneResult(removed, before, self.stats().bytes_on_disk)

    # -- internals -----------------------------------------------------------------------------------

    def _scan(self, namespace: str) -> Iterator[list[bytes]]:
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=PREFIX + namespace.encode() + b":*", count=1000):
            batch.append(key)
            if len(batch) >= _CHUNK:
                yield batch
                batch = []
        if batch:
            yield batch

    def _soft(self, what: str, call: Any) -> Any:
        """A call during a run: an outage is a warning (once) and a miss, never a failed run."""
        import redis

        try:
            answer = call()
        except redis.RedisError as e:
            if not self._failing:
                log.warning("result cache %s: cannot %s it (%s); carrying on without it until it answers",
                            safe_url(self.url), what, e)
            self._failing = True
            return None
        self._failing = False
        return answer

    def _errors(self, what: str) -> _Errors:
        return _Errors(safe_url(self.url), what)


def _match(names: list[str], prefix: str) -> str:
    found = [n for n in names if n.startswith(prefix.lower())] if prefix else []
    if len(found) != 1:
        raise CacheError(
            f"no namespace starts with {prefix!r}" if not found
            else f"{prefix!r} matches {len(found)} namespaces; give more characters"
        )
    return found[0]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _Errors:
    """Turns Redis errors of a maintenance call into :class:`CacheError`."""

    def __init__(self, where: str, what: str) -> None:
        self.where, self.what = where, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        import redis

        if isinstance(exc, redis.RedisError):
            raise CacheError(f"cache {self.where}: cannot {self.what}: {exc}") from exc
