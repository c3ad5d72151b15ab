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

import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from wanwu.cache import CachedResult, MemoryCache, OneThreadCache, ResultCache
from wanwu.cache.memo import Memo, Remembered
from wanwu.config import RecognizeOptions
from wanwu.decoders import CRASHED, DecodePool, DecodeTimeoutError, timed_out
from wanwu.engine import Engine
from wanwu.errors import CacheError, ErrorType, InputError, OutOfMemoryError
from wanwu.fetch import Fetched, Fetcher
from wanwu.imaging import DecodeResult, Prepared, decode_jobs
from wanwu.inference import Inference, LocalInference
from wanwu.records import Record, RecordOptions, RecordStream, TopScores
from wanwu.sources import InputItem, expand
from wanwu.spec import ModelSpec
from wanwu.unchanged import Look, Probed, Prober, open_memo, remember

log = logging.getLogger("wanwu")
InputLike = str | Path | InputItem
FROM_OPTIONS: Any = object()  # the result cache that ``options`` names (none with ``options.cache`` off)


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
        memo: Memo | None = FROM_OPTIONS,
    ) -> None:
        """``engine``: an already loaded model (else ``model`` + ``labels`` are loaded). ``inference``: where
        prepared crops go (default: batches on the engine). ``on_cache_hit``: told of every result served
        from the cache (metrics). ``memo``: the stat memo (default: the one beside the options' cache, when
        the result cache is the options' own)."""
        self.options = options or RecognizeOptions()
        self._fetch_pool: ThreadPoolExecutor | None = None
        self._url_pool: ThreadPoolExecutor | None = None  # downloads apart: slow URLs never stall file reads
        self._lock = threading.Lock()
        self.decoders = DecodePool(self.options.decode_workers, max(1, min(4, self.options.fetch_threads)))
        if engine is None and self.options.decode_workers > 0:
            # Start the decode processes while the model loads: both take a few hundred milliseconds.
            threading.Thread(target=self._warm_decoders, args=(self.decoders.get(),), daemon=True).start()
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
        self.unchanged = 0  # of those, inputs the stat memo vouched for: never read
        self.cache: ResultCache | None = None
        self.prober: Prober | None = None
        try:
            if cache is FROM_OPTIONS:
                if self.options.cache:
                    self.cache = OneThreadCache(lambda: open_cache(self.options))
            elif cache is not None:
                given = cache
                self.cache = OneThreadCache(lambda: given)
            if memo is FROM_OPTIONS:
                memo = open_memo(self.options) if self.options.cache and cache is FROM_OPTIONS else None
            if memo is not None and self.cache is not None:
                self.prober = Prober(memo, rehash=self.options.rehash, max_bytes=self.options.max_bytes)
        except BaseException:
            self.decoders.close(wait=False)
            self.engine.close()
            raise
        self.fetcher = Fetcher(self.options.max_bytes, self.options.fetch_timeout, self.options.allow_private_urls)

    @property
    def spec(self) -> ModelSpec:
        return self.engine.spec

    def recognize(self, inputs: Iterable[InputLike], record: RecordOptions | None = None) -> Iterator[Record]:
        """Records in input order. Strings are expanded like CLI arguments (folders, globs, URLs).

        ``record`` shapes the records (top-k, score, threshold); default: ``options.record``."""
        run = _Run(self, _items(inputs), record or self.options.record)
        return RecordStream(run.records(), run.head_ready)

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

    def count_unchanged(self, n: int) -> None:
        """``n`` inputs answered from the cache without being read (the stat memo vouched for them)."""
        with self._lock:
            self.cache_hits += n
            self.unchanged += n
        if self.on_cache_hit is not None:
            for _ in range(n):
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

    def _warm_decoders(self, pool: Executor) -> None:
        with contextlib.suppress(RuntimeError):  # closed before the warm-up got going: nothing to warm
            for _ in range(self.options.decode_workers):
                pool.submit(int)

    def close(self) -> None:
        with self._lock:
            pools, self._fetch_pool, self._url_pool = (self._fetch_pool, self._url_pool), None, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self.inference.close()
        self.decoders.close()
        self.fetcher.close()
        if self.prober is not None:
            self.prober.memo.close()
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
    look: Look | None = None  # what the stat memo knows of it


