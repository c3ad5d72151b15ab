"""The orchestrator: inputs -> fetch -> cache/dedupe -> decode -> batch -> infer -> records, streamed.

:class:`Recognizer` is the library entry point and the only thing that knows the whole flow. One run keeps a
window of in-flight inputs in input order; records leave in input order as soon as the head of the window
is done. Every stage is bounded (window, fetches in flight, decodes in flight), so memory does not grow
with the number of inputs:

* fetch: a thread pool reads files / downloads URLs and hashes the bytes (hashlib and I/O drop the GIL). A run
  with no result cache to consult, once it decodes in processes, leaves its local files to the decode
  processes, which read and hash them themselves (:class:`~wanwu.fetch.ReadThenDecode`): a file's bytes then
  never cross a pipe, and a repeat of content is found when its decode returns;
* cache + dedupe: on the orchestrator thread; a cache hit or a repeat of content already in flight never
  reaches a decoder, and every input still gets its own record;
* decode: worker processes run :func:`wanwu.imaging.prepare`, one file of a task at a time; the file a decoder
  crashed on is retried alone in a quarantine process (:mod:`wanwu.decoders`), so a crash costs exactly its
  file; a file past its deadline is stopped and never retried. A run may hold a share of the decode processes
  at once and spend a budget of decode seconds (``decode_share``, ``decode_budget``: the service gives each
  request half of them and 60 s), so one caller's slow files cannot hold every decoder. With a GPU JPEG decoder
  (``jpeg_decoder``, :mod:`wanwu.gpudecode`), the baseline JPEGs it takes go to it in batches instead, and what it
  refuses or fails on to the processes;
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

import copy
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from wanwu.cache import OneThreadCache, ResultCache
from wanwu.cache import open_cache as open_cache_at
from wanwu.cache.memo import Memo
from wanwu.config import RecognizeOptions
from wanwu.decoders import DecodePool
from wanwu.engine import Engine
from wanwu.errors import ClosedError
from wanwu.fetch import Fetcher
from wanwu.imaging import warm as warm_decoding
from wanwu.inference import Inference, LocalInference
from wanwu.records import Record, RecordOptions, RecordStream
from wanwu.run import _Run
from wanwu.sources import InputItem, SourceOptions, expand
from wanwu.spec import ModelSpec
from wanwu.unchanged import Prober, open_memo

if TYPE_CHECKING:
    from wanwu.gpudecode import GpuDecoding

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
        start_decoders: bool = False,
    ) -> None:
        """``engine``: an already loaded model (else ``model`` + ``labels`` are loaded). ``inference``: where
        prepared crops go (default: batches on the engine). ``on_cache_hit``: told of every result served
        from the cache (metrics). ``memo``: the stat memo (default: the one beside the options' cache, when
        the result cache is the options' own). ``start_decoders``: start the decode processes now, while the
        model loads (a server, a queue worker, a run known to be long); otherwise the first run of more than
        :data:`~wanwu.run.SHORT_RUN` inputs starts them, and shorter runs decode in this process."""
        self.options = options or RecognizeOptions()
        self._owner: Recognizer | None = None  # set on a view made by sharing(): the pools are the owner's
        self._namespaces: dict[tuple[tuple[str, str], ...], str] = {}  # cache namespaces by numerics (a run's)
        self._closed = False
        self._fetch_pool: ThreadPoolExecutor | None = None
        self._url_pool: ThreadPoolExecutor | None = None  # downloads apart: slow URLs never stall file reads
        self._lock = threading.Lock()
        self.decoders = DecodePool(self.options.decode_processes, max(1, min(4, self.options.fetch_threads)),
                                   self.options.decode_address_space())
        if start_decoders:
            self.decoders.warm()  # start the decode processes while the model loads: both take a while
        label_path = Path(labels) if labels is not None else None
        try:
            # a run of a few files decodes in this process: Pillow's plugins load while the model does
            self.engine = engine or Engine.load(
                model, label_path, self.options.backend, self.options.batch_size, label_column,
                beside=None if start_decoders else warm_decoding,
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
        self.gpu_decoding: GpuDecoding | None = None  # baseline JPEGs decoded on the GPU (--jpeg-decoder)
        try:
            if self.options.jpeg_decoder.strip().lower() != "cpu":  # else the module is never imported
                from wanwu.gpudecode import open_gpu_decoding

                self.gpu_decoding = open_gpu_decoding(self.options.jpeg_decoder, self.options.backend.device,
                                                      self.options.max_pixels, self.options.batch_size,
                                                      self.options.decode_timeout)
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

    @property
    def numerics(self) -> dict[str, str]:
        """How this recognizer's numbers are made, for the cache namespace: the engine's (device class,
        precision) and a GPU JPEG decoder's name (its pixels are not Pillow's)."""
        return {**self.engine.numerics, **(self.gpu_decoding.numerics if self.gpu_decoding is not None else {})}

    def decoding(self) -> bool:
        """Images are being decoded for some run of this recognizer, so more crops are on their way to the
        inference. With a GPU JPEG decoder, taken as always: its batches come at their own pace."""
        return self.gpu_decoding is not None or self.decoders.decoding()

    def cache_namespace(self) -> str:
        """The result cache's namespace for this recognizer's runs, worked out once for each :attr:`numerics` (a
        GPU JPEG decoder may join later): it hashes the whole model spec, and a service runs one per request."""
        numerics = self.numerics
        key = tuple(sorted(numerics.items()))
        namespace = self._namespaces.get(key)
        if namespace is None:
            namespace = self._namespaces[key] = self.options.cache_namespace(self.engine.spec, numerics)
        return namespace

    def recognize(self, inputs: Iterable[InputLike], record: RecordOptions | None = None) -> Iterator[Record]:
        """Records in input order. Strings are expanded like CLI arguments (folders, globs, URLs).

        ``record`` shapes the records (top-k, score, threshold); default: ``options.record``. Raises
        :class:`~wanwu.errors.ClosedError` once closed."""
        self._check_open()
        items: list[InputItem] | Iterator[InputItem] = (
            inputs if isinstance(inputs, list) and all(_ready(v) for v in inputs)  # a service request's uploads
            else _items(inputs, self.options.max_bytes)
        )
        run = _Run(self, items, record or self.options.record)
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

    def sharing(self, engine: Engine, inference: Inference) -> Recognizer:
        """Another model, run through this recognizer's fetch threads, decode processes and cache (the service's
        zero-shot label sets: one network, a label list per request). Closing the view closes ``inference``
        only; closing this recognizer makes its views unusable too."""
        self._check_open()
        view = copy.copy(self)
        view.engine, view.inference, view._owner, view.cache_hits = engine, inference, self, 0
        view._namespaces = {}  # another model's
        return view

    def _check_open(self) -> None:
        if self._closed or (self._owner is not None and self._owner._closed):
            raise ClosedError("this recognizer is closed")

    def fetch_pool(self) -> ThreadPoolExecutor:
        if self._owner is not None:
            return self._owner.fetch_pool()
        with self._lock:
            self._check_open()
            if self._fetch_pool is None:
                self._fetch_pool = ThreadPoolExecutor(self.options.fetch_threads, thread_name_prefix="wanwu-fetch")
            return self._fetch_pool

    def url_pool(self) -> ThreadPoolExecutor:
        if self._owner is not None:
            return self._owner.url_pool()
        with self._lock:
            self._check_open()
            if self._url_pool is None:
                self._url_pool = ThreadPoolExecutor(self.options.fetch_threads, thread_name_prefix="wanwu-url")
            return self._url_pool

    def close(self) -> None:
        """Stop everything this recognizer started; it raises ClosedError from then on. Idempotent."""
        if self._owner is not None:
            self._closed = True
            self.inference.close()
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pools, self._fetch_pool, self._url_pool = (self._fetch_pool, self._url_pool), None, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self.inference.close()
        if self.gpu_decoding is not None:
            self.gpu_decoding.close()
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
    """The persistent result cache the options name (``--cache``, ``$WANWU_CACHE``, the default file)."""
    return open_cache_at(options.cache_location())


def _ready(value: InputLike) -> bool:
    """An input that needs no expanding (not a path or a shard to read)."""
    return isinstance(value, InputItem) and value.kind != "shard"


def _items(inputs: Iterable[InputLike], max_bytes: int) -> Iterator[InputItem]:
    options = SourceOptions(max_bytes=max_bytes)
    for value in inputs:
        if isinstance(value, InputItem):
            if value.kind == "shard":  # expanded where it runs: here, as it is consumed
                from wanwu.shards import read_shard

                yield from read_shard(value.locator, options)
            else:
                yield value
        else:
            yield from expand([str(value)], options=options)
