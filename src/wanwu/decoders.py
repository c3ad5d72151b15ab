"""The decode workers: processes (or threads) running :func:`wanwu.imaging.decode_jobs`, and a one-process
quarantine where the file a crash happened on is decoded again alone.

Each worker process is a :class:`DecodeProcess`, forked from a server that has imported only what decoding
needs and driven over a pipe by a thread of its own (:class:`DecodeProcesses`). A task of several files is
decoded one file at a time, the process noting in shared memory which file it is on (:meth:`DecodeProcess.call_each`),
so a crash or a deadline names its file; the other files of the task are decoded again. After a crash,
the orchestrator sends that file to :meth:`DecodePool.isolate`: alone in the quarantine process, a second crash
names it for certain, while the workers go on with everything else. A file still decoding at its deadline has
its process killed and is never retried (the time is the file's own). The quarantine is shared by every run on
the pool (concurrent service requests, say), so an innocent file is never retried beside another run's culprit.

Each decode process may map only a set amount of memory beyond what it maps at start (``RLIMIT_AS``), so a
decompression bomb fails its own allocation (a too_large record) instead of taking the machine's memory. One
process, and what runs in it, is :mod:`wanwu.decodeprocess`.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, ClassVar, Final, Literal

from wanwu.decodeprocess import (
    DecodeCrashError,
    DecodeProcess,
    DecoderDiedError,
    DecodeTimeoutError,
)
from wanwu.errors import ClosedError, ErrorType
from wanwu.imaging import DecodeOptions, DecodeResult, decode_each
from wanwu.spec import PreprocessSpec

__all__ = [
    "DecodeCrashError", "DecodePool", "DecodeProcess", "DecodeProcesses", "DecodeTimeoutError", "DecoderDiedError",
    "ProcessDecoder", "decode_outcomes", "timed_out",
]


class DecodePool:
    """Decode workers: :class:`DecodeProcesses`, or ``threads`` threads when ``workers == 0``; plus the
    quarantine, where a suspect file is decoded alone. Safe to share between threads (the service's requests
    share one)."""

    def __init__(self, workers: int, threads: int = 4, address_space: int | None = None) -> None:
        """``address_space``: bytes each decode process may map beyond what it maps when started (None: no
        limit)."""
        self.workers, self.threads, self.address_space = workers, threads, address_space
        self._pool: DecodeProcesses | ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._wanted = False  # warm() was called
        self._in_flight: set[Future[Any]] = set()  # decode tasks queued or running (what decoding() tells)
        self._counting = threading.Lock()
        # Called when the last task in flight ends, outside the pool's locks: a batcher waiting for the crops on
        # their way checks again (the last decode may have failed, and then no crop comes to wake it).
        self.on_drained: Callable[[], None] = lambda: None
        # One process, one task at a time: the next starts only when the last has finished, so a crash or a
        # deadline names its task exactly.
        self._quarantine = (DecodeProcesses(1, name="wanwu-quarantine", address_space=address_space)
                            if workers > 0 else None)

    def warm(self) -> None:
        """Start the worker processes now (a thread of their own: the model loads meanwhile): a server, a queue
        worker, a run known to be long. Otherwise they start with the first task of a run that needs them."""
        if self.workers == 0:
            return
        self._wanted = True

        def start() -> None:
            with contextlib.suppress(RuntimeError, ClosedError):  # closed before the warm-up: nothing to warm
                pool = self.get()
                for _ in range(self.workers):
                    pool.submit(int)

        threading.Thread(target=start, name="wanwu-decode-warm", daemon=True).start()

    @property
    def started(self) -> bool:
        """The workers were asked for (by :meth:`warm` or a task): later runs use them, however short."""
        return self._wanted or self._pool is not None

    def decoding(self) -> bool:
        """Decode tasks are queued or running: their crops are on their way (the service's batcher waits for them
        rather than start a batch without them)."""
        return bool(self._in_flight)

    def _counted(self, future: Future[Any]) -> Future[Any]:
        with self._counting:
            self._in_flight.add(future)
        future.add_done_callback(self.forget)  # before the caller's own callbacks: done means no longer counted
        return future

    def forget(self, future: Future[Any]) -> None:
        """No longer count ``future`` as decoding: it is done, or its run gave up on it at its deadline (a thread
        cannot be stopped, and one stuck in a decoder would otherwise keep :meth:`decoding` true for good)."""
        with self._counting:
            if future not in self._in_flight:  # forgotten at its deadline, and now done
                return
            self._in_flight.discard(future)
            drained = not self._in_flight
        if drained:
            self.on_drained()

    def submit_here(self, fn: Callable[..., Any], *args: Any, meter: Callable[[float], None] | None = None
                    ) -> Future[Any]:
        """Run ``fn(*args)`` on a thread of this process, started for it: what a run of a few files does
        instead of starting worker processes (which costs more than decoding them). The thread is a daemon:
        it cannot be stopped, and it never keeps the process from exiting. ``meter`` is told the seconds it
        took."""
        future: Future[Any] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(_metered(meter, fn, *args))
            except BaseException as e:
                future.set_exception(e)

        self._counted(future)
        threading.Thread(target=run, name="wanwu-decode-here", daemon=True).start()
        return future

    def get(self) -> Executor:
        """The workers, started on first use. Raises ClosedError once the pool is closed."""
        with self._lock:
            if self._closed:
                raise ClosedError("the decode workers are closed")
            if self._pool is None:
                if self.workers == 0:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="wanwu-decode")
                else:
                    self._pool = DecodeProcesses(self.workers, address_space=self.address_space)
            return self._pool

    def submit(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Future[Any]:
        """Run ``fn(*args)`` on a worker. In a process, a task still running ``timeout`` seconds after it
        started is stopped (its process killed) and raises DecodeTimeoutError; a task that crashes its process
        raises DecoderDiedError. A thread cannot be stopped: the caller gives up on it instead."""
        pool = self.get()
        if isinstance(pool, DecodeProcesses):
            return pool.submit_within(timeout, fn, *args)
        return pool.submit(fn, *args)

    def submit_each(self, fn: Callable[..., Any], datas: list[Any], *args: Any, timeout: float,
                    meter: Callable[[float], None] | None = None) -> Future[Any]:
        """Run ``fn(datas, *args)`` (a function from a list to a list) on a worker. In a process, each item
        runs alone (``fn([item], *args)``) under a deadline of its own: a failure raises DecodeTimeoutError or
        DecodeCrashError whose ``index`` names the item it happened on. ``meter`` is told the seconds the task
        held a worker."""
        pool = self.get()
        if isinstance(pool, DecodeProcesses):
            return self._counted(pool.submit_each(timeout, fn, datas, *args, meter=meter))
        return self._counted(pool.submit(_metered, meter, fn, datas, *args))

    @property
    def stoppable(self) -> bool:
        """Workers are processes: :meth:`submit` enforces its deadlines itself."""
        return self.workers > 0

    def isolate(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None,
                meter: Callable[[float], None] | None = None) -> Future[Any]:
        """Run ``fn(*args)`` alone in the quarantine process. The future raises DecoderDiedError only when
        this very call crashed its process, and DecodeTimeoutError when it ran past ``timeout`` seconds (its
        process is then killed)."""
        if self._closed:
            raise ClosedError("the decode workers are closed")
        if self._quarantine is None:  # threads cannot crash each other's process: run it in the pool
            return self._counted(self.get().submit(_metered, meter, fn, *args))
        return self._counted(self._quarantine.submit_within(timeout, fn, *args, meter=meter))

    def close(self, wait: bool = True) -> None:
        """Stop the workers. Idle ones exit; one still busy (a hung decoder) is killed, never waited for."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if isinstance(pool, DecodeProcesses):
            pool.shutdown(wait=False, cancel_futures=True)
        elif pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
        if self._quarantine is not None:
            self._quarantine.shutdown(wait=False, cancel_futures=True)


