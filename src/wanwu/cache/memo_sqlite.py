"""The stat memo in one SQLite file beside the result cache (WAL; shared safely by any number of processes).

Layout (``PRAGMA application_id`` = :data:`APPLICATION_ID`, ``user_version`` = :data:`SCHEMA_VERSION`)::

    memo(key BLOB PRIMARY KEY, stamp TEXT, sha BLOB(32), checked INTEGER) WITHOUT ROWID

``key`` is the UTF-8 of :mod:`wanwu.cache.memo`'s key (file names that are not UTF-8 kept byte for byte),
``sha`` the raw sha256, ``checked`` when the stamp was observed (ns since the epoch).

Nothing here ever fails a run: a file that is not a memo, or is damaged, is moved aside (``….damaged``) and a
fresh one started; an entry that cannot be read back is a miss; a lock held too long by another process makes
a lookup a miss and a write skipped. Only :meth:`SqliteMemo.stats` and :meth:`~SqliteMemo.prune` raise
(:class:`~wanwu.errors.CacheError`), as maintenance commands.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from wanwu.cache.memo import MemoStats, Remembered
from wanwu.errors import CacheError

log = logging.getLogger("wanwu")

APPLICATION_ID = 0x77776D6F  # "wwmo"
SCHEMA_VERSION = 1
_CHUNK = 500  # keys per SELECT … IN (…)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS memo (key BLOB PRIMARY KEY, stamp TEXT NOT NULL, sha BLOB NOT NULL, "
    "checked INTEGER NOT NULL) WITHOUT ROWID"
)


def _blob(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


class SqliteMemo:
    """A :class:`~wanwu.cache.memo.Memo` in one SQLite file. Thread-safe; safe across processes."""

    def __init__(self, path: Path | str, *, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._disabled = False

    # -- Memo -----------------------------------------------------------------------------------------

    def get_many(self, keys: list[str]) -> dict[str, Remembered]:
        if not keys or self._disabled:
            return {}
        with self._lock:
            try:
                conn = self._connect(create=False)
                return {} if conn is None else self._get_many(conn, keys)
            except sqlite3.Error as e:
                self._failed("read", e)
                return {}

    def put_many(self, entries: Iterable[tuple[str, Remembered]]) -> None:
        rows = []
        for key, entry in entries:
            try:
                entry.stamp.encode("utf-8")  # no lone surrogates: it is stored as TEXT
                rows.append((_blob(key), entry.stamp, bytes.fromhex(entry.sha256), int(entry.checked_ns)))
            except (UnicodeError, ValueError):  # a stamp or sha that cannot be stored: not remembered
                continue
        if not rows or self._disabled:
            return
        with self._lock:
            try:
                conn = self._connect(create=True)
                assert conn is not None
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany("INSERT OR REPLACE INTO memo (key, stamp, sha, checked) VALUES (?, ?, ?, ?)",
                                     rows)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._failed("write", e)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> SqliteMemo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- maintenance ----------------------------------------------------------------------------------

    def stats(self) -> MemoStats:
        with self._lock:
            try:
                conn = self._connect(create=False)
                if conn is None:
                    return MemoStats(str(self.path), exists=False)
                entries, files = conn.execute(
                    "SELECT count(*), coalesce(sum(substr(key, 1, 2) = CAST('f:' AS BLOB)), 0) FROM memo"
                ).fetchone()
            except sqlite3.Error as e:
                raise CacheError(f"memo {self.path}: cannot read it: {e}") from e
            return MemoStats(str(self.path), True, int(entries), int(files), self._bytes_on_disk())

    def prune(self, machine: str) -> int:
        """Drop the entries of this machine's files that no longer exist. Returns how many."""
        prefix = _blob(f"f:{machine}:")
        removed = 0
        with self._lock:
            try:
                conn = self._connect(create=False)
                if conn is None:
                    return 0
                after = prefix
                while True:  # a page of keys at a time: memory stays flat for any number of entries
                    keys = [row[0] for row in conn.execute(
                        "SELECT key FROM memo WHERE key > ? AND substr(key, 1, ?) = ? ORDER BY key LIMIT 1000",
                        (after, len(prefix), prefix),
                    )]
                    if not keys:
                        break
                    after = keys[-1]
                    gone = [(k,) for k in keys if not os.path.lexists(k[len(prefix):])]
                    if gone:
                        conn.execute("BEGIN IMMEDIATE")
                        conn.executemany("DELETE FROM memo WHERE key = ?", gone)
                        conn.execute("COMMIT")
                        removed += len(gone)
            except sqlite3.Error as e:
                raise CacheError(f"memo {self.path}: cannot prune it: {e}") from e
        return removed

    def clear(self) -> int:
        with self._lock:
            try:
                conn = self._connect(create=False)
                if conn is None:
                    return 0
                removed = int(conn.execute("DELETE FROM memo").rowcount)
                conn.execute("VACUUM")
                return removed
            except sqlite3.Error as e:
                raise CacheError(f"memo {self.path}: cannot clear it: {e}") from e

    # -- internals ------------------------------------------------------------------------------------

    def _bytes_on_disk(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with suppress(OSError):
                total += self.path.with_name(self.path.name + suffix).stat().st_size
        return total

    def _get_many(self, conn: sqlite3.Connection, keys: list[str]) -> dict[str, Remembered]:
        by_blob = {_blob(k): k for k in keys}
        blobs = list(by_blob)
        out: dict[str, Remembered] = {}
        for i in range(0, len(blobs), _CHUNK):
            chunk = blobs[i : i + _CHUNK]
            rows = conn.execute(
                f"SELECT key, stamp, sha, checked FROM memo WHERE key IN ({','.join('?' * len(chunk))})", chunk
            )
            for key, stamp, sha, checked in rows:
                if type(sha) is bytes and len(sha) == 32 and type(stamp) is str and type(checked) is int:
                    out[by_blob[key]] = Remembered(stamp, sha.hex(), checked)
                # else: an entry that cannot be read back is a miss (and is rewritten after the read)
        return out

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        if self._conn is not None and self._pid != os.getpid():
            self._conn = None  # inherited through fork: never use the parent's connection
        if self._conn is not None:
            return self._conn
        if not create and not self.path.exists():
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise sqlite3.OperationalError(f"cannot create {self.path.parent}: {e}") from None
        try:
            conn = self._open()
        except sqlite3.DatabaseError as e:
            if _transient(e):
                raise
            self._set_aside(e)  # not a memo, or damaged: start afresh
            conn = self._open()
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            app, version = (conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("application_id", "user_version"))
            if (app, version) != (APPLICATION_ID, SCHEMA_VERSION):
                if app != 0 or version != 0 or conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise sqlite3.DatabaseError(f"not a wanwu memo (application id {app}, version {version})")
                conn.execute("PRAGMA journal_mode = WAL").fetchone()
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(_SCHEMA)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("SELECT key FROM memo LIMIT 1").fetchall()
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_aside(self, error: BaseException) -> None:
        log.warning("memo %s is not usable (%s); moved aside, starting a fresh one", self.path, error)
        with suppress(OSError):
            os.replace(self.path, self.path.with_name(self.path.name + ".damaged"))
        for suffix in ("-wal", "-shm"):
            with suppress(OSError):
                os.unlink(self.path.with_name(self.path.name + suffix))

    def _failed(self, what: str, error: sqlite3.Error) -> None:
        if isinstance(error, sqlite3.OperationalError) and _transient(error):
            log.debug("memo %s busy (%s); %s skipped", self.path, error, what)
            return
        log.warning("memo %s: cannot %s it (%s); carrying on without it", self.path, what, error)
        self._disabled = True
        if self._conn is not None and self._pid == os.getpid():
            with suppress(sqlite3.Error):
                self._conn.close()
        self._conn = None
        if isinstance(error, sqlite3.DatabaseError) and not isinstance(error, sqlite3.OperationalError):
            self._set_aside(error)  # damaged: the next run starts afresh


def _transient(error: sqlite3.Error) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text
