"""Runners: where a CLI run's records are computed. Registered by name (``--runner``), created lazily.

``local`` is the streaming orchestrator (:class:`wanwu.pipeline.Recognizer`) on this machine; ``ray`` is
:class:`wanwu.ray.RayRunner` on a Ray cluster (extra ``cluster``). Each gives one record per input, in input
order, so the CLI writes, resumes and counts the same way whichever runs. Third parties add runners through
the ``wanwu.runners`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from wanwu.config import RecognizeOptions
from wanwu.errors import UsageError
from wanwu.records import Record, RecordOptions
from wanwu.registry import Registry
from wanwu.sources import InputItem, SourceOptions
from wanwu.spec import ModelSpec


class Runner(Protocol):
    @property
    def spec(self) -> ModelSpec: ...

    @property
    def cache_hits(self) -> int: ...

    @property
    def unchanged(self) -> int: ...  # of the cache hits, inputs not read (the stat memo vouched for them)

    def recognize(self, inputs: Iterable[InputItem], record: RecordOptions | None = None) -> Iterator[Record]: ...

    def __enter__(self) -> Runner: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@dataclass(frozen=True)
class RunnerConfig:
    model: str | ModelSpec | None  # a spec when the CLI resolved it already (e.g. with --prompt)
    labels: Path | None
    options: RecognizeOptions
    address: str | None = None  # a cluster to join (ray); None = start one of its own
    label_column: str | None = None
    actors: int = 1  # inference actors (ray)
    long: bool = True  # the inputs may be many: start the decode processes while the model loads (local)
    sources: SourceOptions | None = None  # how shards read on the cluster are read (ray: --with-meta)


RunnerFactory = Callable[[RunnerConfig], Runner]
RUNNERS: Registry[RunnerFactory] = Registry("runner", group="wanwu.runners")
RUNNERS.lazy("local", "wanwu.runners:local_runner")
RUNNERS.lazy("ray", "wanwu.runners:ray_runner", extra="cluster")


def create_runner(name: str, config: RunnerConfig) -> Runner:
    return RUNNERS.get(name)(config)


def local_runner(config: RunnerConfig) -> Runner:
    if config.address or config.actors != 1:
        raise UsageError("--ray-address and --ray-actors need --runner ray")
    from wanwu.pipeline import Recognizer

    return Recognizer(config.model, labels=config.labels, label_column=config.label_column, options=config.options,
                      start_decoders=config.long)


def ray_runner(config: RunnerConfig) -> Runner:
    if config.options.jpeg_decoder != "cpu":
        raise UsageError("--jpeg-decoder needs --runner local: Ray's decode tasks decode on CPUs")
    from wanwu.ray.dataset import RayOptions
    from wanwu.ray.runner import RayRunner

    return RayRunner(
        config.model, labels=config.labels, label_column=config.label_column, options=config.options,
        address=config.address, ray_options=RayOptions(actors=config.actors), sources=config.sources,
    )
