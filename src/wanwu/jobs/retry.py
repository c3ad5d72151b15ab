"""Riding out a queue's bad minutes: retry a call while its store is briefly unavailable.

Backends raise :class:`~wanwu.errors.QueueUnavailableError` for what passes (Redis down, restarting or
loading its data; SQLite's write lock held past the busy timeout) and plain ``QueueError`` for the rest.
:func:`retrying` repeats a call with exponential backoff, capped at ``max_delay_s`` so that a worker is
back at work within about that long of the store's return; it logs the outage once when it starts, every
``LOG_EVERY_S`` while it lasts, and once when it ends (messages carry the queue URL without credentials).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from wanwu.errors import QueueUnavailableError

log = logging.getLogger("wanwu")
T = TypeVar("T")
FIRST_DELAY_S = 0.05
MAX_DELAY_S = 2.0
LOG_EVERY_S = 30.0


@dataclass
class Outages:
    """What a caller lived through: outages seen, seconds spent waiting, and the last recovery's length."""

    count: int = 0
    waited_s: float = 0.0
    last_s: float = 0.0


def retrying(call: Callable[[], T], what: str, *, deadline_s: float | None = None,
             stop: threading.Event | None = None, max_delay_s: float = MAX_DELAY_S,
             outages: Outages | None = None) -> T:
    """``call()``, repeated while it raises QueueUnavailableError. Gives up (re-raising the last error) once
    ``deadline_s`` have passed (None: never) or ``stop`` is set; ``what`` names the call in the log."""
    started = time.monotonic()
    delay = FIRST_DELAY_S
    logged = 0.0
    failed = False
    while True:
        try:
            result = call()
        except QueueUnavailableError as e:
            waited = time.monotonic() - started
            if not failed:
                failed, logged = True, time.monotonic()
                log.warning("%s: queue unavailable (%s); retrying for %s", what, e,
                            "as long as it takes" if deadline_s is None else f"up to {deadline_s:g} s")
            elif time.monotonic() - logged >= LOG_EVERY_S:
                logged = time.monotonic()
                log.warning("%s: queue still unavailable after %.0f s (%s)", what, waited, e)
            if (deadline_s is not None and waited + delay > deadline_s) or (stop is not None and stop.is_set()):
                _count(outages, waited)
                raise
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
            delay = min(max_delay_s, delay * 2)
            continue
        if failed:
            waited = time.monotonic() - started
            _count(outages, waited)
            log.warning("%s: queue available again after %.1f s", what, waited)
        return result


def _count(outages: Outages | None, waited: float) -> None:
    if outages is not None:
        outages.count += 1
        outages.waited_s += waited
        outages.last_s = waited
