"""The two Ray Data stages: decode on CPU tasks, inference in an actor pool.

Rows in (any of these shapes, mixed blocks are fine):

* ``{"input": str}``: a path or URL, as the CLI would take it (``kind``/``locator``/``error_type`` columns,
  as :func:`item_rows` writes them, are used when present);
* ``{"path": str, "bytes": bytes}``: what ``ray.data.read_binary_files(..., include_paths=True)`` gives
  (``s3://``, ``gs://``, HDFS, ... are read by Ray itself; the record's ``input`` is the path).

:func:`decode_batch` (a plain function: Ray runs it as CPU tasks) turns each row into pixels, a cache hit or an
error (:func:`wanwu.stage.look_up_item`, then decoding). As in the local runner, images are decoded in a process
of their own (a :class:`~wanwu.decoders.DecodeProcess` per Ray worker thread, reused; a task's images in one
round trip) under ``options.decode_timeout``: a decoder that crashes or hangs
costs its own row a ``decode_error`` record, never the task, its neighbours or the Ray worker
(``options.workers == 0`` decodes in the task's own process, without either guard).

:class:`Infer` (a callable class: Ray runs it in an actor pool, one model per actor) turns those into records.
Rows out: ``input``, ``status`` (``ok``/``error``) and ``record``, the record as one JSON line exactly as
``wanwu recognize -f jsonl`` writes it. A bad image is an error row, never a failed task, so
``max_errored_blocks`` is never needed.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import numpy.typing as npt

from wanwu.cache import CachedResult, ResultCache
from wanwu.config import RecognizeOptions
from wanwu.decoders import CRASHED, DecodeProcess, DecodeTimeoutError, timed_out
from wanwu.engine import Engine
from wanwu.fetch import Fetched, Fetcher
from wanwu.imaging import DecodeOptions, DecodeResult, decode_each, decode_job
from wanwu.records import Record, RecordOptions, TopScores
from wanwu.sinks import dumps
from wanwu.sources import InputItem, expand
from wanwu.spec import ModelSpec, PreprocessSpec
from wanwu.stage import Decode, StageContext, Staged, ToDecode, look_up_item
from wanwu.unchanged import Look, Prober, open_memo, remember

Batch = dict[str, npt.NDArray[Any]]
_PER_PROCESS: dict[tuple[str, Any], Any] = {}  # one fetcher / cache per Ray worker process, reused by its tasks


def item_rows(items: Iterable[InputItem]) -> list[dict[str, str]]:
    """Rows for ``ray.data.from_items``: the expanded inputs, each exactly as the local runner would see it."""
    return [
        {"input": i.input, "kind": i.kind, "locator": i.locator or i.error, "error_type": i.error_type,
         "stamp": i.stamp or ""}
        for i in items
    ]


def decode_batch(
    batch: Batch, *, context: StageContext, options: RecognizeOptions, decode: Decode = decode_job
) -> Batch:
    """The CPU stage (``map_batches(decode_batch, fn_kwargs=...)``): fetch, hash, cache lookup, decode.

    ``decode`` (a module-level function, so that it pickles) is what runs in the decode process."""
    fetcher = _fetcher(options)
    cache = _cache(options)
    items = list(_items(batch))
    unchanged = _Unchanged(items, options, context, cache)
    found = [unchanged.answers[i] or look_up_item(item, fetcher, context, cache, data)
             for i, (item, data) in enumerate(items)]
    unchanged.remember(found)
    todo = [(i, x) for i, x in enumerate(found) if isinstance(x, ToDecode)]
    datas = [x.data for _, x in todo]
    if options.workers == 0:
        results = decode_each(decode, datas, context.preprocess, context.decode)
    else:
        results = _Isolated(decode, options.decode_timeout).many(datas, context.preprocess, context.decode)
    for (i, x), result in zip(todo, results, strict=True):
        found[i] = x.decoded(result)
    staged = [x for x in found if isinstance(x, Staged)]
    assert len(staged) == len(found)  # every input decoded or answered before
    return _staged_columns(staged)


class _Isolated:
    """``decode`` in this Ray worker's decode process under a deadline. A crash or a timeout is that image's
    record; the process is replaced for the next one."""

    def __init__(self, decode: Decode, timeout: float) -> None:
        self.decode, self.timeout = decode, timeout
        process = _PER_PROCESS.get(("decoder", threading.get_ident()))
        if process is None:  # Ray may run tasks of one worker process in threads: one decode process each
            process = _PER_PROCESS[("decoder", threading.get_ident())] = DecodeProcess()
        self.process: DecodeProcess = process

    def many(self, datas: list[bytes], preprocess: PreprocessSpec, options: DecodeOptions) -> list[DecodeResult]:
        """All of them in one round trip (a deadline of ``timeout`` per image, plus one); after a crash or a
        timeout, each again alone, so that only the culprit fails."""
        if not datas:
            return []
        try:
            results: list[DecodeResult] = self.process.call(
                decode_each, self.decode, datas, preprocess, options, timeout=self.timeout * (len(datas) + 1)
            )
            return results
        except (DecodeTimeoutError, BrokenProcessPool):
            return [self(data, preprocess, options) for data in datas]

    def __call__(self, data: bytes, preprocess: PreprocessSpec, options: DecodeOptions) -> DecodeResult:
        try:
            result: DecodeResult = self.process.call(self.decode, data, preprocess, options, timeout=self.timeout)
        except DecodeTimeoutError:
            return ("decode_error", timed_out(self.timeout))
        except BrokenProcessPool:
            return ("decode_error", CRASHED)
        return result


class Infer:
    """The inference stage: an actor per model copy (``compute=ray.data.ActorPoolStrategy(size=n)``).

    The model is loaded once, in ``__init__``; fresh results go to the result cache when one is configured
    and reachable from the actor's node.
    """

    def __init__(self, spec: ModelSpec, options: RecognizeOptions, record: RecordOptions | None = None) -> None:
        self.engine = Engine.load(spec, None, options.backend, options.batch_size)
        self.options = options
        self.record = record or options.record
        # A batch is split over the engine's streams (two half-width onnxruntime batches on a CPU, as the
        # local runner does): one stream alone leaves the cores it was not given idle.
        self.streams = ThreadPoolExecutor(self.engine.streams, thread_name_prefix="wanwu-infer")
        self.namespace = options.cache_namespace(spec)
        crop = spec.preprocess.crop_size
        self.shape = (crop, crop, 3)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["input"])
        records: list[Record | None] = [None] * n
        todo: list[int] = []
        for i in range(n):
            if batch["error_type"][i]:
                records[i] = Record.failure(
                    str(batch["input"][i]), batch["error_type"][i], str(batch["error_message"][i]),
                    _str_or_none(batch["sha256"][i]),
                )
            elif batch["cached"][i]:
                from wanwu.cache.sqlite import decode_top

                records[i] = self._ok(batch, i, decode_top(bytes(batch["cached"][i])))
            else:
                todo.append(i)
        if todo:
            pixels = [np.frombuffer(bytes(batch["pixels"][i]), np.uint8).reshape(self.shape) for i in todo]
            tops = self._infer(pixels)
            fresh = []
            for i, top in zip(todo, tops, strict=True):
                if not math.isfinite(top.logsumexp):  # never NaN in a record, never cached
                    records[i] = Record.failure(
                        str(batch["input"][i]), "model_error",
                        "the model returned scores that are not finite numbers for this image",
                        str(batch["sha256"][i]),
                    )
                    continue
                records[i] = self._ok(batch, i, top)
                fresh.append((str(batch["sha256"][i]), CachedResult(
                    top, int(batch["width"][i]), int(batch["height"][i]), _warnings(batch, i))))
            cache = _cache(self.options)
            if cache is not None:
                cache.put_many(self.namespace, fresh)
        done = [r for r in records if r is not None]
        return {
            "input": np.array([r.input for r in done], dtype=object),
            "status": np.array([r.status for r in done], dtype=object),
            "record": np.array([dumps(r) for r in done], dtype=object),
        }

    def _infer(self, pixels: list[npt.NDArray[np.uint8]]) -> list[TopScores]:
        size = -(-len(pixels) // self.engine.streams)
        chunks = [pixels[i : i + size] for i in range(0, len(pixels), size)]
        return [top for tops in self.streams.map(self.engine.infer, chunks) for top in tops]

    def _ok(self, batch: Batch, i: int, top: Any) -> Record:
        return Record.success(
            str(batch["input"][i]), top, self.engine.spec, self.record, sha256=str(batch["sha256"][i]),
            width=int(batch["width"][i]), height=int(batch["height"][i]), warnings=_warnings(batch, i),
        )


# --- helpers ------------------------------------------------------------------------------------------


def _items(batch: Batch) -> Iterable[tuple[InputItem, bytes | None]]:
    if "input" in batch:
        kinds, locators, types = batch.get("kind"), batch.get("locator"), batch.get("error_type")
        stamps = batch.get("stamp")
        for i, value in enumerate(batch["input"]):
            if kinds is not None and locators is not None and types is not None:
                if kinds[i] == "missing":  # the row's locator column carries the reason
                    yield InputItem.failed(str(value), str(locators[i]), types[i]), None
                else:
                    stamp = str(stamps[i]) if stamps is not None and stamps[i] else None
                    yield InputItem(str(value), kinds[i], str(locators[i]), stamp=stamp), None
            else:
                yield _single(str(value)), None
    else:
        datas = batch.get("bytes")
        for i, path in enumerate(batch["path"]):
            data = None if datas is None else bytes(datas[i])
            yield InputItem(str(path), "file", str(path)), data


def _single(value: str) -> InputItem:
    """A path or URL row: one item (a folder or glob here would be one input with many records)."""
    items = list(expand([value]))
    return items[0] if len(items) == 1 else InputItem.failed(value, "not a single file or URL")


def _staged_columns(staged: list[Staged]) -> Batch:
    def col(values: list[Any]) -> npt.NDArray[Any]:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    return {
        "input": col([s.input for s in staged]),
        "sha256": col([s.sha256 or "" for s in staged]),
        "error_type": col([s.error[0] if s.error else "" for s in staged]),
        "error_message": col([s.error[1] if s.error else "" for s in staged]),
        "cached": col([_encoded(s.cached) for s in staged]),
        "pixels": col([s.prepared.pixels.tobytes() if s.prepared else b"" for s in staged]),
        "warnings": col([json.dumps(list(w)) if (w := _staged_warnings(s)) else "" for s in staged]),
        "width": np.array([_size(s)[0] for s in staged], dtype=np.int64),
        "height": np.array([_size(s)[1] for s in staged], dtype=np.int64),
    }


def _staged_warnings(s: Staged) -> tuple[str, ...]:
    """What the decoder said: now, or when the cached result was made."""
    if s.prepared is not None:
        return s.prepared.warnings
    return s.cached.warnings if s.cached is not None else ()


def _warnings(batch: Batch, i: int) -> tuple[str, ...]:
    column = batch.get("warnings")
    return tuple(json.loads(column[i])) if column is not None and column[i] else ()


def _encoded(cached: CachedResult | None) -> bytes:
    if cached is None:
        return b""
    from wanwu.cache.sqlite import encode_top

    return encode_top(cached.top)


def _size(s: Staged) -> tuple[int, int]:
    if s.prepared is not None:
        return s.prepared.width, s.prepared.height
    if s.cached is not None:
        return s.cached.width, s.cached.height
    return 0, 0


def _str_or_none(value: Any) -> str | None:
    return str(value) if value else None


class _Unchanged:
    """The stat memo of this node for one batch: inputs it vouches for (local files, objects) are answered from
    the cache unread; what the batch read is remembered. (URLs are not revalidated here: they are read.)"""

    def __init__(self, items: list[tuple[InputItem, bytes | None]], options: RecognizeOptions,
                 context: StageContext, cache: ResultCache | None) -> None:
        self.prober = _prober(options) if cache is not None else None
        self.answers: list[Staged | None] = [None] * len(items)
        self.looks: list[Look | None] = [None] * len(items)
        if self.prober is None:
            return
        # rows that came with their bytes (read_binary_files) are not looked up: they were read already
        probed = self.prober.probe([item if data is None else InputItem.from_bytes(item.input, b"")
                                    for item, data in items], cache, context.namespace)
        self.looks = [look if look is not None and look.stamp is not None else None for look in probed.looks]
        for i, (item, _) in enumerate(items):
            found = probed.answer(i)
            if found is not None:
                self.answers[i] = Staged(item.input, found[0], cached=found[1])

    def remember(self, found: list[Staged | ToDecode]) -> None:
        if self.prober is None:
            return
        entries = []
        for look, answer, outcome in zip(self.looks, self.answers, found, strict=True):
            if look is None or answer is not None or outcome.sha256 is None:
                continue
            data = outcome.data if isinstance(outcome, ToDecode) else None
            if data is None and not look.key.startswith("f:"):
                continue  # an object answered by the cache after a read: its bytes are gone, no ETag check
            entry = remember(look, Fetched(data or b"", outcome.sha256))
            if entry is not None:
                entries.append(entry)
        self.prober.memo.put_many(entries)


def _prober(options: RecognizeOptions) -> Prober | None:
    """The stat memo beside ``options``' cache on this node, opened once per process."""
    key = ("memo", (str(options.resolved_cache_path()), options.rehash, options.max_bytes))
    if key not in _PER_PROCESS:
        memo = open_memo(options)
        _PER_PROCESS[key] = None if memo is None else Prober(memo, rehash=options.rehash, max_bytes=options.max_bytes)
    prober: Prober | None = _PER_PROCESS[key]
    return prober


def _fetcher(options: RecognizeOptions) -> Fetcher:
    key = ("fetcher", (options.max_bytes, options.fetch_timeout, options.allow_private_urls))
    if key not in _PER_PROCESS:
        _PER_PROCESS[key] = Fetcher(options.max_bytes, options.fetch_timeout, options.allow_private_urls)
    fetcher: Fetcher = _PER_PROCESS[key]
    return fetcher


def _cache(options: RecognizeOptions) -> ResultCache | None:
    """The result cache at ``options``' path on this node, opened once per process; None when off."""
    if not options.cache:
        return None
    key = ("cache", str(options.resolved_cache_path()))
    if key not in _PER_PROCESS:
        from wanwu.cache.sqlite import SqliteCache

        _PER_PROCESS[key] = SqliteCache(options.resolved_cache_path())
    cache: ResultCache = _PER_PROCESS[key]
    return cache
