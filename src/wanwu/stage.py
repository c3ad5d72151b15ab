"""One input, prepared for inference: fetch → sha256 → cache lookup → decode + preprocess, errors as values.

:func:`look_up_item` is the per-item stage a runner calls where it cannot use the streaming orchestrator's
own machinery (the Ray Data runner's CPU decode tasks): it answers an input (an error, a cache hit) or hands
back its bytes as :class:`ToDecode`, which the caller decodes (alone or several in one round trip to a decode
process) and turns into a :class:`Staged` with :meth:`ToDecode.decoded`. It is built only from the functions
the orchestrator uses itself (:class:`~wanwu.fetch.Fetcher`, the result cache, :func:`wanwu.imaging.decode_job`),
so its outcome for an input is the orchestrator's: the same pixels, the same error types and messages.

It never raises for a bad input: the outcome is a :class:`Staged` holding exactly one of an error, a cache
hit, or model-ready pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from wanwu.cache import CachedResult, ResultCache
from wanwu.config import RecognizeOptions
from wanwu.errors import ErrorType, InputError
from wanwu.fetch import Fetcher
from wanwu.imaging import DecodeOptions, DecodeResult, Prepared
from wanwu.sources import InputItem
from wanwu.spec import ModelSpec, PreprocessSpec


@dataclass(frozen=True, slots=True)
class StageContext:
    """What the stage needs to know about the run: where preprocessing and cache keys come from."""

    preprocess: PreprocessSpec
    namespace: str
    decode: DecodeOptions

    @classmethod
    def of(cls, spec: ModelSpec, options: RecognizeOptions, numerics: Mapping[str, str] | None = None) -> StageContext:
        """``numerics``: what the inference will run with (:attr:`wanwu.engine.Engine.numerics`)."""
        return cls(
            options.decode_spec(spec.preprocess), options.cache_namespace(spec, numerics), options.decode_options()
        )


@dataclass(frozen=True, slots=True)
class Staged:
    """Exactly one of ``error``, ``cached`` and ``prepared`` is set."""

    input: str
    sha256: str | None = None
    error: tuple[ErrorType, str] | None = None
    cached: CachedResult | None = None
    prepared: Prepared | None = None


Decode = Callable[[bytes, PreprocessSpec, DecodeOptions], DecodeResult]
"""Bytes to model-ready pixels or an ``(error type, message)`` pair: :func:`wanwu.imaging.decode_job`, or a
wrapper that runs it elsewhere (in a process of its own, under a deadline)."""


@dataclass(frozen=True, slots=True)
class ToDecode:
    """An input fetched and hashed, not in the cache: its bytes still to decode."""

    input: str
    sha256: str
    data: bytes

    def decoded(self, result: DecodeResult) -> Staged:
        if isinstance(result, tuple):
            return Staged(self.input, self.sha256, error=result)
        return Staged(self.input, self.sha256, prepared=result)


def look_up_item(
    item: InputItem, fetcher: Fetcher, context: StageContext, cache: ResultCache | None = None,
    data: bytes | None = None,
) -> Staged | ToDecode:
    """Fetch, hash, cache lookup: a finished :class:`Staged` (an error or a cache hit), or what to decode (for
    a caller that decodes several inputs in one go)."""
    if item.kind == "missing":
        return Staged(item.input, error=(item.error_type, item.error))
    try:
        fetched = fetcher.fetch(item if data is None else InputItem.from_bytes(item.input, data))
    except InputError as e:
        return Staged(item.input, error=(e.type, str(e)))
    except Exception as e:  # a download library can fail in ways of its own
        return Staged(item.input, error=("fetch_error", f"{type(e).__name__}: {e}"))
    sha = fetched.sha256
    if cache is not None:
        hit = cache.get_many(context.namespace, [sha]).get(sha)
        if hit is not None:
            return Staged(item.input, sha, cached=hit)
    return ToDecode(item.input, sha, fetched.data)
