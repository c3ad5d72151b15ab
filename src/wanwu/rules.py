"""The per-item rules: what each input's record is, decided once for every runner.

Pure functions from one stage's outcome to the next step or to a failure, called by the streaming orchestrator
(:class:`wanwu.pipeline._Run`) and by the Ray Data stages (:mod:`wanwu.ray.stages`) alike, so the two cannot
drift apart:

* :func:`fetch_item` / :func:`fetch_failure`: an input's bytes and sha256, or why there are none;
* :func:`look_up`: the result cache, by (namespace, sha256), many keys in one call;
* :func:`scored`: the model's scores for one image: a result, or ``model_error`` when they are not finite
  numbers (never a record, never cached);
* :func:`inference_failure`: out of memory for a batch of one is the device's ``model_error``; any other model
  failure is fatal for the run (raised again);
* :func:`record_of`: a result or a failure becomes the input's :class:`~wanwu.records.Record`;
* :class:`DecodeMeter` / :func:`budget_spent`: the decode seconds a run has used, and the record of an input
  left undecoded once its budget is spent.

What a decoder crash or a decode past its deadline means for each file of the task is
:func:`wanwu.decoders.decode_outcomes` (with the process handling it rules over). :class:`Context` is what these
need to know about the run.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from wanwu.cache import CachedResult, ResultCache
from wanwu.config import RecognizeOptions
from wanwu.errors import ErrorType, InputError, OutOfMemoryError
from wanwu.fetch import Fetched, Fetcher
from wanwu.imaging import DecodeOptions, DecodeResult
from wanwu.records import Record, RecordOptions, TopScores
from wanwu.sources import InputItem
from wanwu.spec import ModelSpec, PreprocessSpec

Failure = tuple[ErrorType, str]
"""An input's error record in the making: its type and message."""

NOT_FINITE = "the model returned scores that are not finite numbers for this image"


@dataclass(frozen=True, slots=True)
class Context:
    """What the rules need to know about the run: how images are decoded, and the cache namespace."""

    preprocess: PreprocessSpec
    namespace: str
    decode: DecodeOptions

    @classmethod
    def of(cls, spec: ModelSpec, options: RecognizeOptions, numerics: Mapping[str, str] | None = None) -> Context:
        """``numerics``: what the inference will run with (:attr:`wanwu.engine.Engine.numerics`)."""
        return cls(
            options.decode_spec(spec.preprocess), options.cache_namespace(spec, numerics), options.decode_options()
        )


Decode = Callable[[bytes, PreprocessSpec, DecodeOptions], DecodeResult]
"""Bytes to model-ready pixels or a failure: :func:`wanwu.imaging.decode_job`, or a test's hostile stand-in."""


# --- fetch ------------------------------------------------------------------------------------------------


def fetch_failure(exc: BaseException) -> Failure:
    """A fetch that raised: an :class:`~wanwu.errors.InputError` names its own type; anything else (a download
    library failing its own way) is a ``fetch_error``."""
    if isinstance(exc, InputError):
        return exc.type, str(exc)
    return "fetch_error", f"{type(exc).__name__}: {exc}"


def fetch_item(item: InputItem, fetcher: Fetcher) -> Fetched | Failure:
    """The input's bytes and sha256, or its failure; never raises for a bad input."""
    if item.kind == "missing":
        return item.error_type, item.error
    try:
        return fetcher.fetch(item)
    except Exception as e:
        return fetch_failure(e)


# --- cache ------------------------------------------------------------------------------------------------


def look_up(cache: ResultCache | None, namespace: str, shas: list[str]) -> dict[str, CachedResult]:
    """The cached results among ``shas`` (one call, however many keys: one round trip to a shared cache)."""
    if cache is None or not shas:
        return {}
    return cache.get_many(namespace, list(dict.fromkeys(shas)))


# --- inference --------------------------------------------------------------------------------------------


def scored(top: TopScores, width: int, height: int, warnings: tuple[str, ...]) -> CachedResult | Failure:
    """One image's scores: its result (what the cache keeps), or ``model_error`` when any is NaN or infinite."""
    if not math.isfinite(top.logsumexp):
        return "model_error", NOT_FINITE
    return CachedResult(top, width, height, warnings)


def inference_failure(exc: BaseException, images: int) -> Failure | None:
    """An inference of ``images`` images that raised ``exc``. Out of memory (the engine has already halved its
    batch down to one, :class:`~wanwu.errors.DeviceOutOfMemoryError`): None for several images, each to be
    inferred again alone, so that the others of the batch keep their results; for one, ``model_error``: every
    crop has the same size, so the device (full, or shared), not the image, is at fault (never ``too_large``,
    which says the file is too big). Anything else is a broken model, fatal for the run: raised again."""
    if isinstance(exc, OutOfMemoryError):
        return None if images > 1 else ("model_error", str(exc))
    raise exc


# --- records ----------------------------------------------------------------------------------------------


def is_failure(outcome: CachedResult | Failure) -> bool:
    return isinstance(outcome, tuple)


def record_of(
    input: str, sha256: str | None, outcome: CachedResult | Failure, spec: ModelSpec, record: RecordOptions,
    meta: dict[str, Any] | None = None,
) -> Record:
    """The input's record: a success from a result (fresh or cached), or an error record; with what rode along
    with the input (``meta``: :attr:`~wanwu.sources.InputItem.meta`)."""
    if isinstance(outcome, tuple):
        out = Record.failure(input, outcome[0], outcome[1], sha256)
    else:
        out = Record.success(
            input, outcome.top, spec, record, sha256=sha256, width=outcome.width, height=outcome.height,
            warnings=outcome.warnings,
        )
    if meta is not None:
        out.meta = meta
    return out


# --- the decode budget ------------------------------------------------------------------------------------


class DecodeMeter:
    """Seconds of decoding a run has used, added up from the decode threads."""

    def __init__(self) -> None:
        self.spent = 0.0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self.spent += seconds


def budget_spent(budget: float) -> str:
    """The record's message for an input left undecoded when its run's decode-time budget ran out."""
    return (f"not decoded: this run's decode-time budget of {budget:g} s is spent (--decode-budget; the service "
            "gives each request one)")
