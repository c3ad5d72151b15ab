"""The two Ray Data stages: decode on CPU tasks, inference in an actor pool.

Rows in (any of these shapes, mixed blocks are fine):

* ``{"input": str}``: a path or URL, as the CLI would take it (``kind``/``locator``/``error_type`` columns,
  as :func:`item_rows` writes them, are used when present);
* ``{"path": str, "bytes": bytes}``: what ``ray.data.read_binary_files(..., include_paths=True)`` gives
  (``s3://``, ``gs://``, HDFS, ... are read by Ray itself; the record's ``input`` is the path).

:func:`decode_batch` (a plain function: Ray runs it as CPU tasks) turns each row into pixels, a cache hit or an
error. Every decision about a row is one of the orchestrator's own rules (:mod:`wanwu.rules`: fetch failures,
cache lookup, NaN, out of memory; :func:`wanwu.decoders.decode_outcomes`: crashes and deadlines), so a row's
record is the one ``wanwu recognize`` writes. As in the local runner, images are decoded in a process of their
own (:class:`~wanwu.decoders.ProcessDecoder`: one per Ray worker thread, reused; a task's images in one round
trip) under ``options.decode_timeout``: a decoder that crashes or hangs costs its own row a ``decode_error``
record, never the task, its neighbours or the Ray worker (``options.decoders == 0`` decodes in the task's own
process, without either guard).

Repeated content: within one decode task, a file whose bytes repeat another's is looked up and decoded once;
within one inference batch, inferred once; every row still gets its own record. Across blocks, a repeat is
answered from the result cache when the batch holding its first copy has already been inferred (the actors
write fresh results to the cache), and recognized again otherwise: the cluster keeps no state of its own
between tasks.

:class:`Infer` (a callable class: Ray runs it in an actor pool, one model per actor) turns those into records.
Rows out: ``input``, ``status`` (``ok``/``error``), ``record``, the record as one JSON line exactly as
``wanwu recognize -f jsonl`` writes it, and ``cached`` (answered from the result cache). A bad image is an
error row, never a failed task, so ``max_errored_blocks`` is never needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from wanwu.cache import CachedResult, ResultCache, open_cache
from wanwu.cache.codec import decode_top, encode_top
from wanwu.config import RecognizeOptions
from wanwu.decoders import ProcessDecoder
from wanwu.engine import Engine
from wanwu.errors import ModelError
from wanwu.fetch import Fetched, Fetcher
from wanwu.imaging import DecodeResult, decode_each, decode_job
from wanwu.records import RecordOptions, TopScores
from wanwu.rules import Context, Decode, Failure, fetch_item, inference_failure, look_up, record_of, scored
from wanwu.sinks import dumps
from wanwu.sources import ROW_FIELDS, InputItem, expand
from wanwu.spec import ModelSpec
from wanwu.unchanged import Look, Prober, open_memo, remember

Batch = dict[str, npt.NDArray[Any]]
_PER_PROCESS: dict[tuple[str, Any], Any] = {}  # one fetcher / cache per Ray worker process, reused by its tasks


def item_rows(items: Iterable[InputItem]) -> list[dict[str, str]]:
    """Rows for ``ray.data.from_items``: the expanded inputs, each exactly as the local runner would see it."""
    return [item.to_row() for item in items]


def decode_batch(batch: Batch, *, context: Context, options: RecognizeOptions, decode: Decode = decode_job) -> Batch:
    """The CPU stage (``map_batches(decode_batch, fn_kwargs=...)``): fetch, hash, cache lookup, decode.

    ``decode`` (a module-level function, so that it pickles) is what runs in the decode process."""
    fetcher = _fetcher(options)
    cache = _cache(options)
    items = list(_items(batch))
    unchanged = _Unchanged(items, options, context, cache)
    fetched = [unchanged.fetched(i) or fetch_item(item, fetcher) for i, item in enumerate(items)]
    unchanged.remember(fetched)
    shas = [f.sha256 for i, f in enumerate(fetched) if isinstance(f, Fetched) and unchanged.answers[i] is None]
    hits = {**look_up(cache, context.namespace, shas), **unchanged.hits}
    todo: dict[str, bytes] = {}  # each distinct content to decode, once
    for f in fetched:
        if isinstance(f, Fetched) and f.sha256 not in hits:
            todo.setdefault(f.sha256, f.data)
    datas = list(todo.values())
    if options.decoders == 0:
        results = decode_each(decode, datas, context.preprocess, context.decode)
    else:
        decoder = ProcessDecoder(decode, options.decode_timeout, options.decode_address_space())
        results = decoder.many(datas, context.preprocess, context.decode)
    decoded = dict(zip(todo, results, strict=True))
    return _rows(items, fetched, hits, decoded)


class Infer:
    """The inference stage: an actor per model copy (``compute=ray.data.ActorPoolStrategy(size=n)``).

    The model is loaded once, in ``__init__``; fresh results go to the result cache when one is configured.
    """

    def __init__(
        self, spec: ModelSpec, options: RecognizeOptions, record: RecordOptions | None = None,
        namespace: str | None = None, split: bool = True,
    ) -> None:
        self.engine = Engine.load(spec, None, options.backend, options.batch_size)
        self.options = options
        self.record = record or options.record
        # A batch is split over the engine's streams (two half-width onnxruntime batches on a CPU, as the
        # local runner does): one stream alone leaves the cores it was not given idle. A GPU actor is not split:
        # Ray hands it two whole batches at once instead (``split=False``).
        self.parts = self.engine.streams if split else 1
        self.streams = ThreadPoolExecutor(self.parts, thread_name_prefix="wanwu-infer")
        self.namespace = options.cache_namespace(spec, self.engine.numerics)
        if namespace is not None and namespace != self.namespace:  # the decode tasks looked up other numerics
            raise ModelError(
                f"this inference actor computes with {self.engine.numerics or 'fp32 on a CPU'}, not what the run "
                "planned (a cluster with GPUs of different kinds?): pass --precision fp16 or bf16 explicitly"
            )
        crop = spec.preprocess.crop_size
        self.shape = (crop, crop, 3)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["input"])
        outcomes: list[CachedResult | Failure | None] = [None] * n
        first: dict[str, int] = {}  # each distinct content to infer: its first row
        for i in range(n):
            if batch["error_type"][i]:
                outcomes[i] = (batch["error_type"][i], str(batch["error_message"][i]))
            elif batch["cached"][i]:
                outcomes[i] = CachedResult(decode_top(bytes(batch["cached"][i])), *_size_and_warnings(batch, i))
            else:
                first.setdefault(str(batch["sha256"][i]), i)
        fresh = self._fresh(batch, list(first.values()))
        if fresh:
            cache = _cache(self.options)
            if cache is not None:
                cache.put_many(self.namespace, [(k, r) for k, r in fresh.items() if isinstance(r, CachedResult)])
        for i in range(n):
            if outcomes[i] is None:
                outcomes[i] = fresh[str(batch["sha256"][i])]
        metas = batch.get("meta")
        records = [
            record_of(str(batch["input"][i]), _str_or_none(batch["sha256"][i]), o, self.engine.spec, self.record,
                      json.loads(metas[i]) if metas is not None and metas[i] else None)
            for i, o in enumerate(outcomes) if o is not None
        ]
        return {
            "input": _col([r.input for r in records]),
            "status": _col([r.status for r in records]),
            "record": _col([dumps(r) for r in records]),
            "cached": np.array([bool(batch["cached"][i]) for i in range(n)], dtype=bool),
        }

    def _fresh(self, batch: Batch, rows: list[int]) -> dict[str, CachedResult | Failure]:
        """Each of ``rows`` inferred: its result or failure, by sha256."""
        pixels = [np.frombuffer(bytes(batch["pixels"][i]), np.uint8).reshape(self.shape) for i in rows]
        out: dict[str, CachedResult | Failure] = {}
        for i, top in zip(rows, self._scores(pixels), strict=True):
            sha = str(batch["sha256"][i])
            out[sha] = top if isinstance(top, tuple) else scored(top, *_size_and_warnings(batch, i))
        return out

    def _scores(self, pixels: list[npt.NDArray[np.uint8]]) -> list[TopScores | Failure]:
        """Scores for each image; out of memory for several: each again alone (:func:`inference_failure`)."""
        if not pixels:
            return []
        try:
            return list(self._infer(pixels))
        except Exception as e:
            failure = inference_failure(e, len(pixels))
            if failure is None:
                return [one for p in pixels for one in self._scores([p])]
            return [failure]

    def _infer(self, pixels: list[npt.NDArray[np.uint8]]) -> list[TopScores]:
        size = -(-len(pixels) // self.parts)
        chunks = [pixels[i : i + size] for i in range(0, len(pixels), size)]
        return [top for tops in self.streams.map(self.engine.infer, chunks) for top in tops]


# --- helpers ------------------------------------------------------------------------------------------


def _items(batch: Batch) -> Iterator[InputItem]:
    if "input" in batch:
        columns = {name: batch[name] for name in ROW_FIELDS[1:] if name in batch}
        datas = batch.get("bytes")  # a shard's samples (wanwu.shards.shard_rows) carry their bytes
        for i, value in enumerate(batch["input"]):
            if "kind" in columns and "locator" in columns:  # rows as item_rows (or shard_rows) write them
                row = {"input": str(value), **{k: str(c[i]) for k, c in columns.items()}}
                yield InputItem.from_row(row, bytes(datas[i]) if datas is not None and row["kind"] == "bytes" else None)
            else:
                yield _single(str(value))
    else:
        datas = batch.get("bytes")
        for i, path in enumerate(batch["path"]):
            if datas is None:
                yield InputItem(str(path), "file", str(path))
            else:
                yield InputItem.from_bytes(str(path), bytes(datas[i]))


def _single(value: str) -> InputItem:
    """A path or URL row: one item (a folder or glob here would be one input with many records)."""
    items = list(expand([value]))
    return items[0] if len(items) == 1 else InputItem.failed(value, "not a single file or URL")


def _rows(
    items: list[InputItem], fetched: list[Fetched | Failure], hits: dict[str, CachedResult],
    decoded: dict[str, DecodeResult],
) -> Batch:
    """The decode stage's columns: per row an error, a cache hit (``cached``: the encoded scores), or pixels."""
    sha, error_type, message, cached, pixels, warnings, width, height = ([] for _ in range(8))
    for f in fetched:
        key = f.sha256 if isinstance(f, Fetched) else ""
        outcome: Any = f if isinstance(f, tuple) else hits.get(key) or decoded[key]
        failure = outcome if isinstance(outcome, tuple) else None
        sha.append(key)
        error_type.append(failure[0] if failure else "")
        message.append(failure[1] if failure else "")
        cached.append(encode_top(outcome.top) if isinstance(outcome, CachedResult) else b"")
        pixels.append(b"" if failure or isinstance(outcome, CachedResult) else outcome.pixels.tobytes())
        said = () if failure else outcome.warnings
        warnings.append(json.dumps(list(said)) if said else "")
        width.append(0 if failure else outcome.width)
        height.append(0 if failure else outcome.height)
    return {
        "input": _col([item.input for item in items]), "sha256": _col(sha),
        "meta": _col([json.dumps(item.meta, ensure_ascii=False) if item.meta else "" for item in items]),
        "error_type": _col(error_type),
        "error_message": _col(message), "cached": _col(cached), "pixels": _col(pixels),
        "warnings": _col(warnings), "width": np.array(width, dtype=np.int64),
        "height": np.array(height, dtype=np.int64),
    }