def _metered(meter: Callable[[float], None] | None, fn: Callable[..., Any], *args: Any) -> Any:
    start = time.monotonic()
    try:
        return fn(*args)
    finally:
        if meter is not None:
            meter(time.monotonic() - start)


CRASHED = "the decoder process crashed on this file"  # the record's message, whichever runner decoded it


def timed_out(seconds: float) -> str:
    """The record's message for a decode stopped at its deadline."""
    return f"decoding took longer than {seconds:g} s (--decode-timeout); the decoder was stopped"


AGAIN: Final = "again"  # decode this file again as before: the failure was a neighbour's
ALONE: Final = "alone"  # decode this file again alone, in the quarantine: it may be the culprit
DecodeOutcome = tuple[ErrorType, str] | Literal["again", "alone"]


def decode_outcomes(exc: BaseException, isolated: Sequence[bool], timeout_message: str) -> list[DecodeOutcome]:
    """What a decode task over ``len(isolated)`` files that raised ``exc`` means for each file: its failure,
    :data:`AGAIN` or :data:`ALONE`. ``isolated[i]``: file ``i`` ran in a process of its own after an earlier
    failure (the quarantine), so a crash there is its own. The one rule for every runner.

    A task whose files ran one at a time names the file a crash or a deadline happened on
    (:class:`DecodeCrashError`, :class:`DecodeTimeoutError`: ``index``): a deadline fails that file at once (it
    is never retried); a crash fails it in isolation, else sends it alone to the quarantine (a worker may die
    for reasons of its own); the other files did nothing wrong and are decoded again. A pool broken under a task
    (no file named) sends each of its files to the quarantine. Any other exception is ``internal``."""
    n = len(isolated)
    if isinstance(exc, (DecodeTimeoutError, DecodeCrashError)):
        index = min(exc.index, n - 1)
        outcomes: list[DecodeOutcome] = [AGAIN] * n
        if isinstance(exc, DecodeTimeoutError):
            outcomes[index] = ("decode_error", timeout_message)
        else:
            outcomes[index] = ("decode_error", CRASHED) if isolated[index] else ALONE
        return outcomes
    if isinstance(exc, DecoderDiedError):
        return [("decode_error", CRASHED) if alone else ALONE for alone in isolated]
    return [("internal", f"{type(exc).__name__}: {exc}")] * n


