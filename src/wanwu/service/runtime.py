"""What the service runs on: the one orchestrator, with the dynamic batcher as its inference.

:class:`Runtime` owns a :class:`~wanwu.pipeline.Recognizer` built over the loaded engine and the result cache.
Each request runs through it on a thread of its own (fetch, hash, cache, in-request dedupe, decode with crash
isolation: all the orchestrator's), and its crops join the :class:`~wanwu.service.batcher.Batcher` that every
request shares, so batches form across requests. Records have exactly the CLI's schema. The service has no
decode or crash-isolation code of its own. Nothing heavy runs on the event loop.

A zero-shot (CLIP) model also answers a request's own label list: the same network (image tower shared) is
projected onto those labels (text embeddings cached on disk), and requests with the same list share a dynamic
batcher of its own (batches across requests, 503 when full), through the one recognizer's fetch threads,
decode processes and result cache; the last :data:`LABEL_SETS` label lists are kept ready.

Shutdown (:meth:`Runtime.close`) refuses new requests, waits up to ``drain_s`` for the ones in hand, then
stops the batchers and closes the recognizer.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from wanwu.cache import ResultCache
from wanwu.engine import Engine
from wanwu.errors import ClosedError, UsageError
from wanwu.index import ImageIndex
from wanwu.inference import infer
from wanwu.pipeline import Recognizer
from wanwu.records import Record, RecordOptions
from wanwu.search import QUERY_RECORD, SearchResult, answer_record, answer_texts, index_key
from wanwu.service.batcher import Batcher, BatcherConfig, BatchObserver
from wanwu.service.bodies import ByteBudget, DownloadBudget
from wanwu.service.config import ServeConfig
from wanwu.service.inference import BatcherInference
from wanwu.sources import InputItem

log = logging.getLogger("wanwu")
T = TypeVar("T")
LABEL_SETS = 4  # per-request label lists kept ready (each: a [labels, 512] text matrix and a batcher)


@dataclass
class _LabelSet:
    """One request label list: its engine, its batcher and a view of the recognizer that runs through them;
    closed once evicted and no request uses it."""

    recognizer: Recognizer
    batcher: Batcher
    users: int = 0
    evicted: bool = False
EngineFactory = Callable[[], Engine]


def default_engine_factory(config: ServeConfig) -> EngineFactory:
    def load() -> Engine:
        return Engine.load(config.model, config.labels, config.options.backend, config.max_batch_size,
                           config.label_column)

    return load


class Runtime:
    """Build off the event loop (opening the cache may block), ``start()``, then ``await recognize(...)``;
    ``await close()`` on shutdown. ``cache``: a ResultCache, None, or ``FROM_OPTIONS`` (the one the options name)."""

    def __init__(
        self, config: ServeConfig, engine: Engine, cache: ResultCache | None, observer: BatchObserver,
        on_cache_hit: Callable[[], None] = lambda: None,
        budget: ByteBudget | None = None, drain_s: float = 30.0,
    ) -> None:
        """``budget``: the in-flight bytes (--max-inflight-mb) that URL downloads count against; ``drain_s``: how
        long close() waits for the requests in hand."""
        self.config = config
        self.engine = engine
        self.observer = observer
        self.drain_s = drain_s  # how long close() waits for the requests in hand
        self.batcher = self._batcher(engine)
        self.recognizer = Recognizer(
            options=config.options, engine=engine, cache=cache,
            inference=BatcherInference(self.batcher), on_cache_hit=on_cache_hit, start_decoders=True,
        )
        self.downloads = DownloadBudget(budget or ByteBudget(int(config.inflight_mb * 1024 * 1024)))
        self.recognizer.fetcher = self.downloads.fetcher(self.recognizer.fetcher)
        # One thread per request in progress: each runs the orchestrator's loop for its own inputs.
        self._requests = ThreadPoolExecutor(config.max_requests, thread_name_prefix="wanwu-request")
        self._label_sets: OrderedDict[tuple[str, ...], _LabelSet] = OrderedDict()
        self._label_lock = threading.Lock()
        # Every batcher, replaced whole under _label_lock: read without it when the decode pool drains (a new label
        # list's text encoding holds the lock, and must not hold up the thread that finished a decode)
        self._batchers: tuple[Batcher, ...] = (self.batcher,)
        self.recognizer.decoders.on_drained = self._nudge
        self._in_hand: set[Future[Any]] = set()
        self._closed = False
        # /v1/search's index, refused when another model or preprocessing made it
        self.index = ImageIndex.open(config.index, index_key(self.recognizer)) if config.index else None
        if self.index is not None:
            self.index.ann()  # a large index's ANN opened (or built, if missing) before the first query

    def _batcher(self, engine: Engine) -> Batcher:
        config = self.config
        return Batcher(
            functools.partial(infer, engine),  # rows for a batch with a /v2 request's crop (every class's score)
            BatcherConfig(config.max_batch_size, config.max_delay_ms / 1000.0, config.max_queue, engine.streams),
            self.observer, more_coming=self._decoding,
        )

    def _decoding(self) -> bool:
        """Crops are on their way to a batcher: some request's images are being decoded (a view for a label list
        shares the recognizer's decoders)."""
        return self.recognizer.decoding()

    def _nudge(self) -> None:
        """No image is being decoded any more: every batcher waiting for crops on their way checks again."""
        for batcher in self._batchers:
            batcher.nudge()

    def start(self) -> None:
        self.batcher.start()

    @property
    def defaults(self) -> RecordOptions:
        return self.config.options.record

    @property
    def zero_shot(self) -> bool:
        """The loaded model takes a label list per request (a Chinese-CLIP model)."""
        return bool(self.engine.spec.prompts) and hasattr(self.engine.backend, "relabel")

    async def recognize(
        self, items: list[InputItem], record: RecordOptions, labels: tuple[str, ...] | None = None
    ) -> list[Record]:
        """One record per item, in order. Raises QueueFullError (the whole request is refused), ClosedError
        once shutting down. ``labels``: the request's own label list (zero-shot models; UsageError otherwise)."""
        return await self._in_thread(self._run, items, record, labels)

    async def search_images(self, items: list[InputItem], k: int, threshold: float | None) -> list[SearchResult]:
        """Each query photo's hits in :attr:`index` (or its error), in order; like :meth:`recognize` it raises
        QueueFullError and ClosedError."""
        index = self._index()
        records = await self.recognize(items, QUERY_RECORD)
        return await self._in_thread(lambda: [answer_record(index, r, k, threshold) for r in records])

    async def search_texts(self, texts: list[str], k: int, threshold: float | None) -> list[SearchResult]:
        """Each text's hits in :attr:`index` by the model's text tower (UsageError for a model without one)."""
        return await self._in_thread(answer_texts, self.engine, self._index(), texts, k, threshold)

    def index_info(self) -> dict[str, Any] | None:
        """What /v1/models says of the index: its rows, their size, whether text queries work."""
        if self.index is None:
            return None
        return {"rows": len(self.index), "dim": self.index.dim,
                "text": bool(getattr(self.engine.backend, "text_tower", False))}

    async def indexed_file(self, sha256: str) -> bytes | None:
        """The bytes of the index's row with this content, read from its file, if that is a local file that
        still holds that content (and not above ``--max-bytes``); else None. Never decoded here."""
        row = self._index().row_of(sha256)
        if row is None:
            return None
        return await self._in_thread(_read_unchanged, Path(row.input), sha256, self.config.options.max_bytes)

    def _index(self) -> ImageIndex:
        if self.index is None:
            raise UsageError("this server has no index (wanwu serve --index DIR)")
        return self.index

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a request thread, counted as a request in hand (close() waits for it)."""
        if self._closed:
            raise ClosedError("the service is shutting down")
        future = self._requests.submit(fn, *args)
        self._in_hand.add(future)
        future.add_done_callback(self._in_hand.discard)
        return await asyncio.wrap_future(future)

    def _run(self, items: list[InputItem], record: RecordOptions, labels: tuple[str, ...] | None) -> list[Record]:
        with self.downloads.hold(items):  # what its URLs download counts against --max-inflight-mb till the end
            if labels is None:
                return list(self.recognizer.recognize(items, record))
            label_set = self._for_labels(labels)
            try:
                return list(label_set.recognizer.recognize(items, record))
            finally:
                self._release(label_set)

    def _release(self, label_set: _LabelSet) -> None:
        with self._label_lock:
            label_set.users -= 1
            close = label_set.evicted and label_set.users == 0
        if close:
            self._close_label_set(label_set)

    def _close_label_set(self, label_set: _LabelSet) -> None:
        """No request uses it any more: its idle batcher stopped, its engine closed (a clone of the backend; the
        network stays)."""
        label_set.recognizer.close()
        label_set.batcher.stop()
        label_set.recognizer.engine.close()

    def _for_labels(self, labels: tuple[str, ...]) -> _LabelSet:
        evicted: _LabelSet | None = None
        with self._label_lock:
            found = self._label_sets.get(labels)
            if found is not None:
                self._label_sets.move_to_end(labels)
                found.users += 1
                return found
            spec = self.engine.spec
            if not self.zero_shot:
                raise UsageError(f"{spec.source or spec.name} has fixed classes: only a zero-shot (CLIP) model "
                                 "takes a label list per request")
            spec = replace(spec, labels=labels, labels_en=())
            relabel = self.engine.backend.relabel  # type: ignore[attr-defined]  # zero_shot: it has one
            engine = Engine(spec, relabel(spec), self.config.max_batch_size)
            batcher = self._batcher(engine)
            batcher.start()
            # the main recognizer's fetcher (URL bytes counted in the in-flight budget), decoders and cache
            view = self.recognizer.sharing(engine, BatcherInference(batcher))
            label_set = _LabelSet(view, batcher, users=1)
            self._label_sets[labels] = label_set
            if len(self._label_sets) > LABEL_SETS:
                _, evicted = self._label_sets.popitem(last=False)
                evicted.evicted = True
                evicted.users += 1  # released below: closed now if idle, else by its last request
            self._batchers = (self.batcher, *(kept.batcher for kept in self._label_sets.values()))
        if evicted is not None:
            self._release(evicted)
        return label_set

    async def close(self) -> None:
        """Refuse new requests; wait up to ``drain_s`` for those in hand; then stop everything. A request still
        running after that fails (its batcher is stopped: "the server is shutting down")."""
        self._closed = True
        in_hand = set(self._in_hand)
        if in_hand:
            await asyncio.to_thread(wait, in_hand, self.drain_s)
        await asyncio.to_thread(self.batcher.stop)
        for label_set in list(self._label_sets.values()):
            label_set.recognizer.close()
            await asyncio.to_thread(label_set.batcher.stop)
        self._requests.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.recognizer.close)  # decode processes, fetcher, cache, engine
        for label_set in self._label_sets.values():
            label_set.recognizer.engine.close()
        self._label_sets.clear()


def _read_unchanged(path: Path, sha256: str, max_bytes: int) -> bytes | None:
    try:
        if not path.is_file() or path.stat().st_size > max_bytes:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha256 else None
