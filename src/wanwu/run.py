"""One run of the orchestrator (:class:`_Run`): a window of in-flight inputs in input order, each moved through
the stat memo, fetch, cache and in-run dedupe, decode and inference by events on the run's own thread, and
records out in input order. :class:`~wanwu.pipeline.Recognizer` owns what runs share (pools, decoders, cache,
engine) and starts one of these per ``recognize`` call; every decision about one input is a rule of
:mod:`wanwu.rules`.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from wanwu.cache import CachedResult, MemoryCache
from wanwu.cache.memo import Remembered
from wanwu.decoders import AGAIN, ALONE, decode_outcomes, timed_out
from wanwu.errors import ClosedError, ErrorType
from wanwu.fetch import FETCHERS, Fetched, ReadThenDecode
from wanwu.imaging import Prepared, decode_jobs
from wanwu.intake import Intake
from wanwu.records import Record, RecordOptions, TopScores
from wanwu.rules import DecodeMeter, Failure, budget_spent, fetch_failure, inference_failure, look_up, record_of, scored
from wanwu.sources import InputItem
from wanwu.unchanged import Look, Probed, remember

if TYPE_CHECKING:
    from wanwu.pipeline import Recognizer

log = logging.getLogger("wanwu")
# A run of at most this many inputs (all known before its first decode) decodes its JPEG and PNG files in
# threads of this process when the decode processes are not running and -j was left to wanwu: starting them
# costs more than such a run (a one-photo ``wanwu recognize`` would spend most of its time on it).
SHORT_RUN = 4
_DECODED_HERE = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG: the formats a short run decodes here
_T = TypeVar("_T")


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
    unread: bool = False  # a local file its decode worker reads and hashes itself (see ReadThenDecode)


def _out(slot: _Slot) -> Record:
    """A finished slot's record, with what rode along with its input."""
    record = slot.record
    assert record is not None
    return record