class ProcessDecoder:
    """Decoding in one :class:`DecodeProcess` per calling thread, under a deadline per file, for a caller that
    decodes a few images at a time and waits (a Ray decode task): a crash or a timeout costs only its own image's
    record (:func:`decode_outcomes`, as in the orchestrator), and the process is replaced for the next call."""

    _processes: ClassVar[dict[int, DecodeProcess]] = {}  # per thread of this process, reused by every call

    def __init__(self, decode: Callable[..., DecodeResult], timeout: float, address_space: int | None = None) -> None:
        self.decode, self.timeout = decode, timeout
        process = self._processes.get(threading.get_ident())
        if process is None:  # Ray may run tasks of one worker process in threads: one decode process each
            process = self._processes[threading.get_ident()] = DecodeProcess(address_space)
        self.process = process

    def many(self, datas: list[bytes], preprocess: PreprocessSpec, options: DecodeOptions) -> list[DecodeResult]:
        """All of them in one round trip, one file at a time under a deadline each; after a crash or a
        deadline, the file it happened on fails (a deadline) or is decoded again alone (a crash: alone, a
        second crash is its own), and the rest are decoded again."""
        results: list[DecodeResult | None] = [None] * len(datas)
        todo = list(range(len(datas)))
        isolated = [False] * len(datas)
        while todo:
            try:
                done = self.process.call_each(_decode_list, [datas[i] for i in todo], self.decode, preprocess,
                                              options, timeout=self.timeout)
            except Exception as e:
                outcomes = decode_outcomes(e, [isolated[i] for i in todo], timed_out(self.timeout))
                again = []
                for i, outcome in zip(todo, outcomes, strict=True):
                    if outcome == ALONE:
                        results[i] = self._alone(datas[i], preprocess, options)
                    elif outcome == AGAIN:
                        again.append(i)
                    elif isinstance(outcome, tuple):
                        results[i] = outcome
                todo = again
                continue
            for i, result in zip(todo, done, strict=True):
                results[i] = result
            todo = []
        return [r for r in results if r is not None]

    def _alone(self, data: bytes, preprocess: PreprocessSpec, options: DecodeOptions) -> DecodeResult:
        try:
            result: DecodeResult = self.process.call_each(_decode_list, [data], self.decode, preprocess, options,
                                                          timeout=self.timeout)[0]
        except Exception as e:
            outcome = decode_outcomes(e, [True], timed_out(self.timeout))[0]
            assert isinstance(outcome, tuple)  # isolated: never again or alone
            return outcome
        return result

    @classmethod
    def close_all(cls) -> None:
        """Stop every thread's decode process (they start again on the next call)."""
        while cls._processes:
            _, process = cls._processes.popitem()
            process.close()


