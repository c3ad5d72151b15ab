"""Where wanwu keeps its files: ``$WANWU_HOME`` (default ``~/.cache/wanwu``).

Downloaded models, the result cache, the job queue, int8 rewrites and fingerprint memos live below it.
A leaf module (no wanwu imports), so any module may ask for a path without an import cycle.
"""

from __future__ import annotations

import os
from pathlib import Path


def wanwu_home() -> Path:
    """``$WANWU_HOME`` or ``~/.cache/wanwu``."""
    return Path(os.environ.get("WANWU_HOME") or Path.home() / ".cache" / "wanwu")
