"""What the service runs on: one engine, one batcher, the decode pool, the fetch threads and the cache.

:class:`Runtime` turns a request's inputs into records, one per input, in order, with exactly the CLI's
record schema (records are built by :meth:`wanwu.engine.Engine.record` / :meth:`Record.failure`). Per
input: bytes (upload, base64 or URL download) and sha256 in a fetch thread → result-cache lookup →
decode in a worker process (:func:`wanwu.imaging.decode_job`) → the shared dynamic batcher. Nothing
heavy runs on the event loop. A bad input becomes an error record and never affects the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from wanwu.cache import CachedResult, ResultCache
from wanwu.config import RecognizeOptions
from wanwu.engine import Engine
from wanwu.errors import CacheError, InputError, OutOfMemoryError, QueueError
from wanwu.imaging import DecodePool, DecodeResult, decode_job, decode_process_pool
from wanwu.pipeline import open_cache
from wanwu.records import Record, ScoreKind
from wanwu.service.batcher import Batcher, BatcherConfig, BatchObserver
from wanwu.service.config import ServeConfig
from wanwu.sources import Fetched, Fetcher, InputItem
from wanwu.spec import PreprocessSpec

log = logging.getLogger("wanwu")
EngineFactory = Callable[[], Engine]
Fresh = tuple[str, CachedResult]


@dataclass(frozen=True)
class RunParams:
    """Per-request answer settings (defaults from the server's options)."""

    top_k: int
    score: ScoreKind
    threshold: float | None


def default_engine_factory(config: ServeConfig) -> EngineFactory:
    def load() -> Engine:
        return Engine.load(config.model, config.labels, config.options.backend, config.max_batch_size,
                           config.label_column)

    return load


def open_result_cache(options: RecognizeOptions) -> ResultCache | None:
    """The configured cache, or None when the user turned it off (``--no-cache``)."""
    if not options.cache:
        return None
    try:
        return open_cache(options)
    except ImportError as e:
        raise CacheError(f"the result cache is not available ({e}); run with --no-cache") from e


def cache_executor() -> ThreadPoolExecutor:
    """The single thread every result-cache call runs on (sqlite connections belong to one thread)."""
    return ThreadPoolExecutor(1, thread_name_prefix="wanwu-cache")


class Decoder:
    """Decodes off the event loop, in the shared kind of :class:`~wanwu.imaging.DecodePool`.

    A crash breaks every file in flight on the pool. Each of them is then retried alone in a one-process
    quarantine pool, so a second crash names its file exactly and the others still get their records.
    """

    job = staticmethod(decode_job)  # what a worker runs (a seam for the crash tests)

    def __init__(self, workers: int) -> None:
        self.pool = DecodePool(workers)
        self._quarantine: Executor | None = None
        self._alone = asyncio.Lock()

    async def decode(self, data: bytes, options: RecognizeOptions, spec: PreprocessSpec) -> DecodeResult:
        loop = asyncio.get_running_loop()
        pool, generation = self.pool.get()
        try:
            return await loop.run_in_executor(pool, self.job, data, spec, options.max_pixels)
        except BrokenProcessPool:
            self.pool.reset(generation)
        async with self._alone:
            self._quarantine = self._quarantine or decode_process_pool(1)
            try:
                return await loop.run_in_executor(self._quarantine, self.job, data, spec, options.max_pixels)
            except BrokenProcessPool:
                self._quarantine.shutdown(wait=False, cancel_futures=True)
                self._quarantine = None
                return ("decode_error", "the decoder process crashed on this file")

    def close(self) -> None:
        self.pool.close(wait=False)
        if self._quarantine is not None:
            self._quarantine.shutdown(wait=False, cancel_futures=True)
            self._quarantine = None


class Runtime:
    def __init__(
        self, config: ServeConfig, engine: Engine, cache: ResultCache | None, observer: BatchObserver,
        on_cache_hit: Callable[[], None] = lambda: None, cache_thread: ThreadPoolExecutor | None = None,
    ) -> None:
        """``cache_thread``: the one thread that may touch ``cache`` (pass the one that opened it)."""
        self.config = config
        self.options = config.options
        self.engine = engine
        self.cache = cache
        self.namespace = engine.spec.cache_namespace()
        self.preprocess = self.options.decode_spec(engine.spec.preprocess)
        self.batcher = Batcher(
            engine.infer,
            BatcherConfig(config.max_batch_size, config.max_delay_ms / 1000.0, config.max_queue, engine.streams),
            observer,
        )
        self.fetcher = Fetcher(self.options.max_bytes, self.options.fetch_timeout)
        self.decoder = Decoder(self.options.decode_workers)
        self._fetch_pool = ThreadPoolExecutor(
            max(2, self.options.fetch_threads), thread_name_prefix="wanwu-fetch"
        )
        self._cache_pool = cache_thread or cache_executor()
        self._on_cache_hit = on_cache_hit
        self.defaults = RunParams(self.options.top_k, self.options.score, self.options.threshold)

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.stop()
        self.decoder.close()
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self.fetcher.close()
        if self.cache is not None:
            await self._in_cache_thread(self.cache.close)
        self._cache_pool.shutdown(wait=True)
        await asyncio.to_thread(self.engine.close)

    async def recognize(self, items: list[InputItem], params: RunParams) -> list[Record]:
        """One record per item, in order. Raises QueueFullError (the whole request is refused)."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._one(item, params)) for item in items]
        except ExceptionGroup as group_error:
            refusal = _first(group_error, QueueError)
            if refusal is not None:
                raise refusal from None
            raise
        results = [task.result() for task in tasks]
        fresh = [f for _, f in results if f is not None]
        if fresh and self.cache is not None:
            await self._in_cache_thread(self.cache.put_many, self.namespace, fresh)
        return [record for record, _ in results]

    async def _one(self, item: InputItem, params: RunParams) -> tuple[Record, Fresh | None]:
        if item.kind == "missing":
            return Record.failure(item.input, item.error_type, item.locator), None
        loop = asyncio.get_running_loop()
        try:
            fetched: Fetched = await loop.run_in_executor(self._fetch_pool, self.fetcher.fetch, item)
        except InputError as e:
            return Record.failure(item.input, e.type, str(e)), None
        except Exception as e:  # a download library can fail in ways of its own
            return Record.failure(item.input, "fetch_error", f"{type(e).__name__}: {e}"), None
        sha = fetched.sha256
        if self.cache is not None:
            hits = await self._in_cache_thread(self.cache.get_many, self.namespace, [sha])
            hit = hits.get(sha) if hits else None
            if hit is not None:
                self._on_cache_hit()
                return self._ok(item, hit, sha, params), None
        decoded = await self.decoder.decode(fetched.data, self.options, self.preprocess)
        del fetched
        if isinstance(decoded, tuple):
            return Record.failure(item.input, decoded[0], decoded[1], sha), None
        try:
            top = await self.batcher.submit(decoded.pixels)
        except OutOfMemoryError as e:
            message = f"out of memory even for a batch of one: {e}"
            return Record.failure(item.input, "too_large", message, sha), None
        except QueueError:
            raise  # full queue / shutting down: the request as a whole is refused
        except Exception as e:
            log.exception("inference failed")
            message = f"inference failed: {type(e).__name__}: {e}"
            return Record.failure(item.input, "internal", message, sha), None
        result = CachedResult(top, decoded.width, decoded.height)
        return self._ok(item, result, sha, params), (sha, result)

    def _ok(self, item: InputItem, result: CachedResult, sha: str, params: RunParams) -> Record:
        return self.engine.record(
            item.input, result.top, sha256=sha, width=result.width, height=result.height,
            top_k=params.top_k, score=params.score, threshold=params.threshold,
        )

    async def _in_cache_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Cache calls run on one thread (safe for any implementation); a failing cache is only logged."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._cache_pool, fn, *args)
        except Exception as e:
            log.warning("result cache: %s: %s", type(e).__name__, e)
            return None


def _first(group: BaseExceptionGroup[Any], kind: type[QueueError]) -> QueueError | None:
    for exc in group.exceptions:
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first(exc, kind)) is not None:
            return found
    return None
