"""Runners: where a CLI run's records are computed. Registered by name (``--runner``), created lazily.

``local`` is the streaming orchestrator (:class:`wanwu.pipeline.Recognizer`) on this machine; ``ray`` is
:class:`wanwu.ray.RayRunner` on a Ray cluster (extra ``cluster``). Each gives one record per input, in input
order, so the CLI writes, resumes and counts the same way whichever runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from wanwu.config import RecognizeOptions
from wanwu.errors import UsageError
from wanwu.records import Record
from wanwu.sources import InputItem


class Runner(Protocol):
    def recognize(self, inputs: Iterable[InputItem]) -> Iterator[Record]: ...

    def __enter__(self) -> Runner: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@dataclass(frozen=True)
class RunnerConfig:
    model: str | None
    labels: Path | None
    options: RecognizeOptions
    address: str | None = None  # a cluster to join (ray); None = start one of its own


RunnerFactory = Callable[[RunnerConfig], Runner]
# name -> "module:function"; imported only when chosen, so a runner's extra is needed only by its users.
RUNNERS: dict[str, str] = {"local": "wanwu.runners:local_runner", "ray": "wanwu.runners:ray_runner"}


def create_runner(name: str, config: RunnerConfig) -> Runner:
    target = RUNNERS.get(name)
    if target is None:
        raise UsageError(f"unknown runner {name!r}; choose from {', '.join(sorted(RUNNERS))}")
    module, attr = target.split(":")
    factory: RunnerFactory = getattr(importlib.import_module(module), attr)
    return factory(config)


def local_runner(config: RunnerConfig) -> Runner:
    if config.address:
        raise UsageError("--ray-address needs --runner ray")
    from wanwu.pipeline import Recognizer

    return Recognizer(config.model, labels=config.labels, options=config.options)


def ray_runner(config: RunnerConfig) -> Runner:
    from wanwu.ray.runner import RayRunner

    return RayRunner(config.model, labels=config.labels, options=config.options, address=config.address)
