"""Where wanwu keeps its files: ``$WANWU_HOME`` (default ``~/.cache/wanwu``).

Downloaded models, the result cache, the job queue, int8 rewrites and fingerprint memos live below it.
A leaf module (no wanwu imports), so any module may ask for a path without an import cycle.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def wanwu_home() -> Path:
    """``$WANWU_HOME`` or ``~/.cache/wanwu``."""
    return Path(os.environ.get("WANWU_HOME") or Path.home() / ".cache" / "wanwu")


def keep(path: Path, data: bytes | str) -> bool:
    """Write ``data`` to ``path`` atomically, or not at all (a memo or cache that only saves time, in a home
    that may be read-only): whether it was kept."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[bool]:
    """An exclusive advisory lock on ``path`` (created if missing), taken without waiting: yields whether this
    process holds it, and releases it on exit."""
    import fcntl

    with path.open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