class _Run:
    FLUSH_AFTER_S = 0.05  # a partial batch waits at most this long for more decoded images
    DECODE_CHUNK = 4  # most images sent to a decode worker in one task
    PROBE_BLOCK = 512  # most inputs looked up in the stat memo at once (the first blocks are smaller)
    REMEMBER_BATCH = 512  # memo entries written at once
    decode = staticmethod(decode_jobs)  # what a decode worker runs (a seam for the crash tests)

    def __init__(self, rec: Recognizer, items: Iterator[InputItem], record: RecordOptions) -> None:
        self.rec = rec
        self.engine = rec.engine
        self.inference = rec.inference
        self.opts = rec.options
        self.record_options = record
        self.preprocess = self.opts.decode_spec(rec.engine.spec.preprocess)
        # results depend on how images were decoded (--full-decode): the cache key says so
        self.namespace = self.opts.cache_namespace(rec.engine.spec)
        self.decode_options = self.opts.decode_options()
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
        self.to_fetch: deque[_Slot] = deque()
        self.probing = 0  # blocks of inputs being looked up in the stat memo
        self.block = 16  # the next block's size: small first (the first records come soon), then larger
        self.remembered: list[tuple[str, Remembered]] = []  # memo entries not written yet
        self.pending_decode = 0
        self.pending_infer = 0
        self.streams = self.inference.in_flight
        self.exhausted = False
        self.workers = max(1, self.opts.decode_workers)
        # Several images per task amortize a process round trip; threads need none, and a task of one image
        # is what a deadline can give up on without taking its neighbours along (a thread cannot be stopped).
        self.chunk = self.DECODE_CHUNK if self.opts.decode_workers > 0 else 1
        self.max_fetch = max(4, self.opts.fetch_threads * 2)
        self.max_decode = self.workers * 2 * self.chunk  # a task queued behind each running one
        self.max_window = max(2 * self.PROBE_BLOCK, self.opts.batch_size * 4)  # records waiting to leave in order
        self.max_busy = max(256, self.opts.batch_size * 4)  # of them, holding bytes or pixels: memory
        # crops handed over at once: a batch locally; everything ready when the inference gathers by itself
        self.handoff = self.inference.gather if self.inference.gather > 1 else self.max_busy

    def records(self) -> Generator[Record, None, None]:
        try:
            yield from self._loop()
        except KeyboardInterrupt:
            # Flush everything already finished (out of order past the head), then stop.
            for slot in self.window:
                if slot.record is not None:
                    yield slot.record
            raise
        finally:
            self._remember()
            self._abandon()

    def head_ready(self) -> bool:
        return bool(self.window) and self.window[0].record is not None

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
        return (self.pending_fetch == 0 and self.probing == 0) or len(self.window) >= self.max_window or (
            len(self.ready) + self.pending_decode + len(self.to_decode) >= self.max_busy)

    # -- stages -----------------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Inputs in blocks, each looked up in the stat memo on a fetch thread; the rest queue for a fetch."""
        while (
            not self.exhausted
            and len(self.window) < self.max_window
            and len(self.ready) + self.pending_decode + len(self.to_decode) < self.max_busy
            and self.probing < 2
            and self.pending_fetch + len(self.to_fetch) + len(self.to_decode) < self.max_fetch
        ):
            block: list[_Slot] = []
            limit = min(self.block, self.max_window - len(self.window))
            while len(block) < limit:
                item = next(self.items, None)
                if item is None:
                    self.exhausted = True
                    break
                slot = _Slot(item)
                self.window.append(slot)
                if item.kind == "missing":
                    slot.record = Record.failure(item.input, item.error_type, item.error)
                else:
                    block.append(slot)
            if not block:
                continue
            if self.rec.prober is None:
                self.to_fetch.extend(block)
                continue
            self.block = min(self.PROBE_BLOCK, self.block * 2)
            self.probing += 1
            future = self.rec.fetch_pool().submit(
                self.rec.prober.probe, [s.item for s in block], self.rec.cache, self.namespace
            )
            future.add_done_callback(self._notify("probe", block))
        self._submit_fetches()

    def _submit_fetches(self) -> None:
        pool = None
        while self.to_fetch and self.pending_fetch + len(self.to_decode) < self.max_fetch:
            slot = self.to_fetch.popleft()
            item = slot.item
            pool = self.rec.url_pool() if item.kind == "url" else (pool or self.rec.fetch_pool())
            self.pending_fetch += 1
            known = slot.look.known if slot.look is not None and slot.look.cached is not None else None
            future = pool.submit(self.rec.fetcher.fetch, item, known)
            future.add_done_callback(self._notify("fetch", slot))

    def _probed(self, block: list[_Slot], future: Future[Probed]) -> None:
        """Inputs the memo vouches for get their records from the cache; the others queue for a fetch."""
        self.probing -= 1
        exc = future.exception()
        if exc is not None:  # the memo is only a shortcut: without it, each input is read
            log.debug("stat memo lookup failed (%s: %s); reading the inputs", type(exc).__name__, exc)
            self.to_fetch.extend(block)
            return
        probed = future.result()
        answered = 0
        for i, slot in enumerate(block):
            slot.look = probed.looks[i]
            found = probed.answer(i)
            if found is not None:
                slot.sha256, result = found
                slot.record = self._ok(slot, result)
                answered += 1
            else:
                self.to_fetch.append(slot)
        if answered:
            self.rec.count_unchanged(answered)

    def _remember(self) -> None:
        if self.remembered and self.rec.prober is not None:
            entries, self.remembered = self.remembered, []
            self.rec.prober.memo.put_many(entries)

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
            # Several images per task when many wait: each round trip to a worker process costs CPU on both
            # sides (pickling, waking a thread and a process).
            size = max(1, min(self.chunk, len(self.to_decode) // self.workers))
            self._submit_decode([self.to_decode.popleft() for _ in range(size)])

    def _submit_decode(self, slots: list[_Slot]) -> None:
        self.pending_decode += len(slots)
        datas = [s.data or b"" for s in slots]
        future = self.rec.decoders.submit(
            self.decode, datas, self.preprocess, self.decode_options, timeout=self.timeout * len(slots)
        )
        if not self.rec.decoders.stoppable:  # a thread: give up on it at its deadline (it may wait behind one)
            self.decoding[future] = (time.monotonic() + self.timeout * (len(slots) + self.chunk), slots)
        future.add_done_callback(lambda f: self.events.put(("decode", slots, f)))

    def _notify(self, kind: str, subject: _Slot | list[_Slot]) -> Callable[[Future[Any]], None]:
        def done(future: Future[Any]) -> None:
            self.events.put((kind, subject, future))

        return done

    def _handle(self, event: tuple[str, Any, Future[Any]]) -> None:
        kind, subject, future = event
        if kind == "probe":
            self._probed(subject, future)
        elif kind == "fetch":
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
        if slot.look is not None:
            entry = remember(slot.look, fetched)
            if entry is not None:
                self.remembered.append(entry)
                if len(self.remembered) >= self.REMEMBER_BATCH:
                    self._remember()
        if fetched.not_modified and slot.look is not None and slot.look.cached is not None:
            slot.record = self._ok(slot, slot.look.cached)  # a URL revalidated: its cached result stands
            self.rec.count_unchanged(1)
            return
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
        if isinstance(exc, (BrokenProcessPool, DecodeTimeoutError)):
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
