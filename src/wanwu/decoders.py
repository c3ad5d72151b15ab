"""The decode workers: processes (or threads) running :func:`wanwu.imaging.decode_jobs`, and a one-process
quarantine where the suspects of a crash are decoded one at a time.

Each worker process is a :class:`DecodeProcess`, forked from a server that has imported only what decoding
needs and driven over a pipe by a thread of its own (:class:`DecodeProcesses`). A crash fails the task that
caused it, which may hold several files; the orchestrator sends each of them to :meth:`DecodePool.isolate`:
alone in the quarantine process, a second crash names its file exactly, while the workers go on with everything
else. A task still running at its deadline (counted from when it started) has its process killed, and its files
become suspects in the same way. The quarantine is shared by every run on the pool (concurrent service requests,
say), so an innocent file is never retried beside another run's culprit.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

_PR_SET_PDEATHSIG = 1


def _worker_init(owner: int) -> None:
    """In each decode worker: die with the process that owns the pool, keep stderr for wanwu's own messages."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    _die_with(owner)
    _quiet_stderr()
    warnings.simplefilter("always")  # every file's warnings reach its record (imaging collects them)


def _die_with(owner: int) -> None:
    """Exit as soon as ``owner`` is gone, even if it was SIGKILLed and could not shut the pool down.

    A worker's parent is the forkserver, so PR_SET_PDEATHSIG covers the server's death; a watch thread
    covers the owner's (the server itself exits once the owner and the workers are gone)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # the pid was reused by another user's process: the owner is gone
                os._exit(1)
            if os.getppid() == 1:  # re-parented to init: the forkserver died
                os._exit(1)

    threading.Thread(target=watch, name="wanwu-owner-watch", daemon=True).start()


def _quiet_stderr() -> None:
    """C libraries (libtiff, libjpeg) print about odd files straight to file descriptor 2; in a decode worker
    that text says nothing the record does not, so it goes to /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        pass