def _col(values: list[Any]) -> npt.NDArray[Any]:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _size_and_warnings(batch: Batch, i: int) -> tuple[int, int, tuple[str, ...]]:
    column = batch.get("warnings")
    said = tuple(json.loads(column[i])) if column is not None and column[i] else ()
    return int(batch["width"][i]), int(batch["height"][i]), said


def _str_or_none(value: Any) -> str | None:
    return str(value) if value else None


class _Unchanged:
    """The stat memo of this node for one batch: inputs it vouches for (local files, objects) are answered from
    the cache unread; what the batch read is remembered. (URLs are not revalidated here: they are read.)"""

    def __init__(self, items: list[InputItem], options: RecognizeOptions, context: Context,
                 cache: ResultCache | None) -> None:
        self.prober = _prober(options) if cache is not None else None
        self.answers: list[tuple[str, CachedResult] | None] = [None] * len(items)
        self.looks: list[Look | None] = [None] * len(items)
        self.hits: dict[str, CachedResult] = {}
        if self.prober is None:
            return
        # rows that came with their bytes (read_binary_files, shard samples) are not looked up: read already
        probed = self.prober.probe(items, cache, context.namespace)
        self.looks = [look if look is not None and look.stamp is not None else None for look in probed.looks]
        for i in range(len(items)):
            found = self.answers[i] = probed.answer(i)
            if found is not None:
                self.hits[found[0]] = found[1]

    def fetched(self, i: int) -> Fetched | None:
        """Item ``i`` as if read, when the memo vouches for it (no bytes: its result is among :attr:`hits`)."""
        found = self.answers[i]
        return None if found is None else Fetched(b"", found[0])

    def remember(self, fetched: list[Fetched | Failure]) -> None:
        if self.prober is None:
            return
        entries = []
        for look, answer, outcome in zip(self.looks, self.answers, fetched, strict=True):
            if look is None or answer is not None or not isinstance(outcome, Fetched):
                continue
            entry = remember(look, outcome)
            if entry is not None:
                entries.append(entry)
        self.prober.memo.put_many(entries)


def _prober(options: RecognizeOptions) -> Prober | None:
    """The stat memo beside ``options``' cache on this node, opened once per process."""
    key = ("memo", (options.cache_location(), options.rehash, options.max_bytes))
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
    """The result cache ``options`` name, opened once per process on this node; None when off."""
    if not options.cache:
        return None
    key = ("cache", options.cache_location())
    if key not in _PER_PROCESS:
        _PER_PROCESS[key] = open_cache(options.cache_location())
    cache: ResultCache = _PER_PROCESS[key]
    return cache


def close_per_process() -> None:
    """Close what this process's tasks kept open between calls (fetcher, cache, decode processes)."""
    while _PER_PROCESS:
        _, thing = _PER_PROCESS.popitem()
        if thing is not None:  # no memo beside a plug-in's cache
            thing.close()
    ProcessDecoder.close_all()
