"""What the service runs on: the one orchestrator, with the dynamic batcher as its inference.

:class:`Runtime` owns a :class:`~wanwu.pipeline.Recognizer` built over the loaded engine and the result cache.
Each request runs through it on a thread of its own (fetch, hash, cache, in-request dedupe, decode with crash
isolation: all the orchestrator's), and its crops join the :class:`~wanwu.service.batcher.Batcher` that every
request shares, so batches form across requests. Records have exactly the CLI's schema. The service has no
decode or crash-isolation code of its own. Nothing heavy runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from wanwu.cache import ResultCache
from wanwu.engine import Engine
from wanwu.pipeline import Recognizer
from wanwu.records import Record, RecordOptions
from wanwu.service.batcher import Batcher, BatcherConfig, BatchObserver
from wanwu.service.config import ServeConfig
from wanwu.service.inference import BatcherInference
from wanwu.sources import InputItem

log = logging.getLogger("wanwu")
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
    ) -> None:
        self.config = config
        self.engine = engine
        self.batcher = Batcher(
            engine.infer,
            BatcherConfig(config.max_batch_size, config.max_delay_ms / 1000.0, config.max_queue, engine.streams),
            observer,
        )
        self.recognizer = Recognizer(
            options=config.options, engine=engine, cache=cache,
            inference=BatcherInference(self.batcher, loop), on_cache_hit=on_cache_hit,
        )
        # One thread per request in progress: each runs the orchestrator's loop for its own inputs.
        self._requests = ThreadPoolExecutor(config.max_requests, thread_name_prefix="wanwu-request")

    def start(self) -> None:
        self.batcher.start()

    @property
    def defaults(self) -> RecordOptions:
        return self.config.options.record

    async def recognize(self, items: list[InputItem], record: RecordOptions) -> list[Record]:
        """One record per item, in order. Raises QueueFullError (the whole request is refused)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._requests, self._run, items, record)

    def _run(self, items: list[InputItem], record: RecordOptions) -> list[Record]:
        return list(self.recognizer.recognize(items, record))

    async def close(self) -> None:
        await self.batcher.stop()
        self._requests.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.recognizer.close)  # decode processes, fetcher, cache, engine
