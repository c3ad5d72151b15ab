"""A private Ray's start, and the run's first records computed on this machine meanwhile.

A private Ray (``--runner ray`` without ``--ray-address``) takes seconds to start: ``ray.init`` starts its own
processes (GCS, raylet, dashboard head, dashboard and runtime-env agents, log and autoscaler monitors, each a
Python that imports Ray), then the inference actor's process starts and loads the model, then the decode
tasks' workers import the decode stage (docs/cluster.md has the figures). :class:`RayStart` does all of it on
a thread of its own, so the driver is not held; meanwhile :func:`warm_records` recognizes the run's first
inputs (a block: ``RayOptions.local_start`` at most) with the local orchestrator
(:class:`wanwu.pipeline.Recognizer`: the same per-item rules, so the same records). The rest go to Ray once it
has started (its first calls submitted at once, while the local run finishes the inputs it took), and the
records stay in input order.

Ray starts once the block's first record is out (or when a run needs Ray first): started at once, Ray's own
processes (six Pythons importing Ray) took the CPU that first record needed.

Only a block: on a machine of few cores, a local run that went on while Ray starts takes the CPU that Ray's
processes start with (in one run on 2 busy cores, ``ray.init`` took 38 s instead of 10 and the local run
recognized 700 photos meanwhile, at a third of its own rate).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Generic, TypeVar

from wanwu.errors import ClosedError
from wanwu.pipeline import Recognizer
from wanwu.records import Record, RecordOptions
from wanwu.sources import InputItem

log = logging.getLogger("wanwu")
T = TypeVar("T")
_END = object()


class RayStart(Generic[T]):
    """``start()`` (``ray.init`` and the run's actors) on the thread ``wanwu-ray-start``: at once, or with
    ``wait=True`` once :meth:`go` is called (never if :meth:`cancel` comes first).

    The thread lives on until :meth:`release`, to be called once Ray is shut down: the processes ``ray.init``
    starts are bound to the thread that started them (they are sent SIGKILL when it ends: Linux's
    parent-death signal follows the parent thread, not the process)."""

    def __init__(self, start: Callable[[], T], wait: bool = False) -> None:
        self._start = start
        self._go = threading.Event()
        self._cancelled = False
        self._done = threading.Event()
        self._released = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        if not wait:
            self._go.set()
        self._thread = threading.Thread(target=self._run, name="wanwu-ray-start", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._go.wait()
        try:
            if self._cancelled:
                raise ClosedError("Ray was not started: closed first")
            self._value = self._start()
        except BaseException as e:  # raised by result(), in the thread that needs Ray
            self._error = e
        finally:
            self._done.set()
        self._released.wait()

    def go(self) -> None:
        """Start now (if not yet)."""
        self._go.set()

    def cancel(self) -> None:
        """Never start, if not begun yet (:meth:`result` raises ClosedError then)."""
        if not self._go.is_set():
            self._cancelled = True
            self._go.set()

    def ready(self) -> bool:
        """Started (or failed to): :meth:`result` returns at once."""
        return self._done.is_set()

    def result(self) -> T:
        """What ``start()`` returned, once it has (started now if it was waiting); what it raised is raised
        here."""
        self.go()
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set whenever no error was

    def wait(self) -> BaseException | None:
        """Waits for a start begun to end; what it raised, if anything (not raised here)."""
        self._done.wait()
        return self._error

    def release(self) -> None:
        """Ends the thread (after ``ray.shutdown()``)."""
        self._released.set()
        self._thread.join()


class _Gate:
    """``items`` as the local run takes them, at most ``limit``, until :meth:`close`, which hands what is left
    on (no item is taken by both)."""

    def __init__(self, items: Iterator[InputItem], limit: int) -> None:
        self._items = items
        self._left = limit
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.exhausted = False

    def __iter__(self) -> Iterator[InputItem]:
        while True:
            with self._lock:  # close() never races a take
                if self._left <= 0 or self._closing.is_set():
                    return
                item = next(self._items, _END)
                if item is _END:
                    self.exhausted = True
                    return
                self._left -= 1
            yield item  # type: ignore[misc]  # not _END

    def close(self) -> Iterator[InputItem]:
        """No more items for the local run; the ones it has not taken."""
        self._closing.set()  # first: a lock is not fair, the taking thread could take it again and again
        with self._lock:  # a take in progress ends
            self._left = 0
        return self._items


def warm_records(
    local: Recognizer, items: Iterator[InputItem], record: RecordOptions, started: Callable[[], bool],
    on_ray: Callable[[Iterator[InputItem]], Iterator[Record]], limit: int,
) -> Iterator[Record]:
    """``items``' records in order: the first ``limit`` at most from ``local``, while ``started()`` is False,
    then the rest from ``on_ray(rest)`` (called as soon as ``started()`` is True, so Ray starts on them while
    ``local`` finishes the ones it took; else once the local run has given its records). With no input left,
    Ray is not waited for."""
    gate = _Gate(items, limit)
    rest: Iterator[Record] | None = None
    try:
        for out in local.recognize(gate, record):
            if rest is None and started():
                rest = on_ray(gate.close())
            yield out
    finally:
        gate.close()
    if rest is None and not gate.exhausted:
        left = gate.close()
        first = next(left, _END)
        if first is not _END:  # else no input was left: Ray is not waited for
            rest = on_ray(chain([first], left))  # type: ignore[list-item]  # not _END
    if rest is not None:
        yield from rest
