"""Other programs' log lines kept off the terminal: ``--runner ray`` writes Ray's own lines to a log file.

Ray prints to the driver's stderr from Python (its loggers) and from C++ (``E core_worker.cc…``), and the
processes it starts inherit that stderr. While a run uses Ray, file descriptor 2 points at a log file instead,
and wanwu's own messages (``sys.stderr``, the progress bar, the ``wanwu`` log) keep the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from wanwu.paths import wanwu_home

log = logging.getLogger("wanwu")


def ray_log_path() -> Path:
    """Where the lines Ray prints on the driver go: ``$WANWU_HOME/logs/ray-driver.log`` (appended)."""
    return wanwu_home() / "logs" / "ray-driver.log"


@dataclass
class Aside:
    """The file that descriptor 2 goes to, and the two stderr streams: ``terminal`` (``sys.stderr`` meanwhile)
    and ``into_file`` (the stream that was ``sys.stderr`` before, now writing into ``path``)."""

    path: Path
    terminal: TextIO
    into_file: TextIO

    def claim_loggers(self, prefix: str) -> None:
        """Loggers named ``prefix`` or ``prefix.*`` that print to the terminal's stderr print into the file."""
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger) and (name == prefix or name.startswith(prefix + ".")):
                for handler in logger.handlers:
                    if isinstance(handler, logging.StreamHandler) and handler.stream is self.terminal:
                        handler.setStream(self.into_file)


@contextmanager
def stderr_aside(path: Path) -> Iterator[Aside | None]:
    """Within: what is written to file descriptor 2 is appended to ``path``; ``sys.stderr`` and the root
    logger's stream handlers write to the terminal's stderr as before. None when stderr is not a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    original = sys.stderr
    try:
        original.flush()
        fd = original.fileno()
    except (AttributeError, OSError, ValueError):  # stderr is not a file here (a test's capture): nothing to do
        yield None
        return
    terminal = os.dup(fd)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, fd)
    os.close(target)
    ours = open(terminal, "w", encoding=original.encoding, errors=original.errors, buffering=1)  # noqa: SIM115
    moved = [h for h in logging.getLogger().handlers
             if isinstance(h, logging.StreamHandler) and h.stream is original]
    for handler in moved:
        handler.setStream(ours)
    sys.stderr = ours
    try:
        yield Aside(path, ours, original)
    finally:
        ours.flush()
        sys.stderr = original
        for handler in moved:
            handler.setStream(original)
        os.dup2(terminal, fd)
        ours.close()  # closes ``terminal``