class DecodePool:
    """Decode workers: :class:`DecodeProcesses`, or ``threads`` threads when ``workers == 0``; plus the
    quarantine, where a suspect file is decoded alone. Safe to share between threads (the service's requests
    share one)."""

    def __init__(self, workers: int, threads: int = 4) -> None:
        self.workers, self.threads = workers, threads
        self._pool: DecodeProcesses | ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # One process, one task at a time: the next starts only when the last has finished, so a crash or a
        # deadline names its task exactly.
        self._quarantine = DecodeProcesses(1, name="wanwu-quarantine") if workers > 0 else None

    @property
    def started(self) -> bool:
        """The workers were asked for (by :meth:`start` or a task): later runs use them, however short."""
        return self._pool is not None

    def start(self) -> None:
        """Start every worker now, in the background (a server, or a run known to be long, while its model
        loads); otherwise each starts with its first task."""
        pool = self.get()
        if isinstance(pool, DecodeProcesses):
            with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing to start
                for _ in range(self.workers):
                    pool.submit(int)

    def submit_here(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on a thread of this process, started for it: what a run of a few files does
        instead of starting worker processes (which costs more than decoding them). The thread is a daemon:
        it cannot be stopped, and it never keeps the process from exiting."""
        future: Future[Any] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)

        threading.Thread(target=run, name="wanwu-decode-here", daemon=True).start()
        return future

    def get(self) -> Executor:
        with self._lock:
            if self._pool is None:
                if self.workers == 0:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="wanwu-decode")
                else:
                    self._pool = DecodeProcesses(self.workers)
            return self._pool

    def submit(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Future[Any]:
        """Run ``fn(*args)`` on a worker. In a process, a task still running ``timeout`` seconds after it
        started is stopped (its process killed) and raises DecodeTimeoutError; a task that crashes its process
        raises BrokenProcessPool. A thread cannot be stopped: the caller gives up on it instead."""
        pool = self.get()
        if isinstance(pool, DecodeProcesses):
            return pool.submit_within(timeout, fn, *args)
        return pool.submit(fn, *args)

    @property
    def stoppable(self) -> bool:
        """Workers are processes: :meth:`submit` enforces its deadlines itself."""
        return self.workers > 0

    def isolate(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Future[Any]:
        """Run ``fn(*args)`` alone in the quarantine process. The future raises BrokenProcessPool only when
        this very call crashed its process, and DecodeTimeoutError when it ran past ``timeout`` seconds (its
        process is then killed)."""
        if self._quarantine is None:  # threads cannot crash each other's process: run it in the pool
            return self.get().submit(fn, *args)
        return self._quarantine.submit_within(timeout, fn, *args)

    def close(self, wait: bool = True) -> None:
        """Stop the workers. Idle ones exit; one still busy (a hung decoder) is killed, never waited for."""
        with self._lock:
            pool, self._pool = self._pool, None
        if isinstance(pool, DecodeProcesses):
            pool.shutdown(wait=False, cancel_futures=True)
        elif pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
        if self._quarantine is not None:
            self._quarantine.shutdown(wait=False, cancel_futures=True)


class DecodeTimeoutError(Exception):
    """A decode ran past its deadline and its process was killed."""


class DecodeProcess:
    """One decode process driven synchronously over a pipe, for a caller that waits for each call (a worker
    thread of :class:`DecodeProcesses`, the quarantine's thread, a Ray decode task): no executor threads between
    the two, so a call costs little more than the decode itself. A call that kills the process raises
    BrokenProcessPool; one still running at ``timeout`` seconds has its process killed and raises
    DecodeTimeoutError. Either way the next call starts a fresh process. One thread makes the calls; any
    thread may :meth:`kill`.

    The process is forked from a server that has imported only what decoding needs (Pillow, numpy): fast to
    start, no threads or sockets of the parent inherited, the caller's ``__main__`` never re-run
    (:mod:`wanwu._decode_server`)."""

    def __init__(self) -> None:
        self._process: Any = None
        self._conn: Any = None
        self._killed: Any = None  # the process kill() was last called on: dead, even if not reaped yet

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None) -> Any:
        conn = self._connection()
        try:
            conn.send((fn, args))
            ready = conn.poll(timeout)
        except (OSError, EOFError):
            self.close()
            raise _broken("the decode process died") from None
        if not ready:
            self.close()
            raise DecodeTimeoutError(f"decoding took longer than {timeout or 0:g} s")
        try:
            ok, value = conn.recv()
        except (OSError, EOFError):
            self.close()
            raise _broken("the decode process died") from None
        if not ok:
            raise RuntimeError(value)
        return value

    def _connection(self) -> Any:
        if self._process is None or self._process is self._killed or not self._process.is_alive():
            self.close()
            import multiprocessing  # here: a run that decodes in its own process never needs it

            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["wanwu._decode_server", "wanwu.imaging", "wanwu.decoders"])
            ours, theirs = ctx.Pipe()
            self._process = ctx.Process(target=_serve, args=(theirs, os.getpid()), daemon=True,
                                        name="wanwu-decode")
            self._process.start()
            theirs.close()
            self._conn = ours
            # A deadline counts from when the task starts, not from when the process does (on a loaded
            # machine, starting one can take longer than a short --decode-timeout): wait until it is ready.
            try:
                ready = ours.poll(START_TIMEOUT_S) and ours.recv() == _READY
            except (OSError, EOFError):
                ready = False
            if not ready:
                self.close()
                raise _broken("the decode process did not start")
        return self._conn

    def kill(self) -> None:
        """Kill the process from any thread: a call in progress fails with BrokenProcessPool (its own thread
        then closes the pipe: closing it here could hand its descriptor to a new file mid-call)."""
        process = self._process
        if process is not None:
            self._killed = process  # the next call starts a fresh one, not one still dying
            with contextlib.suppress(OSError, ValueError, AttributeError):
                process.kill()

    def close(self) -> None:
        """Stop the process (killed: it may be stuck in a decoder)."""
        process, conn, self._process, self._conn = self._process, self._conn, None, None
        if conn is not None:
            conn.close()
        if process is not None:
            _kill_workers_of([process])


def _serve(conn: Any, owner: int) -> None:
    """The loop of a :class:`DecodeProcess`: call, answer ``(True, result)`` or ``(False, "Type: message")``."""
    _worker_init(owner)
    conn.send(_READY)
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            answer = (True, fn(*args))
        except Exception as e:
            answer = (False, f"{type(e).__name__}: {e}")
        conn.send(answer)


def _broken(message: str) -> Exception:
    """concurrent.futures' BrokenProcessPool (its module, which imports multiprocessing, loaded only now)."""
    from concurrent.futures.process import BrokenProcessPool

    return BrokenProcessPool(message)


_READY = "ready"  # what a decode process says once it can take tasks
START_TIMEOUT_S = 120.0  # a decode process not ready by then is taken for dead

CRASHED = "the decoder process crashed on this file"  # the record's message, whichever runner decoded it


def timed_out(seconds: float) -> str:
    """The record's message for a decode stopped at its deadline."""
    return f"decoding took longer than {seconds:g} s (--decode-timeout); the decoder was stopped"


def _kill_workers_of(processes: list[Any]) -> None:
    for process in processes:
        try:
            if process.is_alive():
                process.kill()
                process.join(1.0)
        except (OSError, ValueError, AssertionError):
            pass


class DecodeProcesses(Executor):
    """``workers`` decode processes, each driven over its pipe by a thread of its own (:class:`DecodeProcess`).

    A task costs one pipe round trip: none of ProcessPoolExecutor's manager and feeder threads stand between
    the caller and the process, which matters when tasks are small (the service decodes one upload per task).
    A crash fails only the task that caused it, and a task past its deadline (:meth:`submit_within`) only
    itself; either way that process alone starts afresh for the next task, so the pool never breaks as a whole.
    :meth:`kill` stops every process, failing the tasks in flight with BrokenProcessPool."""

    def __init__(self, workers: int, name: str = "wanwu-decode") -> None:
        self._processes = [DecodeProcess() for _ in range(workers)]
        self._idle: queue.SimpleQueue[DecodeProcess] = queue.SimpleQueue()
        for process in self._processes:
            self._idle.put(process)
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if kwargs:
            raise TypeError("decode tasks take positional arguments only")
        return self.submit_within(None, fn, *args)

    def submit_within(self, timeout: float | None, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Like ``submit``, but a task still running ``timeout`` seconds after it started has its process
        killed (the next task gets a fresh one) and raises DecodeTimeoutError. Time spent queued does not
        count; ``None``: no deadline."""
        return self._threads.submit(self._call, fn, args, timeout)

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float | None) -> Any:
        process = self._idle.get()  # as many threads as processes: one is always free here
        try:
            if self._closed:
                raise _broken("the decode workers were shut down")
            return process.call(fn, *args, timeout=timeout)
        finally:
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