def _decode_list(datas: list[bytes], decode: Callable[..., DecodeResult], preprocess: PreprocessSpec,
                 options: DecodeOptions) -> list[DecodeResult]:
    return decode_each(decode, datas, preprocess, options)


class DecodeProcesses(Executor):
    """``workers`` decode processes, each driven over its pipe by a thread of its own (:class:`DecodeProcess`).

    A task costs one pipe round trip: none of ProcessPoolExecutor's manager and feeder threads stand between
    the caller and the process, which matters when tasks are small (the service decodes one upload per task).
    A crash fails only the task that caused it, and a task past its deadline (:meth:`submit_within`) only
    itself; either way that process alone starts afresh for the next task, so the pool never breaks as a whole.
    :meth:`kill` stops every process, failing the tasks in flight with DecoderDiedError."""

    def __init__(self, workers: int, name: str = "wanwu-decode", address_space: int | None = None) -> None:
        self._processes = [DecodeProcess(address_space) for _ in range(workers)]
        self._idle: queue.SimpleQueue[DecodeProcess] = queue.SimpleQueue()
        for process in self._processes:
            self._idle.put(process)
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if kwargs:
            raise TypeError("decode tasks take positional arguments only")
        return self.submit_within(None, fn, *args)

    def submit_within(self, timeout: float | None, fn: Callable[..., Any], *args: Any,
                      meter: Callable[[float], None] | None = None) -> Future[Any]:
        """Like ``submit``, but a task still running ``timeout`` seconds after it started has its process
        killed (the next task gets a fresh one) and raises DecodeTimeoutError. Time spent queued does not
        count; ``None``: no deadline."""
        return self._threads.submit(self._call, fn, args, timeout, False, meter)

    def submit_each(self, timeout: float | None, fn: Callable[..., Any], datas: list[Any], *args: Any,
                    meter: Callable[[float], None] | None = None) -> Future[Any]:
        """:meth:`DecodeProcess.call_each` on the next free process; ``meter`` is told how long it ran."""
        return self._threads.submit(self._call, fn, (datas, *args), timeout, True, meter)

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float | None, each: bool = False,
              meter: Callable[[float], None] | None = None) -> Any:
        process = self._idle.get()  # as many threads as processes: one is always free here
        start = time.monotonic()
        try:
            if self._closed:
                raise DecoderDiedError("the decode workers were shut down")
            if each:
                return process.call_each(fn, *args, timeout=timeout)
            return process.call(fn, *args, timeout=timeout)
        finally:
            if meter is not None:
                meter(time.monotonic() - start)
            if self._closed:
                process.close()
            self._idle.put(process)

    def kill(self) -> None:
        for process in self._processes:
            process.kill()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Idle processes are stopped; a busy one (a hung decoder) is killed, never waited for."""
        self._closed = True
        self._threads.shutdown(wait=False, cancel_futures=cancel_futures)
        idle: list[DecodeProcess] = []
        while True:
            try:
                idle.append(self._idle.get_nowait())
            except queue.Empty:
                break
        for process in self._processes:
            if process in idle:
                process.close()
                self._idle.put(process)
            else:
                process.kill()  # its thread sees the pipe close, and closes it
        if wait:
            self._threads.shutdown(wait=True)
