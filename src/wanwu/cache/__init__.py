"""The result cache: model outputs keyed by (model/preprocessing namespace, sha256 of the file's bytes).

:class:`ResultCache` is the interface the orchestrator uses; :class:`MemoryCache` is a bounded in-process
implementation (tests, and in-run dedupe of repeated content).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from wanwu.records import TopScores


@dataclass(frozen=True, slots=True)
class CachedResult:
    top: TopScores
    width: int
    height: int


class ResultCache(Protocol):
    def get_many(self, namespace: str, keys: list[str]) -> dict[str, CachedResult]: ...

    def put_many(self, namespace: str, items: Iterable[tuple[str, CachedResult]]) -> None: ...

    def close(self) -> None: ...


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
