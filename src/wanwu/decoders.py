"""The decode workers: a pool of processes (or threads) running :func:`wanwu.imaging.decode_jobs`, replaced
when a crash breaks it, and a one-process quarantine where suspects of a crash are decoded one at a time.

A crash breaks every task in flight on a process pool, and any of them may be the culprit. The orchestrator
sends each of them to :meth:`DecodePool.isolate`: alone in the quarantine process, a second crash names its file
exactly, while the main pool goes on with everything else. The quarantine is shared by every run on the pool
(concurrent service requests, say), so an innocent file is never retried beside another run's culprit.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any


def decode_process_pool(workers: int) -> ProcessPoolExecutor:
    """Decode worker processes, forked from a server that has imported only what decoding needs
    (Pillow, numpy): fast to start, and no threads or sockets of the parent inherited."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["wanwu.imaging", "wanwu.decoders"])
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means


class DecodePool:
    """Decode workers (processes, or ``threads`` threads when ``workers == 0``), replaced when a crash
    breaks them, plus the quarantine. ``get`` names the pool's generation, so a breakage reported by many
    futures replaces it once. Safe to share between threads."""

    def __init__(self, workers: int, threads: int = 4) -> None:
        self.workers, self.threads = workers, threads
        self._pool: Executor | None = None
        self.generation = 0
        self._lock = threading.Lock()
        self._quarantine = _Quarantine() if workers > 0 else None

    def get(self) -> tuple[Executor, int]:
        with self._lock:
            if self._pool is None:
                if self.workers == 0:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="wanwu-decode")
                else:
                    self._pool = decode_process_pool(self.workers)
            return self._pool, self.generation

    def reset(self, generation: int) -> None:
        """Replace a broken pool (once per breakage, however many futures report it)."""
        with self._lock:
            if generation == self.generation and self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                self.generation += 1

    def isolate(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` alone in the quarantine process. The future raises BrokenProcessPool only when
        this very call crashed its process."""
        if self._quarantine is None:  # threads cannot crash each other's process: run it in the pool
            return self.get()[0].submit(fn, *args)
        return self._quarantine.submit(fn, *args)

    def close(self, wait: bool = True) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
        if self._quarantine is not None:
            self._quarantine.close()


class _Quarantine:
    """One decode process, one task at a time: the next task starts only when the last one has finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: deque[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = deque()
        self._busy = False
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        outer: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the decode pool is closed")
            self._waiting.append((fn, args, outer))
        self._next()
        return outer

    def _next(self) -> None:
        with self._lock:
            if self._busy or not self._waiting or self._closed:
                return
            fn, args, outer = self._waiting.popleft()
            self._busy = True
            self._pool = self._pool or decode_process_pool(1)
            pool = self._pool
        try:
            inner = pool.submit(fn, *args)
        except Exception as e:  # the pool broke between tasks
            self._finished(outer, None, e)
            return
        inner.add_done_callback(lambda f: self._finished(outer, f, None))

    def _finished(self, outer: Future[Any], inner: Future[Any] | None, error: BaseException | None) -> None:
        if inner is not None:
            error = inner.exception()
        with self._lock:
            self._busy = False
            if isinstance(error, BrokenProcessPool) and self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        if error is not None:
            outer.set_exception(error)
        elif inner is not None:
            outer.set_result(inner.result())
        self._next()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            waiting, self._waiting = list(self._waiting), deque()
        for _, _, outer in waiting:
            outer.cancel()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
