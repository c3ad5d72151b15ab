"""The stat memo in a Redis database: the memo of a cluster whose result cache is Redis.

One key per input under ``wanwu:m:`` (beside the result cache's ``wanwu:r:`` in the same database), its value
``<stamp>\\0<32 raw bytes of the sha256><checked, 8 bytes little-endian>``. Local files' keys name their
machine (:func:`wanwu.cache.memo.file_key`), so machines sharing the database never answer for each other's
files; objects and URLs are shared by every machine.

As with the SQLite memo, nothing here fails a run: a server that cannot be reached is a miss (a warning once per
outage), an entry that cannot be read back is a miss.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable
from typing import Any

from wanwu.cache.memo import MemoStats, Remembered
from wanwu.errors import CacheError

log = logging.getLogger("wanwu")

PREFIX = b"wanwu:m:"
_CHECKED = struct.Struct("<q")
_CHUNK = 500


def encode_entry(entry: Remembered) -> bytes:
    return entry.stamp.encode() + b"\0" + bytes.fromhex(entry.sha256) + _CHECKED.pack(entry.checked_ns)


def decode_entry(value: bytes) -> Remembered:
    """ValueError for anything damaged."""
    stamp, sep, rest = value.partition(b"\0")
    if not sep or len(rest) != 32 + _CHECKED.size:
        raise ValueError("damaged memo entry")
    return Remembered(stamp.decode(), rest[:32].hex(), _CHECKED.unpack_from(rest, 32)[0])


class RedisMemo:
    """A :class:`~wanwu.cache.memo.Memo` in Redis (``client``: a ``redis.Redis``, shared and thread-safe)."""

    def __init__(self, client: Any, name: str = "redis") -> None:
        self.client = client
        self.name = name  # for messages (the URL without its password)
        self._failing = False

    def get_many(self, keys: list[str]) -> dict[str, Remembered]:
        out: dict[str, Remembered] = {}
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            values = self._soft("read", lambda c=chunk: self.client.mget([_key(k) for k in c]))
            for key, value in zip(chunk, values or [], strict=False):
                if value is None:
                    continue
                try:
                    out[key] = decode_entry(value)
                except (ValueError, UnicodeError):  # an entry that cannot be read back: a miss, rewritten
                    continue
        return out

    def put_many(self, entries: Iterable[tuple[str, Remembered]]) -> None:
        values = {}
        for key, entry in entries:
            try:
                values[_key(key)] = encode_entry(entry)
            except (ValueError, UnicodeError):
                continue
        if values:
            self._soft("write", lambda: self.client.mset(values))

    def close(self) -> None:
        """Nothing of its own: the client is the process's, shared."""

    def __enter__(self) -> RedisMemo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- maintenance ----------------------------------------------------------------------------------

    def stats(self) -> MemoStats:
        try:
            entries = files = 0
            for key in self.client.scan_iter(match=PREFIX + b"*", count=1000):
                entries += 1
                files += key.startswith(PREFIX + b"f:")
            memory = int(self.client.info("memory").get("used_memory", 0))
        except Exception as e:  # redis-py's errors are not OSErrors
            raise CacheError(f"memo {self.name}: cannot read it: {e}") from e
        return MemoStats(self.name, True, entries, files, memory)

    def prune(self, machine: str) -> int:
        """Drop the entries of this machine's files that no longer exist. Returns how many."""
        prefix = PREFIX + f"f:{machine}:".encode()
        removed = 0
        try:
            gone = []
            for key in self.client.scan_iter(match=prefix + b"*", count=1000):
                if not os.path.lexists(key[len(prefix):]):
                    gone.append(key)
                if len(gone) >= _CHUNK:
                    removed += int(self.client.unlink(*gone))
                    gone = []
            if gone:
                removed += int(self.client.unlink(*gone))
        except Exception as e:
            raise CacheError(f"memo {self.name}: cannot prune it: {e}") from e
        return removed

    def _soft(self, what: str, call: Any) -> Any:
        try:
            result = call()
        except Exception as e:  # a server that cannot be reached is a miss, not a failed run
            if not self._failing:
                log.warning("memo %s: cannot %s it (%s); carrying on without it", self.name, what, e)
            self._failing = True
            return None
        self._failing = False
        return result


def _key(key: str) -> bytes:
    return PREFIX + key.encode("utf-8", "surrogateescape")