class _Run:
    FLUSH_AFTER_S = 0.05  # a partial batch waits at most this long for more decoded images
    DECODE_CHUNK = 4  # most images sent to a decode worker in one task
    PROBE_BLOCK = 512  # most inputs looked up in the stat memo at once (the first blocks are smaller)
    REMEMBER_BATCH = 512  # memo entries written at once
    decode = staticmethod(decode_jobs)  # what a decode worker runs (a seam for the crash tests)

    def __init__(self, rec: Recognizer, items: Iterator[InputItem] | list[InputItem], record: RecordOptions) -> None:
        self.rec = rec
        self.engine = rec.engine
        self.inference = rec.inference
        self.opts = rec.options
        self.record_options = record
        self.preprocess = self.opts.decode_spec(rec.engine.spec.preprocess)
        # results depend on how images were decoded (--full-decode, a GPU JPEG decoder): the cache key says so
        self.namespace = rec.cache_namespace()
        self.gpu = rec.gpu_decoding  # the JPEG decoder on the GPU, or None: everything to the decode processes
        self.to_gpu: deque[_Slot] = deque()  # fetched files it takes, gathering into its next batch
        self.gpu_batches = 0  # batches of them being decoded
        self.gpu_images = 0  # the images in those batches
        self.decode_options = self.opts.decode_options()
        # No cache to look files up in first: once the run decodes in processes, they read local files themselves
        self.reading = rec.cache is None and self.gpu is None and rec.decoders.stoppable
        self.read_then_decode = ReadThenDecode(self.decode, self.opts.max_bytes)
        self.timeout = self.opts.decode_timeout
        # What one run may take of the decoders shared with other runs (service requests): seconds in all, and
        # tasks at once (a share of the processes), so one caller's slow files cannot hold every decoder.
        self.budget = self.opts.decode_budget
        self.meter = DecodeMeter()
        self.tasks = 0  # decode tasks of this run in the workers (the quarantine's apart)
        self.decoding: dict[Future[Any], tuple[float, list[_Slot]]] = {}  # deadline, slots
        self.abandoned: set[Future[Any]] = set()
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
        self.progressed = False  # the last _fill answered a block in this thread
        self.block = 16  # the next block's size: small first (the first records come soon), then larger
        self.remembered: list[tuple[str, Remembered]] = []  # memo entries not written yet
        self.pending_decode = 0
        self.pending_infer = 0
        self.streams = self.inference.in_flight
        self.exhausted = False
        self.seen = 0  # inputs taken from ``items`` so far
        self.here: bool | None = None  # a short run, decoding in this process (decided at its first decode)
        self.processes = max(1, self.opts.decode_processes)
        # Several images per task amortize a process round trip; threads need none, and a task of one image
        # is what a deadline can give up on without taking its neighbours along (a thread cannot be stopped).
        self.chunk = self.DECODE_CHUNK if self.opts.decode_processes > 0 else 1
        # fetched files waiting for a decoder: enough to fill a GPU decoder's batch while it decodes the last
        self.max_fetch = max(4, self.opts.fetch_threads * 2, 2 * self.gpu.batch_size if self.gpu else 0)
        self.max_decode = self.processes * 2 * self.chunk  # a task queued behind each running one
        share = self.opts.decode_share
        self.max_tasks = self.processes * 2 if share >= 1 else max(1, math.ceil(self.processes * share))
        # records waiting to leave in order: room for two blocks in the memo lookup while a third is written
        self.max_window = max(4 * self.PROBE_BLOCK, self.opts.batch_size * 4)
        self.max_busy = max(256, self.opts.batch_size * 4)  # of them, holding bytes or pixels: memory
        # crops handed over at once: a batch locally; everything ready when the inference gathers by itself
        self.handoff = self.inference.gather if self.inference.gather > 1 else self.max_busy
        # last: its thread wakes the run through self.events
        arrived = _called(int)  # the finished future an "inputs arrived" event carries (one per run, not per wake)
        self.inputs = Intake(items, lambda: self.events.put(("input", None, arrived)))

    def records(self) -> Generator[Record, None, None]:
        try:
            yield from self._loop()
        except KeyboardInterrupt:
            # Flush everything already finished (out of order past the head), then stop.
            for slot in self.window:
                if slot.record is not None:
                    yield _out(slot)
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
                yield _out(self.window.popleft())
            if not self.window and self.exhausted:
                return
            self._submit_decodes()
            can_infer = bool(self.ready) and self.pending_infer < self.streams
            if can_infer and len(self.ready) >= min(batch_size, share := self._last_share()):
                self._infer(min(self.handoff, len(self.ready), share))
                continue
            if can_infer and self._starved():
                self._infer(self._share())
                continue
            if self.progressed:  # records were made here, not announced by an event: take more inputs now
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
                    self._infer(self._share())
                continue
            self._handle(event)
            while True:  # drain what else has arrived before deciding what to do next
                try:
                    self._handle(self.events.get_nowait())
                except queue.Empty:
                    break

    def _share(self) -> int:
        """How many of the ready crops a partial batch takes: the last crops of a run (or a lull) are shared
        among the streams that are free, so that each core infers a part instead of one inferring them all."""
        n = min(self.handoff, len(self.ready))
        if self.inference.gather > 1:  # local batches (a service's batcher gathers across requests itself)
            n = min(n, -(-len(self.ready) // (self.streams - self.pending_infer)))
        return n

    def _last_share(self) -> int:
        """Once every input is in, what is left to infer is known: locally, each stream takes its share of it as
        soon as that many crops are ready (a full batch taken near the end ran alone on one core for 0.12 s)."""
        if self.inference.gather <= 1 or not self.exhausted or self.pending_fetch or self.to_fetch or self.probing:
            return self.handoff
        return max(1, -(-(len(self.ready) + self._decoding()) // self.streams))

    def _starved(self) -> bool:
        """Nothing can join the current partial batch without waiting on a fetch."""
        if self._decoding() or self.suspects:
            return False
        return (self.pending_fetch == 0 and self.probing == 0) or len(self.window) >= self.max_window or (
            len(self.ready) + self._decoding() >= self.max_busy)

    def _decoding(self) -> int:
        """Images fetched and not decoded yet: waiting for a decoder, or being decoded (CPU or GPU)."""
        return self.pending_decode + len(self.to_decode) + self.gpu_images + len(self.to_gpu)

    # -- stages -----------------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Inputs in blocks, each looked up in the stat memo (on a fetch thread, or here when the run is
        :meth:`_idle`); the rest queue for a fetch. ``progressed``: a block was answered here."""
        self.progressed = False
        while (
            not self.exhausted
            and len(self.window) < self.max_window
            and len(self.ready) + self._decoding() < self.max_busy
            and self.probing < 2
            and self.pending_fetch + len(self.to_fetch) + len(self.to_decode) + len(self.to_gpu) < self.max_fetch
        ):
            block: list[_Slot] = []
            limit = min(self.block, self.max_window - len(self.window))
            arrived = True
            while len(block) < limit:
                item = self.inputs.take()
                if item is None:  # none has arrived yet (a slow source: a pipe, a listing), or the last has
                    self.exhausted, arrived = self.inputs.exhausted, False
                    break
                slot = _Slot(item)
                self.seen += 1
                self.window.append(slot)
                if item.kind == "missing":
                    slot.record = self._record(slot, (item.error_type, item.error))
                else:
                    block.append(slot)
            if not block:
                if arrived:
                    continue
                break
            if self.rec.prober is None or self.record_options.scores:  # full score rows are never cached
                self.to_fetch.extend(block)
                continue
            self.block = min(self.PROBE_BLOCK, self.block * 2)
            if self._idle():  # nothing else to attend to: look the block up here, no thread hop
                self.probing += 1
                self._probed(block, _called(self.rec.prober.probe, [s.item for s in block], self.rec.cache,
                                            self.namespace))
                self.progressed = True
                continue
            self.probing += 1
            future = self.rec.fetch_pool().submit(
                self.rec.prober.probe, [s.item for s in block], self.rec.cache, self.namespace
            )
            future.add_done_callback(self._notify("probe", block))
        self._submit_fetches()

    def _idle(self) -> bool:
        """Nothing in flight that the run must attend to while a block is looked up in the stat memo: no fetch,
        decode or inference, no other lookup. A rerun answered from the memo then looks each block up in its own
        thread: handing every block to a fetch thread and back cost a fifth of such a run, in the interpreter
        lock passed between the two at every ``stat``."""
        return not (
            self.probing or self.pending_fetch or self.to_fetch or self._decoding() or self.suspects
            or self.ready or self.pending_infer
        )

    def _submit_fetches(self) -> None:
        pool = None
        while self.to_fetch and self.pending_fetch + len(self.to_decode) + len(self.to_gpu) < self.max_fetch:
            slot = self.to_fetch.popleft()
            item = slot.item
            if self.reading and item.kind == "file" and (self.here is False or self.rec.decoders.started):
                slot.unread = True
                self.to_decode.append(slot)
                continue
            if item.kind == "bytes":  # in memory already (an upload): hashing it costs less than a thread hop
                self._fetched(slot, _called(self.rec.fetcher.fetch, item))
                continue
            pool = self.rec.url_pool() if FETCHERS.remote(item.kind) else (pool or self.rec.fetch_pool())
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
                slot.record = self._record(slot, result)
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
        if self.budget is not None and self.meter.spent >= self.budget:
            while self.to_gpu or self.to_decode or self.suspects:
                slot = (self.to_gpu or self.to_decode or self.suspects).popleft()
                self._fail(slot, "too_large", budget_spent(self.budget))
            return
        self._submit_gpu()
        while self.suspects:
            # After a decoder crash, the file it crashed on is retried alone in the quarantine process, so a
            # second crash names its culprit for certain; the workers go on meanwhile. (A deadline is never
            # retried: the file it stopped is known, and the time is its own fault.)
            slot = self.suspects.popleft()
            slot.isolated = True
            self.pending_decode += 1
            fn, payload = self._task([slot])
            future = self.rec.decoders.isolate(
                fn, payload, self.preprocess, self.decode_options, timeout=self._deadline(), meter=self.meter.add
            )
            future.add_done_callback(self._notify("isolated", [slot]))
        while self.to_decode and self.pending_decode < self.max_decode and self.tasks < self.max_tasks:
            if self._short() and (self.to_decode[0].data or b"").startswith(_DECODED_HERE):
                self._submit_decode([self.to_decode.popleft()], here=True)
                continue
            # Several images per task when many wait: each round trip to a worker process costs CPU on both
            # sides (pickling, waking a thread and a process).
            size = max(1, min(self.chunk, len(self.to_decode) // self.processes))
            unread = self.to_decode[0].unread  # a task's files are all read by the run, or all by the worker
            slots = [self.to_decode.popleft()]
            while self.to_decode and len(slots) < size and self.to_decode[0].unread == unread:
                slots.append(self.to_decode.popleft())
            self._submit_decode(slots)

    def _task(self, slots: list[_Slot]) -> tuple[Callable[..., list[Any]], list[Any]]:
        """What a decode worker runs for ``slots``, and on what: their bytes, or the items it reads itself."""
        if slots[0].unread:
            return self.read_then_decode, [slot.item for slot in slots]
        return self.decode, [slot.data or b"" for slot in slots]

    def _submit_gpu(self) -> None:
        """The files the GPU decoder takes, in batches: one decoding, the next gathering what arrives meanwhile."""
        while self.gpu is not None and self.to_gpu and self.gpu_batches < self.gpu.IN_FLIGHT:
            slots = [self.to_gpu.popleft() for _ in range(min(self.gpu.batch_size, len(self.to_gpu)))]
            self.gpu_batches += 1
            self.gpu_images += len(slots)
            future = self.gpu.submit([s.data or b"" for s in slots], self.preprocess, meter=self.meter.add)
            future.add_done_callback(self._notify("gpu", slots))

    def _gpu_decoded(self, slots: list[_Slot], future: Future[list[Prepared | None]]) -> None:
        """The GPU decoder's crops join the ready ones; what it refused or failed on goes to the decode processes."""
        self.gpu_batches -= 1
        self.gpu_images -= len(slots)
        results = future.result()  # never raises: a failing decoder answers None for each file
        done = [(slot, result) for slot, result in zip(slots, results, strict=True) if result is not None]
        self.to_decode.extend(slot for slot, result in zip(slots, results, strict=True) if result is None)
        self._prepared([slot for slot, _ in done], [result for _, result in done])

    def _deadline(self) -> float:
        """Seconds one image may take now: --decode-timeout, or what is left of the run's budget (>= 1 s)."""
        if self.budget is None:
            return self.timeout
        return min(self.timeout, max(1.0, self.budget - self.meter.spent))

    def _short(self) -> bool:
        """This run decodes its JPEG and PNG files in this process (see :data:`SHORT_RUN`)."""
        if self.here is None:
            self.here = (self.opts.decoders == -1 and self.exhausted and self.seen <= SHORT_RUN
                         and not self.rec.decoders.started)
        return self.here

    def _submit_decode(self, slots: list[_Slot], here: bool = False) -> None:
        self.pending_decode += len(slots)
        self.tasks += 1
        fn, datas = self._task(slots)
        if here:
            future = self.rec.decoders.submit_here(fn, datas, self.preprocess, self.decode_options,
                                                   meter=self.meter.add)
        else:
            future = self.rec.decoders.submit_each(
                fn, datas, self.preprocess, self.decode_options, timeout=self._deadline(), meter=self.meter.add,
            )
        if here or not self.rec.decoders.stoppable:  # a thread: give up on it at its deadline
            queued = 0 if here else self.chunk  # a pool's thread may first finish the task before it
            self.decoding[future] = (time.monotonic() + self.timeout * (len(slots) + queued), slots)
        future.add_done_callback(lambda f: self.events.put(("decode", slots, f)))

    def _notify(self, kind: str, subject: _Slot | list[_Slot]) -> Callable[[Future[Any]], None]:
        return lambda future: self.events.put((kind, subject, future))

    def _handle(self, event: tuple[str, Any, Future[Any]]) -> None:
        kind, subject, future = event
        if kind == "input":  # inputs arrived: the loop takes them when it next fills
            return
        if future.cancelled():  # only close() cancels work: the run cannot go on
            raise ClosedError("the recognizer was closed during this run")
        if kind == "probe":
            self._probed(subject, future)
        elif kind == "fetch":
            self.pending_fetch -= 1
            self._fetched(subject, future)
        elif kind == "gpu":
            self._gpu_decoded(subject, future)
        elif kind in ("decode", "isolated"):
            self.decoding.pop(future, None)
            if future in self.abandoned:  # given up on at its deadline (a thread that finally returned)
                self.abandoned.discard(future)
                return
            self.pending_decode -= len(subject)
            self.tasks -= kind == "decode"
            self._decoded(subject, future)
        else:
            self.pending_infer -= 1
            self._inferred(subject, future)

    def _fetched(self, slot: _Slot, future: Future[Fetched]) -> None:
        exc = future.exception()
        if exc is not None:
            self._fail(slot, *fetch_failure(exc))
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
            slot.record = self._record(slot, slot.look.cached)  # a URL revalidated: its cached result stands
            self.rec.count_unchanged(1)
            return
        if self._known(slot, sha):
            return
        slot.data = fetched.data
        gpu = self.gpu is not None and self.gpu.takes(fetched.data, self.preprocess)
        (self.to_gpu if gpu else self.to_decode).append(slot)

    def _enforce_deadlines(self) -> None:
        """A decode thread past its deadline cannot be stopped: give up on its files. (A decode process past
        its deadline is stopped by the pool, and its task fails with DecodeTimeoutError.)"""
        now = time.monotonic()
        for future, (deadline, slots) in list(self.decoding.items()):
            if now < deadline or future.done():
                continue
            del self.decoding[future]
            self.abandoned.add(future)
            self.rec.decoders.forget(future)
            self.pending_decode -= len(slots)
            self.tasks -= 1
            for slot in slots:
                self._fail(slot, "decode_error", self._timed_out())

    def _timed_out(self) -> str:
        if self.budget is not None and self.meter.spent >= self.budget:
            return budget_spent(self.budget).replace("not decoded", "decoding stopped", 1)
        return timed_out(self.timeout)

    def _decoded(self, slots: list[_Slot], future: Future[list[Any]]) -> None:
        exc = future.exception()
        if exc is not None:
            outcomes = decode_outcomes(exc, [slot.isolated for slot in slots], self._timed_out())
            again = [slot for slot, outcome in zip(slots, outcomes, strict=True) if outcome == AGAIN]
            self.to_decode.extendleft(reversed(again))  # they did nothing wrong: back to the front of the line
            for slot, outcome in zip(slots, outcomes, strict=True):
                if outcome == AGAIN or (slot.unread and not self._read_here(slot)):
                    continue
                if outcome == ALONE:
                    self.suspects.append(slot)
                else:
                    self._fail(slot, *outcome)
            return
        self._prepared(slots, future.result())

    def _read_here(self, slot: _Slot) -> bool:
        """A file its worker crashed or ran out of time on is read here after all: the quarantine gets its bytes,
        its record its sha256. False: it cannot be read now (its record says why)."""
        slot.unread = False
        try:
            fetched = self.rec.fetcher.fetch(slot.item)
        except Exception as e:
            self._fail(slot, *fetch_failure(e))
            return False
        slot.sha256, slot.data = fetched.sha256, fetched.data
        return True

    def _known(self, slot: _Slot, sha: str) -> bool:
        """``slot``'s content is in flight (the slot follows its leader) or known (its record is made now, from
        this run's recent results or the cache). Otherwise the slot leads that content's decode and inference."""
        if (leader := self.leaders.get(sha)) is not None:
            leader.followers.append(slot)
            return True
        if not self.record_options.scores:  # caches keep the top scores, not every class's
            found = look_up(self.memo, self.namespace, [sha]) or look_up(self.rec.cache, self.namespace, [sha])
            if (hit := found.get(sha)) is not None:
                self.rec.count_cache_hit()
                slot.record = self._record(slot, hit)
                return True
        self.leaders[sha] = slot
        return False

    def _prepared(self, slots: list[_Slot], results: Sequence[Any]) -> None:
        """Crops join the ready ones; a file its worker read comes as ``(sha256, result)`` (see :meth:`_known`)."""
        for slot, result in zip(slots, results, strict=True):
            slot.data = None
            if slot.record is not None:
                continue  # already answered (given up on at a deadline)
            if slot.unread:
                slot.sha256, result = result
                if slot.sha256 is not None and not isinstance(result, tuple) and self._known(slot, slot.sha256):
                    continue
            if isinstance(result, tuple):
                self._fail(slot, result[0], result[1])
            else:
                slot.prepared = result
                self.ready.append(slot)

    def _infer(self, n: int) -> None:
        """Hand the first ``n`` ready images to the inference; the result comes back as an event."""
        batch, self.ready = self.ready[:n], self.ready[n:]
        self._submit_infer(batch)

    def _submit_infer(self, batch: list[_Slot]) -> None:
        pixels = [s.prepared.pixels for s in batch if s.prepared is not None]
        self.pending_infer += 1
        # rows only when asked: an Inference written before ``rows`` existed still takes the rest
        inference = self.inference
        future = inference.submit(pixels, rows=True) if self.record_options.scores else inference.submit(pixels)
        future.add_done_callback(lambda f: self.events.put(("infer", batch, f)))

    def _inferred(self, batch: list[_Slot], future: Future[list[TopScores]]) -> None:
        exc = future.exception()
        if exc is not None:
            # raises again what is not one image's fault (a broken model)
            failure = inference_failure(exc, len(batch))
            for slot in batch:
                if failure is None:  # out of memory for several: each again, alone
                    self._submit_infer([slot])
                else:
                    self._fail(slot, *failure)
            return
        tops = future.result()
        fresh: list[tuple[str, CachedResult]] = []
        for slot, top in zip(batch, tops, strict=True):
            assert slot.prepared is not None and slot.sha256 is not None
            prepared, slot.prepared = slot.prepared, None
            outcome = scored(top, prepared.width, prepared.height, prepared.warnings)
            if not isinstance(outcome, tuple):  # NaN: never cached; caches keep no score rows
                fresh.append((slot.sha256, replace(outcome, top=top.without_row())))
            self._finish(slot, outcome)
        self.memo.put_many(self.namespace, fresh)
        if self.rec.cache is not None:
            self.rec.cache.put_many(self.namespace, fresh)

    # -- records ----------------------------------------------------------------------------------------

    def _record(self, slot: _Slot, outcome: CachedResult | Failure) -> Record:
        return record_of(slot.item.input, slot.sha256, outcome, self.engine.spec, self.record_options, slot.item.meta)

    def _fail(self, slot: _Slot, type: ErrorType, message: str) -> None:
        self._finish(slot, (type, message))

    def _finish(self, slot: _Slot, outcome: CachedResult | Failure) -> None:
        """``slot`` and every repeat of its content get their records (each its own input)."""
        slot.record = self._record(slot, outcome)
        slot.data = None
        for follower in slot.followers:
            follower.record = self._record(follower, outcome)
        slot.followers.clear()
        if slot.sha256 is not None and self.leaders.get(slot.sha256) is slot:
            del self.leaders[slot.sha256]

    def _abandon(self) -> None:
        self.inputs.close()
        for held in (self.window, self.ready, self.to_decode, self.to_gpu, self.suspects, self.leaders):
            held.clear()


def _called(fn: Callable[..., _T], *args: Any) -> Future[_T]:
    """``fn(*args)`` run here, as a finished future (what a thread would have handed back)."""
    future: Future[_T] = Future()
    try:
        future.set_result(fn(*args))
    except Exception as e:
        future.set_exception(e)
    return future

