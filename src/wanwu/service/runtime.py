"""What the service runs on: the one orchestrator, with the dynamic batcher as its inference.

:class:`Runtime` owns a :class:`~wanwu.pipeline.Recognizer` built over the loaded engine and the result cache.
Each request runs through it on a thread of its own (fetch, hash, cache, in-request dedupe, decode with crash
isolation: all the orchestrator's), and its crops join the :class:`~wanwu.service.batcher.Batcher` that every
request shares, so batches form across requests. Records have exactly the CLI's schema. The service has no
decode or crash-isolation code of its own. Nothing heavy runs on the event loop.

A zero-shot (CLIP) model also answers a request's own label list: the same network (image tower shared) is
projected onto those labels (text embeddings cached on disk), through a recognizer of its own that batches
within the request and decodes in one worker process; the last :data:`LABEL_SETS` label lists are kept ready.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from wanwu.cache import ResultCache
from wanwu.engine import Engine
from wanwu.errors import UsageError
from wanwu.pipeline import Recognizer
from wanwu.records import Record, RecordOptions
from wanwu.service.batcher import Batcher, BatcherConfig, BatchObserver
from wanwu.service.bodies import ByteBudget, DownloadBudget
from wanwu.service.config import ServeConfig
from wanwu.service.inference import BatcherInference
from wanwu.sources import InputItem

log = logging.getLogger("wanwu")
LABEL_SETS = 4  # per-request label lists kept ready (each: a [labels, 512] text matrix and a decode process)


@dataclass
class _LabelSet:
    """A recognizer for one request label list; closed once evicted and no request uses it."""

    recognizer: Recognizer
    users: int = 0
    evicted: bool = False
EngineFactory = Callable[[], Engine]


def default_engine_factory(config: ServeConfig) -> EngineFactory:
    def load() -> Engine:
        return Engine.load(config.model, config.labels, config.options.backend, config.max_batch_size,
                           config.label_column)

    return load


class Runtime:
    """Build off the event loop (opening the cache may block), ``start()`` on it, then ``await recognize(...)``;
    ``await close()`` on shutdown. ``cache``: a ResultCache, None, or ``FROM_OPTIONS`` (the one the options name)."""

    def __init__(
        self, config: ServeConfig, engine: Engine, cache: ResultCache | None, observer: BatchObserver,
        loop: asyncio.AbstractEventLoop, on_cache_hit: Callable[[], None] = lambda: None,
        budget: ByteBudget | None = None,
    ) -> None:
        """``budget``: the in-flight bytes (--max-inflight-mb) that URL downloads count against."""
        self.config = config
        self.engine = engine
        self.batcher = Batcher(
            engine.infer,
            BatcherConfig(config.max_batch_size, config.max_delay_ms / 1000.0, config.max_queue, engine.streams),
            observer,
        )
        self.recognizer = Recognizer(
            options=config.options, engine=engine, cache=cache,
            inference=BatcherInference(self.batcher, loop), on_cache_hit=on_cache_hit, start_decoders=True,
        )
        self.downloads = DownloadBudget(budget or ByteBudget(int(config.inflight_mb * 1024 * 1024)))
        self.recognizer.fetcher = self.downloads.fetcher(self.recognizer.fetcher)
        # One thread per request in progress: each runs the orchestrator's loop for its own inputs.
        self._requests = ThreadPoolExecutor(config.max_requests, thread_name_prefix="wanwu-request")
        self._label_sets: OrderedDict[tuple[str, ...], _LabelSet] = OrderedDict()
        self._label_lock = threading.Lock()

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
        """One record per item, in order. Raises QueueFullError (the whole request is refused).
        ``labels``: the request's own label list (zero-shot models; UsageError otherwise)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._requests, self._run, items, record, labels)

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
            label_set.recognizer.close()  # its decode process and a clone of the backend; the network stays

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
            # Decoding stays crash-isolated (one worker process) unless the operator chose threads (-j 0).
            options = replace(self.config.options, workers=0 if self.config.options.workers == 0 else 1)
            recognizer = Recognizer(options=options, engine=engine, cache=None, start_decoders=True)
            recognizer.fetcher = self.downloads.fetcher(recognizer.fetcher)  # counted like the main one's
            label_set = _LabelSet(recognizer, users=1)
            self._label_sets[labels] = label_set
            if len(self._label_sets) > LABEL_SETS:
                _, evicted = self._label_sets.popitem(last=False)
                evicted.evicted = True
                evicted.users += 1  # released below: closed now if idle, else by its last request
        if evicted is not None:
            self._release(evicted)
        return label_set

    async def close(self) -> None:
        await self.batcher.stop()
        self._requests.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.recognizer.close)  # decode processes, fetcher, cache, engine
        for label_set in self._label_sets.values():
            await asyncio.to_thread(label_set.recognizer.close)
