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
