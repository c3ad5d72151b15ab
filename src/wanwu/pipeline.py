"""The orchestrator: inputs -> fetch -> cache/dedupe -> decode -> batch -> infer -> records, streamed.

:class:`Recognizer` is the library entry point and the only thing that knows the whole flow. One run keeps a
window of in-flight inputs in input order; records leave in input order as soon as the head of the window
is done. Every stage is bounded (window, fetches in flight, decodes in flight), so memory does not grow
with the number of inputs:

* fetch: a thread pool reads files / downloads URLs and hashes the bytes (hashlib and I/O drop the GIL);
* cache + dedupe: on the orchestrator thread; a cache hit or a repeat of content already in flight never
  reaches a decoder, and every input still gets its own record;
* decode: worker processes run :func:`wanwu.imaging.prepare`; after a decoder crash each file of the task
  that crashed is retried alone in a quarantine process (:mod:`wanwu.decoders`), so a crash costs exactly its
  file;
* infer: prepared crops go to an :class:`~wanwu.inference.Inference`. Locally, full batches (or a partial one
  when nothing more can arrive soon) run on the engine on up to ``engine.streams`` threads at once, which
  backs off on out-of-memory; in the service, every crop joins the dynamic batcher shared by all requests.
  Results come back to the orchestrator thread as events, like fetches and decodes.

Every front end is a shell over this one flow: the CLI and the library iterate :meth:`Recognizer.recognize`,
the HTTP service runs each request through it on a thread of its own (with the batcher as its inference),
the queue workers run each claimed group of tasks through it. One :class:`Recognizer` serves concurrent
runs: its fetch threads, decode processes, quarantine and cache are shared and thread-safe.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from wanwu.cache import CachedResult, MemoryCache, OneThreadCache, ResultCache
from wanwu.config import RecognizeOptions
from wanwu.decoders import CRASHED, DecodePool, DecodeTimeoutError, timed_out
from wanwu.engine import Engine
from wanwu.errors import CacheError, ErrorType, InputError, OutOfMemoryError
from wanwu.fetch import Fetched, Fetcher
from wanwu.imaging import DecodeResult, Prepared, decode_jobs
from wanwu.inference import Inference, LocalInference
from wanwu.records import Record, RecordOptions, TopScores
from wanwu.sources import InputItem, expand
from wanwu.spec import ModelSpec

log = logging.getLogger("wanwu")
InputLike = str | Path | InputItem
FROM_OPTIONS: Any = object()  # the result cache that ``options`` names (none with ``options.cache`` off)
# A run of at most this many inputs (all known before its first decode) decodes its JPEG and PNG files in
# threads of this process when the decode processes are not running and -j was left to wanwu: starting them
# costs more than such a run (a one-photo ``wanwu recognize`` would spend most of its time on it).
SHORT_RUN = 4
_DECODED_HERE = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG: the formats a short run decodes here


class Recognizer:
    """Load a model once; map any iterable of inputs to an iterator of records, one per input.

    >>> with Recognizer("model.onnx", labels=Path("labels.txt")) as rec:   # doctest: +SKIP
    ...     for record in rec.recognize(["photos/", "https://example.com/cat.jpg"]):
    ...         print(record.to_dict())
    """

    def __init__(
        self,
        model: str | ModelSpec | None = None,
        *,
        labels: Path | str | None = None,
        label_column: str | None = None,
        options: RecognizeOptions | None = None,
        engine: Engine | None = None,
        cache: ResultCache | None = FROM_OPTIONS,
        inference: Inference | None = None,
        on_cache_hit: Callable[[], None] | None = None,
        start_decoders: bool = False,
    ) -> None:
        """``engine``: an already loaded model (else ``model`` + ``labels`` are loaded). ``inference``: where
        prepared crops go (default: batches on the engine). ``on_cache_hit``: told of every result served
        from the cache (metrics). ``start_decoders``: start the decode processes now, while the model loads
        (a server, a queue worker, a run known to be long); otherwise the first run of more than
        :data:`SHORT_RUN` inputs starts them, and shorter runs decode in this process."""
        self.options = options or RecognizeOptions()
        self._fetch_pool: ThreadPoolExecutor | None = None
        self._url_pool: ThreadPoolExecutor | None = None  # downloads apart: slow URLs never stall file reads
        self._lock = threading.Lock()
        self.decoders = DecodePool(self.options.decode_workers, max(1, min(4, self.options.fetch_threads)))
        if start_decoders and self.options.decode_workers > 0:
            self.decoders.start()  # while the model loads: both take a few hundred milliseconds
        label_path = Path(labels) if labels is not None else None
        try:
            self.engine = engine or Engine.load(
                model, label_path, self.options.backend, self.options.batch_size, label_column
            )
        except BaseException:
            self.decoders.close(wait=False)  # a model that fails to load leaves no decode process behind
            raise
        self.inference: Inference = inference or LocalInference(self.engine, self.options.batch_size)
        self.on_cache_hit = on_cache_hit
        self.cache_hits = 0  # records answered from the result cache, over every run of this recognizer
        self.cache: ResultCache | None = None
        try:
            if cache is FROM_OPTIONS:
                if self.options.cache:
                    self.cache = OneThreadCache(lambda: open_cache(self.options))
            elif cache is not None:
                given = cache
                self.cache = OneThreadCache(lambda: given)
        except BaseException:
            self.decoders.close(wait=False)
            self.engine.close()
            raise
        self.fetcher = Fetcher(self.options.max_bytes, self.options.fetch_timeout, self.options.allow_private_urls)
        # What every run decodes and caches by, worked out once rather than per run (a service request is a run)
        self.preprocess = self.options.decode_spec(self.engine.spec.preprocess)
        # results depend on how images were decoded (--full-decode): the cache key says so
        self.namespace = self.options.cache_namespace(self.engine.spec)
        self.decode_options = self.options.decode_options()

    @property
    def spec(self) -> ModelSpec:
        return self.engine.spec

    def recognize(self, inputs: Iterable[InputLike], record: RecordOptions | None = None) -> Iterator[Record]:
        """Records in input order. Strings are expanded like CLI arguments (folders, globs, URLs).

        ``record`` shapes the records (top-k, score, threshold); default: ``options.record``."""
        return _Run(self, _items(inputs), record or self.options.record).records()

    def recognize_one(self, input: InputLike, record: RecordOptions | None = None) -> Record:
        records = list(self.recognize([input], record))
        if len(records) != 1:
            raise ValueError(f"{input!r} expanded to {len(records)} inputs; use recognize() for folders")
        return records[0]

    # -- resources ------------------------------------------------------------------------------------

    def count_cache_hit(self) -> None:
        with self._lock:
            self.cache_hits += 1
        if self.on_cache_hit is not None:
            self.on_cache_hit()

    def fetch_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._fetch_pool is None:
                self._fetch_pool = ThreadPoolExecutor(self.options.fetch_threads, thread_name_prefix="wanwu-fetch")
            return self._fetch_pool

    def url_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._url_pool is None:
                self._url_pool = ThreadPoolExecutor(self.options.fetch_threads, thread_name_prefix="wanwu-url")
            return self._url_pool

    def close(self) -> None:
        with self._lock:
            pools, self._fetch_pool, self._url_pool = (self._fetch_pool, self._url_pool), None, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self.inference.close()
        self.decoders.close()
        self.fetcher.close()
        if self.cache is not None:
            self.cache.close()
        self.engine.close()

    def __enter__(self) -> Recognizer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_cache(options: RecognizeOptions) -> ResultCache:
    """The persistent result cache the options name."""
    try:
        from wanwu.cache.sqlite import SqliteCache
    except ImportError as e:
        raise CacheError(f"the result cache is not available ({e}); run with --no-cache") from e
    return SqliteCache(options.resolved_cache_path())


def _completed(fn: Callable[[InputItem], Fetched], item: InputItem) -> Future[Fetched]:
    """``fn(item)`` run here, as a finished future (what a fetch thread would have handed back)."""
    future: Future[Fetched] = Future()
    try:
        future.set_result(fn(item))
    except Exception as e:
        future.set_exception(e)
    return future


def _items(inputs: Iterable[InputLike]) -> Iterator[InputItem]:
    for value in inputs:
        if isinstance(value, InputItem):
            yield value
        else:
            yield from expand([str(value)])


# --- one run ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Slot:
    item: InputItem
    record: Record | None = None
    sha256: str | None = None
    data: bytes | None = None
    prepared: Prepared | None = None
    followers: list[_Slot] = field(default_factory=list)
    isolated: bool = False


class _Run:
    FLUSH_AFTER_S = 0.05  # a partial batch waits at most this long for more decoded images
    DECODE_CHUNK = 4  # most images sent to a decode worker in one task
    decode = staticmethod(decode_jobs)  # what a decode worker runs (a seam for the crash tests)

    def __init__(self, rec: Recognizer, items: Iterator[InputItem], record: RecordOptions) -> None:
        self.rec = rec
        self.engine = rec.engine
        self.inference = rec.inference
        self.opts = rec.options
        self.record_options = record
        self.preprocess, self.namespace, self.decode_options = rec.preprocess, rec.namespace, rec.decode_options
        self.timeout = self.opts.decode_timeout
        self.decoding: dict[Future[Any], tuple[float, list[_Slot]]] = {}  # deadline, slots
        self.abandoned: set[Future[Any]] = set()
        self.items = items
        self.events: queue.SimpleQueue[tuple[str, Any, Future[Any]]] = queue.SimpleQueue()
        self.window: deque[_Slot] = deque()
        self.to_decode: deque[_Slot] = deque()
        self.suspects: deque[_Slot] = deque()
        self.ready: list[_Slot] = []
        self.leaders: dict[str, _Slot] = {}
        self.memo = MemoryCache(4096)  # recent results by content, for repeats after the leader finished
        self.pending_fetch = 0
        self.pending_decode = 0
        self.pending_infer = 0
        self.streams = self.inference.in_flight
        self.exhausted = False
        self.seen = 0  # inputs taken from ``items`` so far
        self.here: bool | None = None  # a short run, decoding in this process (decided at its first decode)
        self.workers = max(1, self.opts.decode_workers)
        # Several images per task amortize a process round trip; threads need none, and a task of one image
        # is what a deadline can give up on without taking its neighbours along (a thread cannot be stopped).
        self.chunk = self.DECODE_CHUNK if self.opts.decode_workers > 0 else 1
        self.max_fetch = max(4, self.opts.fetch_threads * 2)
        self.max_decode = self.workers * 2 * self.chunk  # a task queued behind each running one
        self.max_window = max(256, self.opts.batch_size * 4)
        # crops handed over at once: a batch locally; everything ready when the inference gathers by itself
        self.handoff = self.inference.gather if self.inference.gather > 1 else self.max_window

    def records(self) -> Iterator[Record]:
        try:
            yield from self._loop()
        except KeyboardInterrupt:
            # Flush everything already finished (out of order past the head), then stop.
            for slot in self.window:
                if slot.record is not None:
                    yield slot.record
            raise
        finally:
            self._abandon()

    def _loop(self) -> Iterator[Record]:
        batch_size = max(1, self.inference.gather)
        while True:
            self._fill()
            while self.window and self.window[0].record is not None:
                record = self.window.popleft().record
                assert record is not None
                yield record
            if not self.window and self.exhausted:
                return
            self._submit_decodes()
            can_infer = bool(self.ready) and self.pending_infer < self.streams
            if can_infer and (len(self.ready) >= batch_size or self._starved()):
                self._infer(min(self.handoff, len(self.ready)))
                continue
            wait = self.FLUSH_AFTER_S if can_infer else 1.0
            if self.decoding:
                nearest = min(deadline for deadline, _ in self.decoding.values())
                wait = max(0.0, min(wait, nearest - time.monotonic()))
            try:
                event = self.events.get(timeout=wait)
            except queue.Empty:
                self._enforce_deadlines()
                if can_infer:
                    self._infer(len(self.ready))
                continue
            self._handle(event)
            while True:  # drain what else has arrived before deciding what to do next
                try:
                    self._handle(self.events.get_nowait())
                except queue.Empty:
                    break

    def _starved(self) -> bool:
        """Nothing can join the current partial batch without waiting on a fetch."""
        if self.pending_decode or self.to_decode or self.suspects:
            return False
        return self.pending_fetch == 0 or len(self.window) >= self.max_window

    # -- stages -----------------------------------------------------------------------------------------

    def _fill(self) -> None:
        pool = None
        while (
            not self.exhausted
            and len(self.window) < self.max_window
            and self.pending_fetch + len(self.to_decode) < self.max_fetch
        ):
            item = next(self.items, None)
            if item is None:
                self.exhausted = True
                break
            slot = _Slot(item)
            self.seen += 1
            self.window.append(slot)
            if item.kind == "missing":
                slot.record = Record.failure(item.input, item.error_type, item.error)
                continue
            if item.kind == "bytes":  # in memory already (an upload): hashing it costs less than a thread hop
                self._fetched(slot, _completed(self.rec.fetcher.fetch, item))
                continue
            pool = self.rec.url_pool() if item.kind == "url" else (pool or self.rec.fetch_pool())
            self.pending_fetch += 1
            future = pool.submit(self.rec.fetcher.fetch, item)
            future.add_done_callback(self._notify("fetch", slot))

    def _submit_decodes(self) -> None:
        while self.suspects:
            # After a decoder crash (or a deadline), each file of the failed tasks is retried alone in the
            # quarantine process, so a second crash names its culprit exactly; the workers go on meanwhile.
            slot = self.suspects.popleft()
            slot.isolated = True
            self.pending_decode += 1
            future = self.rec.decoders.isolate(
                self.decode, [slot.data or b""], self.preprocess, self.decode_options, timeout=self.timeout
            )
            future.add_done_callback(self._notify("decode", [slot]))
        while self.to_decode and self.pending_decode < self.max_decode:
            if self._short() and (self.to_decode[0].data or b"").startswith(_DECODED_HERE):
                self._submit_decode([self.to_decode.popleft()], here=True)
                continue
            # Several images per task when many wait: each round trip to a worker process costs CPU on both
            # sides (pickling, waking a thread and a process).
            size = max(1, min(self.chunk, len(self.to_decode) // self.workers))
            self._submit_decode([self.to_decode.popleft() for _ in range(size)])

    def _short(self) -> bool:
        """This run decodes its JPEG and PNG files in this process (see :data:`SHORT_RUN`)."""
        if self.here is None:
            self.here = (self.opts.workers == -1 and self.exhausted and self.seen <= SHORT_RUN
                         and not self.rec.decoders.started)
        return self.here

    def _submit_decode(self, slots: list[_Slot], here: bool = False) -> None:
        self.pending_decode += len(slots)
        datas = [s.data or b"" for s in slots]
        if here:
            future = self.rec.decoders.submit_here(self.decode, datas, self.preprocess, self.decode_options)
        else:
            future = self.rec.decoders.submit(
                self.decode, datas, self.preprocess, self.decode_options, timeout=self.timeout * len(slots)
            )
        if here or not self.rec.decoders.stoppable:  # a thread: give up on it at its deadline
            queued = 0 if here else self.chunk  # a pool's thread may first finish the task before it
            self.decoding[future] = (time.monotonic() + self.timeout * (len(slots) + queued), slots)
        future.add_done_callback(lambda f: self.events.put(("decode", slots, f)))

    def _notify(self, kind: str, subject: _Slot | list[_Slot]) -> Callable[[Future[Any]], None]:
        def done(future: Future[Any]) -> None:
            self.events.put((kind, subject, future))

        return done

    def _handle(self, event: tuple[str, Any, Future[Any]]) -> None:
        kind, subject, future = event
        if kind == "fetch":
            self.pending_fetch -= 1
            self._fetched(subject, future)
        elif kind == "decode":
            self.decoding.pop(future, None)
            if future in self.abandoned:  # given up on at its deadline (a thread that finally returned)
                self.abandoned.discard(future)
                return
            self.pending_decode -= len(subject)
            self._decoded(subject, future)
        else:
            self.pending_infer -= 1
            self._inferred(subject, future)

    def _fetched(self, slot: _Slot, future: Future[Fetched]) -> None:
        exc = future.exception()
        if exc is not None:
            if isinstance(exc, InputError):
                self._fail(slot, exc.type, str(exc))
            else:
                self._fail(slot, "fetch_error", f"{type(exc).__name__}: {exc}")
            return
        fetched = future.result()
        sha = slot.sha256 = fetched.sha256
        if (leader := self.leaders.get(sha)) is not None:
            leader.followers.append(slot)
            return
        hit = self.memo.get_many(self.namespace, [sha]).get(sha)
        if hit is None and self.rec.cache is not None:
            hit = self.rec.cache.get_many(self.namespace, [sha]).get(sha)
            if hit is not None:
                self.rec.count_cache_hit()
        if hit is not None:
            slot.record = self._ok(slot, hit)
            return
        self.leaders[sha] = slot
        slot.data = fetched.data
        self.to_decode.append(slot)

    def _enforce_deadlines(self) -> None:
        """A decode thread past its deadline cannot be stopped: give up on its files. (A decode process past
        its deadline is stopped by the pool, and its task fails with DecodeTimeoutError.)"""
        now = time.monotonic()
        for future, (deadline, slots) in list(self.decoding.items()):
            if now < deadline or future.done():
                continue
            del self.decoding[future]
            self.abandoned.add(future)
            self.pending_decode -= len(slots)
            for slot in slots:
                self._fail(slot, "decode_error", self._timed_out())

    def _timed_out(self) -> str:
        return timed_out(self.timeout)

    def _decoded(self, slots: list[_Slot], future: Future[list[DecodeResult]]) -> None:
        exc = future.exception()
        if isinstance(exc, DecodeTimeoutError) and len(slots) == 1:  # it ran alone: the culprit is known
            self._fail(slots[0], "decode_error", self._timed_out())
            return
        if isinstance(exc, (BrokenExecutor, DecodeTimeoutError)):  # a decode process died (BrokenProcessPool)
            for slot in slots:  # any of them may have crashed it or hung: each is retried alone
                if slot.isolated:
                    self._fail(slot, "decode_error", CRASHED)
                else:
                    self.suspects.append(slot)
            return
        if exc is not None:
            for slot in slots:
                self._fail(slot, "internal", f"{type(exc).__name__}: {exc}")
            return
        for slot, result in zip(slots, future.result(), strict=True):
            slot.data = None
            if slot.record is not None:
                continue  # already answered (given up on at a deadline)
            if isinstance(result, tuple):
                self._fail(slot, result[0], result[1])
            else:
                slot.prepared = result
                self.ready.append(slot)

    def _infer(self, n: int) -> None:
        """Hand the first ``n`` ready images to the inference; the result comes back as an event."""
        batch, self.ready = self.ready[:n], self.ready[n:]
        pixels = [s.prepared.pixels for s in batch if s.prepared is not None]
        self.pending_infer += 1
        future = self.inference.submit(pixels)
        future.add_done_callback(lambda f: self.events.put(("infer", batch, f)))

    def _inferred(self, batch: list[_Slot], future: Future[list[TopScores]]) -> None:
        exc = future.exception()
        if isinstance(exc, OutOfMemoryError):
            for slot in batch:
                self._fail(slot, "too_large", f"out of memory even for a batch of one: {exc}")
            return
        if exc is not None:
            raise exc  # a broken model is fatal for the run, not a per-image error
        tops = future.result()
        fresh = []
        for slot, top in zip(batch, tops, strict=True):
            assert slot.prepared is not None and slot.sha256 is not None
            if not math.isfinite(top.logsumexp):  # NaN or inf among the scores: never a record, never cached
                slot.prepared = None
                self._fail(slot, "model_error", "the model returned scores that are not finite numbers for this image")
                continue
            result = CachedResult(top, slot.prepared.width, slot.prepared.height, slot.prepared.warnings)
            slot.prepared = None
            fresh.append((slot.sha256, result))
            self._finish(slot, lambda s, r=result: self._ok(s, r))
        self.memo.put_many(self.namespace, fresh)
        if self.rec.cache is not None:
            self.rec.cache.put_many(self.namespace, fresh)

    # -- records ----------------------------------------------------------------------------------------

    def _ok(self, slot: _Slot, result: CachedResult) -> Record:
        return Record.success(
            slot.item.input, result.top, self.engine.spec, self.record_options,
            sha256=slot.sha256, width=result.width, height=result.height, warnings=result.warnings,
        )

    def _fail(self, slot: _Slot, type: ErrorType, message: str) -> None:
        self._finish(slot, lambda s: Record.failure(s.item.input, type, message, s.sha256))

    def _finish(self, slot: _Slot, make: Any) -> None:
        slot.record = make(slot)
        slot.data = None
        for follower in slot.followers:
            follower.record = make(follower)
        slot.followers.clear()
        if slot.sha256 is not None and self.leaders.get(slot.sha256) is slot:
            del self.leaders[slot.sha256]

    def _abandon(self) -> None:
        self.window.clear()
        self.ready.clear()
        self.to_decode.clear()
        self.suspects.clear()
        self.leaders.clear()
