"""The embedded result cache: one SQLite file (WAL), shared safely by any number of processes.

Layout (schema version :data:`SCHEMA_VERSION`, kept in ``PRAGMA user_version``)::

    namespaces(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE, created)
    results(ns, key BLOB(32), top BLOB, width, height, created, accessed, warnings TEXT)
        PRIMARY KEY (ns, key), WITHOUT ROWID

``key`` is the raw 32-byte sha256 of the file, ``top`` the compact encoding of a
:class:`~wanwu.records.TopScores` (see :func:`encode_top`: about 310 bytes for the top 50), ``warnings`` what
the decoder said about the file (a JSON list; NULL when nothing, as for almost every file), so that a cached
record is the record a fresh run writes. ``warnings`` came after schema 1 without a new version: it is added
on open when missing, and an older wanwu, which names the columns it reads and writes, keeps working on the
file (what it writes has no warnings). Namespace ids are
never reused (AUTOINCREMENT), so clearing a namespace while another process is running can never make its
old id point at a different model.

Concurrency: WAL lets readers run beside one writer; every write is one short ``BEGIN IMMEDIATE``
transaction and waits up to ``timeout`` seconds for the lock (``busy_timeout``). The file and its parent
folders are created lazily, on the first write; reads of a cache that does not exist yet are misses.

Recognition never fails because of the cache: if the file cannot be read or written during a run, a warning
is logged once and the run carries on uncached. The maintenance calls (:meth:`SqliteCache.stats`,
:meth:`~SqliteCache.clear`, :meth:`~SqliteCache.prune`) raise :class:`~wanwu.errors.CacheError` instead.

Last access is recorded cheaply: hits are remembered in memory and written in batches, and only when the
stored time is older than ``touch_interval`` seconds, so a warm rerun costs a handful of small writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from wanwu.cache import CachedResult
from wanwu.errors import CacheError
from wanwu.records import TopScores

log = logging.getLogger("wanwu")

SCHEMA_VERSION = 1
_BLOB_VERSION = 1
_HEADER = struct.Struct("<BBBxd")  # blob version, flags, n, pad, logsumexp
_FLAG_U16 = 1  # indices stored as uint16 (every index < 65536), else int32
_FLAG_EMBEDDING = 2  # a float32 embedding follows the values (namespaces of runs that embed)
_CHUNK = 500  # keys per SELECT ... IN (...)
_TOUCH_BATCH = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    ns INTEGER NOT NULL,
    key BLOB NOT NULL,
    top BLOB NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    created INTEGER NOT NULL,
    accessed INTEGER NOT NULL,
    warnings TEXT,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
"""

T = TypeVar("T")


# --- the blob ---------------------------------------------------------------------------------------------


def encode_top(top: TopScores) -> bytes:
    """Header (12 bytes) + indices (uint16 when they fit, else int32) + float32 values; exact round trip."""
    n = len(top.indices)
    if n > 255 or len(top.values) != n:
        raise ValueError(f"cannot store {n} scores (at most 255, one value per index)")
    small = n == 0 or (int(top.indices.max()) < 65536 and int(top.indices.min()) >= 0)
    indices = np.asarray(top.indices, dtype="<u2" if small else "<i4")
    values = np.asarray(top.values, dtype="<f4")
    flags = (_FLAG_U16 if small else 0) | (_FLAG_EMBEDDING if top.embedding is not None else 0)
    header = _HEADER.pack(_BLOB_VERSION, flags, n, float(top.logsumexp))
    embedding = b"" if top.embedding is None else np.asarray(top.embedding, dtype="<f4").tobytes()
    return header + indices.tobytes() + values.tobytes() + embedding


def decode_top(blob: bytes) -> TopScores:
    """Raises ValueError for anything that is not a whole encoded result (never struct.error)."""
    if not isinstance(blob, bytes) or len(blob) < _HEADER.size:
        raise ValueError("truncated result")
    version, flags, n, lse = _HEADER.unpack_from(blob)
    if version != _BLOB_VERSION:
        raise ValueError(f"unknown result encoding {version}")
    width = 2 if flags & _FLAG_U16 else 4
    start = _HEADER.size
    end = start + n * (width + 4)
    rest = len(blob) - end
    if rest < 0 or (rest and not flags & _FLAG_EMBEDDING) or rest % 4 or (flags & _FLAG_EMBEDDING and not rest):
        raise ValueError("truncated result")
    idx = np.frombuffer(blob, dtype="<u2" if width == 2 else "<i4", count=n, offset=start)
    values = np.frombuffer(blob, dtype="<f4", count=n, offset=start + n * width)
    embedding = np.frombuffer(blob, dtype="<f4", offset=end).astype(np.float32) if rest else None
    return TopScores(idx.astype(np.int32), values.astype(np.float32), lse, embedding)


