"""The result cache: model outputs keyed by (model/preprocessing namespace, sha256 of the file's bytes).

:class:`ResultCache` is the interface the orchestrator uses; :class:`MemoryCache` is a bounded in-process
implementation (tests, and in-run dedupe of repeated content).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from wanwu.records import TopScores


@dataclass(frozen=True, slots=True)
class CachedResult:
    top: TopScores
    width: int
    height: int
    warnings: tuple[str, ...] = ()  # what the decoder said about the file: part of its record


class ResultCache(Protocol):
    def get_many(self, namespace: str, keys: list[str]) -> dict[str, CachedResult]: ...

    def put_many(self, namespace: str, items: Iterable[tuple[str, CachedResult]]) -> None: ...

    def close(self) -> None: ...


class OneThreadCache:
    """Opens a :class:`ResultCache` and runs every call on it on one thread of its own.

    Implementations need not be thread-safe (a sqlite connection, an LRU), yet concurrent runs of one
    :class:`~wanwu.pipeline.Recognizer` (the service's requests) share the cache through this.
    """

    def __init__(self, open: Callable[[], ResultCache]) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="wanwu-cache")
        try:
            self.inner = self._thread.submit(open).result()
        except BaseException:
            self._thread.shutdown(wait=False)
            raise

    def get_many(self, namespace: str, keys: list[str]) -> dict[str, CachedResult]:
        return self._thread.submit(self.inner.get_many, namespace, keys).result()

    def put_many(self, namespace: str, items: Iterable[tuple[str, CachedResult]]) -> None:
        self._thread.submit(self.inner.put_many, namespace, list(items)).result()

    def close(self) -> None:
        try:
            self._thread.submit(self.inner.close).result()
        finally:
            self._thread.shutdown(wait=True)


class MemoryCache:
    """An LRU of at most ``capacity`` results."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._data: OrderedDict[tuple[str, str], CachedResult] = OrderedDict()

    def get_many(self, namespace: str, keys: list[str]) -> dict[str, CachedResult]:
        out = {}
        for key in keys:
            hit = self._data.get((namespace, key))
            if hit is not None:
                self._data.move_to_end((namespace, key))
                out[key] = hit
        return out

    def put_many(self, namespace: str, items: Iterable[tuple[str, CachedResult]]) -> None:
        for key, value in items:
            self._data[(namespace, key)] = value
            self._data.move_to_end((namespace, key))
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def close(self) -> None:
        self._data.clear()
