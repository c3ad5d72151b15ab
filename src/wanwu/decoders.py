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
decompression bomb fails its own allocation (a too_large record) instead of taking the machine's memory.
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
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future, ThreadPoolExecutor
from typing import Any, ClassVar, Final, Literal

from wanwu.errors import ClosedError, ErrorType
from wanwu.imaging import DecodeOptions, DecodeResult, decode_each
from wanwu.spec import PreprocessSpec

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
            return pool.submit_each(timeout, fn, datas, *args, meter=meter)
        return pool.submit(_metered, meter, fn, datas, *args)

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
            return self.get().submit(_metered, meter, fn, *args)
        return self._quarantine.submit_within(timeout, fn, *args, meter=meter)

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


def _metered(meter: Callable[[float], None] | None, fn: Callable[..., Any], *args: Any) -> Any:
    start = time.monotonic()
    try:
        return fn(*args)
    finally:
        if meter is not None:
            meter(time.monotonic() - start)


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
            _kill_workers_of([process])


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
