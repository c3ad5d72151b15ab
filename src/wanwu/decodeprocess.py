"""One decode process, driven synchronously over a pipe (:class:`DecodeProcess`), and what runs in it.

The process is forked from a server that has imported only what decoding needs (:mod:`wanwu.forkserver`); it
dies with the process that owns it, keeps file descriptor 2 quiet, and may map only a set amount of memory
beyond what it maps at start (``RLIMIT_AS``), so a decompression bomb fails its own allocation. The pools built
on it are in :mod:`wanwu.decoders`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import BrokenExecutor
from typing import Any

_PR_SET_PDEATHSIG = 1


def _worker_init(owner: int, address_space: int | None = None) -> None:
    """In each decode worker: die with the process that owns the pool, keep stderr for wanwu's own messages,
    and hold at most ``address_space`` more bytes of address space than at start (a decompression bomb then
    fails its own decode with MemoryError, a too_large record, instead of taking the machine's memory)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    _die_with(owner)
    _quiet_stderr()
    warnings.simplefilter("always")  # every file's warnings reach its record (imaging collects them)
    if address_space:
        _limit_address_space(address_space)
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # this process is wanwu's own: --max-pixels decides, not Pillow's default


def _limit_address_space(extra: int) -> None:
    """RLIMIT_AS = what the process maps now + ``extra`` (Linux; elsewhere nothing is limited)."""
    try:
        import resource

        with open("/proc/self/status", encoding="ascii") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = size + extra
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError, StopIteration):
        pass


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


class DecodeTimeoutError(Exception):
    """A decode ran past its deadline and its process was killed. ``index``: the item of the task that did
    (:meth:`DecodeProcess.call_each`; 0 for a single call)."""

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


class DecoderDiedError(BrokenExecutor):
    """A decode process died or was killed (a crash, a deadline, a shut-down pool): its tasks fail with this.
    (The standard library's ``BrokenProcessPool`` would cost a run of a few files the import of
    ``multiprocessing``, which only a long run needs.)"""


class DecodeCrashError(DecoderDiedError):
    """The decode process died during item ``index`` of :meth:`DecodeProcess.call_each`."""

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


class DecodeProcess:
    """One decode process driven synchronously over a pipe, for a caller that waits for each call (a worker
    thread of :class:`DecodeProcesses`, the quarantine's thread, a Ray decode task): no executor threads between
    the two, so a call costs little more than the decode itself. A call that kills the process raises
    DecoderDiedError; one still running at ``timeout`` seconds has its process killed and raises
    DecodeTimeoutError. Either way the next call starts a fresh process. One thread makes the calls; any
    thread may :meth:`kill`.

    The process is forked from a server that has imported only what decoding needs (Pillow, numpy): fast to
    start, no threads or sockets of the parent inherited, the caller's ``__main__`` never re-run
    (:mod:`wanwu._decode_server`)."""

    def __init__(self, address_space: int | None = None) -> None:
        self.address_space = address_space  # see DecodePool
        self._process: Any = None
        self._conn: Any = None
        self._progress: Any = None  # shared with the process: [item in progress, when it started (monotonic)]
        self._killed: Any = None  # the process kill() was last called on: dead, even if not reaped yet

    def call_each(self, fn: Callable[..., Any], datas: list[Any], *args: Any, timeout: float | None) -> list[Any]:
        """``fn(datas, *args)`` one item at a time: the process runs ``fn([item], *args)`` for each item, noting
        in shared memory which item it is on and since when, and answers once with every result. An item still
        running ``timeout`` seconds after it started has the process killed (DecodeTimeoutError), and a crash
        raises DecodeCrashError: either names its item (``index``); the other items are to be decoded again."""
        conn = self._connection()
        progress = self._progress
        progress[0] = -1.0
        try:
            conn.send((fn, (datas, *args), True))
        except (OSError, EOFError):
            self.close()
            raise DecodeCrashError("the decode process died", 0) from None
        start = time.monotonic()
        try:
            while not self._answered(conn, progress, start, timeout):
                pass
            ok, value = conn.recv()
        except (OSError, EOFError):
            index = max(0, int(progress[0]))
            self.close()
            raise DecodeCrashError("the decode process died", index) from None
        if not ok:
            raise RuntimeError(value)
        return list(value)

    def _answered(self, conn: Any, progress: Any, start: float, timeout: float | None) -> bool:
        """Wait for the answer until the item in progress is due; raise DecodeTimeoutError once it is past due."""
        if timeout is None:
            return bool(conn.poll(None))
        index = int(progress[0])
        began = progress[1] if index >= 0 else start
        if conn.poll(max(0.0, began + timeout - time.monotonic())):
            return True
        if int(progress[0]) == index and time.monotonic() >= began + timeout:  # still that item: past due
            self.close()
            raise DecodeTimeoutError(f"decoding took longer than {timeout:g} s", max(0, index))
        return False

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None) -> Any:
        conn = self._connection()
        try:
            conn.send((fn, args, False))
            ready = conn.poll(timeout)
        except (OSError, EOFError):
            self.close()
            raise DecoderDiedError("the decode process died") from None
        if not ready:
            self.close()
            raise DecodeTimeoutError(f"decoding took longer than {timeout or 0:g} s")
        try:
            ok, value = conn.recv()
        except (OSError, EOFError):
            self.close()
            raise DecoderDiedError("the decode process died") from None
        if not ok:
            raise RuntimeError(value)
        return value

    def _connection(self) -> Any:
        if self._process is None or self._process is self._killed or not self._process.is_alive():
            self.close()
            from wanwu.forkserver import context

            ctx = context()
            ours, theirs = ctx.Pipe()
            self._progress = ctx.RawArray("d", 2)  # CLOCK_MONOTONIC is one clock for every process (Linux)
            self._process = ctx.Process(target=_serve,
                                        args=(theirs, os.getpid(), self.address_space, self._progress),
                                        daemon=True, name="wanwu-decode")
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
                raise DecoderDiedError("the decode process did not start")
        return self._conn

    def kill(self) -> None:
        """Kill the process from any thread: a call in progress fails with DecoderDiedError (its own thread
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
            kill_processes([process])


def _serve(conn: Any, owner: int, address_space: int | None = None, progress: Any = None) -> None:
    """The loop of a :class:`DecodeProcess`: call, answer ``(True, result)`` or ``(False, "Type: message")``.
    A call ``each`` item at a time notes in ``progress`` which item it is on, and since when."""
    _worker_init(owner, address_space)
    conn.send(_READY)
    while True:
        try:
            fn, args, each = conn.recv()
        except (EOFError, OSError):
            return
        answer: tuple[bool, Any]
        try:
            if each:
                results = []
                for index, item in enumerate(args[0]):
                    progress[1] = time.monotonic()
                    progress[0] = index
                    results.append(fn([item], *args[1:])[0])
                answer = (True, results)
            else:
                answer = (True, fn(*args))
        except Exception as e:
            answer = (False, f"{type(e).__name__}: {e}")
        conn.send(answer)


_READY = "ready"  # what a decode process says once it can take tasks
START_TIMEOUT_S = 120.0  # a decode process not ready by then is taken for dead

def kill_processes(processes: list[Any]) -> None:
    """Kill each (multiprocessing) process still alive, and reap it."""
    for process in processes:
        try:
            if process.is_alive():
                process.kill()
                process.join(1.0)
        except (OSError, ValueError, AssertionError):
            pass


