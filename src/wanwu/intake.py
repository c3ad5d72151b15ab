"""A run's inputs, read from their iterator on a thread of their own (:class:`Intake`)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from wanwu.sources import InputItem


@dataclass(frozen=True, slots=True)
class _End:
    """The last entry of a run's inputs: the source's error, if it raised one."""

    error: BaseException | None


class Intake:
    """A run's inputs, taken from their iterator on a thread of their own, so that a slow source (a list piped
    on stdin and left open, a slow listing) never holds the run: what has arrived is taken at once, and the run
    is woken (``wake``) when more arrives. At most about ``capacity`` wait; an error of the source is raised by
    :meth:`take`, in the run's own thread.

    The hand-over is a deque (its appends and pops are atomic), not a locked queue: a rerun answered from the
    memo takes tens of thousands of inputs a second, and a lock and a condition per input cost a fifth of it.
    ``_asleep`` says the run found nothing and may be waiting: the reader wakes it on its next input."""

    def __init__(self, items: Iterator[InputItem] | list[InputItem], wake: Callable[[], None],
                 capacity: int = 1024) -> None:
        """``items`` as a list (a service request's uploads) is taken as it is: no thread is started for it."""
        self._items: deque[InputItem | _End] = deque()
        self._capacity = capacity
        self._wake = wake
        self._asleep = True
        self._room = threading.Event()  # set by take() when the reader waits for room
        self._full = False
        self._stop = threading.Event()
        self.exhausted = False
        if isinstance(items, list):
            self._items.extend(items)
            self._items.append(_End(None))
            self._asleep = False
            return
        threading.Thread(target=self._read, args=(items,), name="wanwu-inputs", daemon=True).start()

    def _read(self, items: Iterator[InputItem]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as e:  # the run raises it (a source's usage error, say)
            self._put(_End(e))
            return
        self._put(_End(None))

    def _put(self, entry: InputItem | _End) -> bool:
        while len(self._items) >= self._capacity:
            self._room.clear()
            self._full = True
            if len(self._items) >= self._capacity:  # still full: wait until take() makes room
                self._room.wait(0.5)
            if self._stop.is_set():
                return False
        if self._stop.is_set():
            return False
        self._items.append(entry)
        if self._asleep:  # the run found nothing at its last look: tell it
            self._asleep = False
            self._wake()
        return True

    def take(self) -> InputItem | None:
        """The next input if it has arrived; None if none has yet, or after the last (:attr:`exhausted`)."""
        if self.exhausted:
            return None
        try:
            entry = self._items.popleft()
        except IndexError:
            self._asleep = True  # then look again: an input appended meanwhile did not wake the run
            try:
                entry = self._items.popleft()
            except IndexError:
                return None
        if self._full and len(self._items) < self._capacity // 2:
            self._full = False
            self._room.set()
        if isinstance(entry, _End):
            self.exhausted = True
            if entry.error is not None:
                raise entry.error
            return None
        return entry

    def close(self) -> None:
        """The run is over: the reading thread stops at its next input (one blocked on a pipe stays blocked)."""
        self._stop.set()