def _key_blob(key: str) -> bytes:
    """A hex sha256 becomes its 32 raw bytes; anything else is stored as UTF-8."""
    if len(key) == 64:
        try:
            return bytes.fromhex(key)
        except ValueError:
            pass
    return key.encode()


def _encode_warnings(warnings: tuple[str, ...]) -> str | None:
    return json.dumps(list(warnings), ensure_ascii=False) if warnings else None


def _decode_warnings(text: str | None) -> tuple[str, ...]:
    """Raises ValueError for a damaged entry (a miss, like a damaged ``top``)."""
    if not text:
        return ()
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("damaged warnings")
    return tuple(value)


def _has_warnings(conn: sqlite3.Connection) -> bool:
    return any(row[1] == "warnings" for row in conn.execute("PRAGMA table_info(results)"))


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --- statistics -------------------------------------------------------------------------------------------


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


# --- the cache --------------------------------------------------------------------------------------------


class SqliteCache:
    """A :class:`~wanwu.cache.ResultCache` in one SQLite file. Thread-safe; safe across processes."""

    def __init__(self, path: Path | str, *, timeout: float = 30.0, touch_interval: float = 3600.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.touch_interval = touch_interval
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._touches: dict[tuple[int, bytes], int] = {}
        self._disabled = False  # set after a failure during a run: carry on uncached

    # -- ResultCache --------------------------------------------------------------------------------

    def get_many(self, namespace: str, keys: list[str]) -> dict[str, CachedResult]:
        if not keys or self._disabled:
            return {}
        with self._lock:
            try:
                return self._get_many(namespace, keys)
            except sqlite3.OperationalError as e:
                if _transient(e):  # another process holds the write lock longer than the timeout: a miss
                    log.debug("result cache %s busy (%s); treated as a miss", self.path, e)
                    return {}
                self._disable("read", e)
                return {}
            except (sqlite3.Error, CacheError) as e:
                self._disable("read", e)
                return {}

    def put_many(self, namespace: str, items: Iterable[tuple[str, CachedResult]]) -> None:
        if self._disabled:
            return
        now = int(time.time())
        rows = [
            (_key_blob(key), encode_top(r.top), int(r.width), int(r.height), now, now, _encode_warnings(r.warnings))
            for key, r in items
        ]
        if not rows:
            return
        with self._lock:
            try:
                conn = self._connect(create=True)
                assert conn is not None
                with self._write(conn):
                    ns = self._namespace_id(conn, namespace, create=True)
                    assert ns is not None
                    conn.executemany(
                        "INSERT OR REPLACE INTO results (ns, key, top, width, height, created, accessed, "
                        "warnings) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [(ns, *row) for row in rows],
                    )
                    self._write_touches(conn)
            except sqlite3.OperationalError as e:
                if _transient(e):  # these results are just not stored this time
                    log.debug("result cache %s busy (%s); %d result(s) not stored", self.path, e, len(rows))
                    return
                self._disable("write", e)
            except (sqlite3.Error, CacheError) as e:
                self._disable("write", e)

    def close(self) -> None:
        with self._lock:
            if self._conn is None or self._pid != os.getpid():
                self._conn = None
                return
            try:
                if self._touches and not self._disabled:
                    with self._write(self._conn):
                        self._write_touches(self._conn)
            except sqlite3.Error as e:
                log.debug("result cache: could not record access times: %s", e)
            finally:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> SqliteCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- maintenance ---------------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        with self._lock, self._errors("read"):
            conn = self._connect(create=False)
            if conn is None:
                return CacheStats(str(self.path), exists=False)
            rows = conn.execute(
                "SELECT n.name, count(*), sum(length(r.top)), min(r.created), max(r.created), "
                "max(r.accessed) "
                "FROM results r JOIN namespaces n ON n.id = r.ns GROUP BY r.ns ORDER BY max(r.accessed) DESC"
            ).fetchall()
            namespaces = [NamespaceStats(*row) for row in rows]
            return CacheStats(
                str(self.path), exists=True,
                entries=sum(n.entries for n in namespaces),
                bytes_on_disk=self._bytes_on_disk(),
                oldest=min((n.oldest for n in namespaces if n.oldest is not None), default=None),
                newest=max((n.newest for n in namespaces if n.newest is not None), default=None),
                last_access=max(
                    (n.last_access for n in namespaces if n.last_access is not None), default=None
                ),
                namespaces=namespaces,
            )

    def clear(self, namespace: str | None = None) -> int:
        """Remove every entry, or those of one namespace (a unique prefix is enough). Returns how many."""
        with self._lock, self._errors("clear"):
            conn = self._connect(create=False)
            if conn is None:
                return 0
            with self._write(conn):
                if namespace is None:
                    removed = conn.execute("DELETE FROM results").rowcount
                    conn.execute("DELETE FROM namespaces")
                else:
                    ns = self._match_namespace(conn, namespace)
                    removed = conn.execute("DELETE FROM results WHERE ns = ?", (ns,)).rowcount
                    conn.execute("DELETE FROM namespaces WHERE id = ?", (ns,))
                self._touches.clear()
            self._compact(conn)
            return int(removed)

    def prune(self, *, older_than: float | None = None, max_size: int | None = None) -> PruneResult:
        """Drop entries not used for ``older_than`` seconds, then least recently used ones until the
        file is at most ``max_size`` bytes."""
        if older_than is None and max_size is None:
            raise CacheError("prune needs older_than and/or max_size")
        with self._lock, self._errors("prune"):
            conn = self._connect(create=False)
            if conn is None:
                return PruneResult(0, 0, 0)
            if self._touches:
                with self._write(conn):
                    self._write_touches(conn)
            before = self._bytes_on_disk()
            removed = 0
            if older_than is not None:
                cutoff = int(time.time() - older_than)
                with self._write(conn):
                    removed += conn.execute("DELETE FROM results WHERE accessed < ?", (cutoff,)).rowcount
            if removed:
                self._compact(conn)
            for _ in range(8):  # converge on max_size: each round estimates bytes per entry afresh
                if max_size is None or self._bytes_on_disk() <= max_size:
                    break
                entries = conn.execute("SELECT count(*) FROM results").fetchone()[0]
                if entries == 0:
                    break
                share = min(1.0, max_size / max(self._used_bytes(conn), 1))
                drop = max(1, entries - math.floor(entries * share * 0.97))  # 3% margin for page slack
                with self._write(conn):
                    removed += conn.execute(
                        "DELETE FROM results WHERE (ns, key) IN "
                        "(SELECT ns, key FROM results ORDER BY accessed, created LIMIT ?)",
                        (drop,),
                    ).rowcount
                self._compact(conn)
            with self._write(conn):
                conn.execute("DELETE FROM namespaces WHERE id NOT IN (SELECT DISTINCT ns FROM results)")
            return PruneResult(int(removed), before, self._bytes_on_disk())

    # -- internals -----------------------------------------------------------------------------------

    def _get_many(self, namespace: str, keys: list[str]) -> dict[str, CachedResult]:
        conn = self._connect(create=False)
        if conn is None:
            return {}
        ns = self._namespace_id(conn, namespace, create=False)
        if ns is None:
            return {}
        by_blob = {_key_blob(k): k for k in keys}
        out: dict[str, CachedResult] = {}
        now = int(time.time())
        for chunk in _chunks(list(by_blob), _CHUNK):
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT key, top, width, height, accessed, warnings FROM results "
                f"WHERE ns = ? AND key IN ({marks})",
                (ns, *chunk),
            )
            for key, top, width, height, accessed, warnings in rows:
                try:
                    out[by_blob[key]] = CachedResult(decode_top(top), width, height, _decode_warnings(warnings))
                except ValueError as e:  # one damaged entry is a miss (and is rewritten), not a broken cache
                    log.debug("result cache %s: unreadable entry (%s); treated as a miss", self.path, e)
                    continue
                if now - accessed >= self.touch_interval:
                    self._touches[(ns, key)] = now
        if len(self._touches) >= _TOUCH_BATCH:
            with self._write(conn):
                self._write_touches(conn)
        return out

    def _write_touches(self, conn: sqlite3.Connection) -> None:
        if self._touches:
            conn.executemany(
                "UPDATE results SET accessed = max(accessed, ?) WHERE ns = ? AND key = ?",
                [(t, ns, key) for (ns, key), t in self._touches.items()],
            )
            self._touches.clear()

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        if self._conn is not None and self._pid != os.getpid():
            self._conn = None  # inherited through fork: never use (or close) the parent's connection
            self._touches.clear()
        if self._conn is not None:
            return self._conn
        if not create and not self.path.exists():
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create the cache folder {self.path.parent}: {e}") from None
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        try:
            self._setup(conn)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise CacheError(
                f"{self.path} is not a usable wanwu cache ({e}); delete it, or use --cache elsewhere "
                "or --no-cache"
            ) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._pid = os.getpid()
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise CacheError(
                f"{self.path} was written by a newer wanwu (cache schema {version}, this one reads "
                f"{SCHEMA_VERSION}); upgrade, or use --cache elsewhere"
            )
        self._retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
        conn.execute("PRAGMA synchronous = NORMAL")  # a crash can lose the last writes, never corrupt
        if version < SCHEMA_VERSION:
            with self._write(conn):
                # Re-read under the lock: another process may have created it meanwhile. (No earlier
                # schema exists yet, so there is nothing to migrate.)
                if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif not _has_warnings(conn):  # a file from before the warnings column
            with self._write(conn):
                if not _has_warnings(conn):  # another process may have added it meanwhile
                    conn.execute("ALTER TABLE results ADD COLUMN warnings TEXT")

    def _retry_locked(self, fn: Any) -> Any:
        """Changing the journal mode can meet a lock that the busy handler does not wait on."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @staticmethod
    @contextmanager
    def _write(conn: sqlite3.Connection) -> Iterator[None]:
        """One write transaction; BEGIN IMMEDIATE takes the lock up front (waiting up to busy_timeout), so
        two writers never deadlock upgrading a read lock."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _namespace_id(self, conn: sqlite3.Connection, namespace: str, create: bool) -> int | None:
        if create:
            conn.execute(
                "INSERT OR IGNORE INTO namespaces (name, created) VALUES (?, ?)",
                (namespace, int(time.time())),
            )
        row = conn.execute("SELECT id FROM namespaces WHERE name = ?", (namespace,)).fetchone()
        return int(row[0]) if row else None

    def _match_namespace(self, conn: sqlite3.Connection, prefix: str) -> int:
        if not prefix or any(c not in "0123456789abcdef" for c in prefix.lower()):
            raise CacheError(f"not a namespace: {prefix!r} (see `wanwu cache stats`)")
        rows = conn.execute(
            "SELECT id, name FROM namespaces WHERE name LIKE ? || '%'", (prefix.lower(),)
        ).fetchall()
        if len(rows) != 1:
            raise CacheError(
                f"no namespace starts with {prefix!r}" if not rows
                else f"{prefix!r} matches {len(rows)} namespaces; give more characters"
            )
        return int(rows[0][0])

    def _compact(self, conn: sqlite3.Connection) -> None:
        """Give freed pages back to the file system and fold the WAL into the database."""
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def _bytes_on_disk(self) -> int:
        total = 0
        for suffix in ("", "-wal"):  # not -shm: a transient index of the WAL, gone when the last user closes
            with suppress(OSError):
                total += self.path.with_name(self.path.name + suffix).stat().st_size
        return total

    def _errors(self, what: str) -> _Errors:
        return _Errors(self.path, what)

    def _disable(self, what: str, error: BaseException) -> None:
        """Carry on without the cache after an error that will not go away by itself (a damaged file, a full
        disk). Lock timeouts (another process writing) and a damaged entry never get here."""
        if not self._disabled:
            log.warning(
                "result cache %s: cannot %s it (%s); carrying on without the cache", self.path, what, error
            )
        self._disabled = True


def _transient(error: sqlite3.OperationalError) -> bool:
    """"database is locked" / "busy": another process held the lock past the timeout; the next call may work."""
    text = str(error).lower()
    return "locked" in text or "busy" in text


class _Errors:
    """Turns sqlite3 errors of a maintenance call into :class:`CacheError`."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, sqlite3.Error):
            raise CacheError(f"cache {self.path}: cannot {self.what}: {exc}") from exc
