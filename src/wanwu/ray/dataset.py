"""``recognize_dataset``: a Ray Dataset of inputs in, a Dataset of records out (one row per input row)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from wanwu.config import RecognizeOptions
from wanwu.errors import MissingExtraError, UsageError
from wanwu.models import resolve_model
from wanwu.ray.stages import Infer, decode_batch
from wanwu.records import RecordOptions
from wanwu.rules import Context
from wanwu.spec import ModelSpec


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingExtraError("ray[data]", "cluster", "the Ray runner") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """How the two stages are laid out on the cluster.

    ``actors``: inference actors (model copies), a fixed pool; ``actor_cpus``/``actor_gpus``: what each
    reserves (``actor_gpus`` defaults to 1 when the backend's device is ``cuda``); ``decode_batch``: rows per
    decode task call; ``decode_cpus``/``decode_memory``: what each decode task reserves (bytes; a scheduling
    figure, not a limit).

    Half a CPU each, by default: an actor spends part of its time waiting for the next batch, and with whole
    CPUs a 2-CPU node runs the actor and a single decode task, one core half idle (0.62× the local runner's
    throughput on 2 cores); with halves it runs the actor and three decode tasks (0.87×). A quarter
    oversubscribes (0.49×). ``benchmarks/bench_ray.py`` measures it.
    """

    actors: int = 1
    actor_cpus: float = 0.5
    actor_gpus: float | None = None
    decode_batch: int = 16
    decode_cpus: float = 0.5
    decode_memory: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.actors < 1 or self.decode_batch < 1:
            raise UsageError("the Ray runner needs at least one actor and a decode batch of at least one")

    def gpus(self, options: RecognizeOptions) -> float:
        if self.actor_gpus is not None:
            return self.actor_gpus
        return 1.0 if options.backend.device.startswith("cuda") else 0.0


def recognize_dataset(
    ds: Any, model: str | ModelSpec | None = None, *, labels: Path | str | None = None,
    options: RecognizeOptions | None = None, ray_options: RayOptions | None = None,
    record: RecordOptions | None = None,
) -> Any:
    """Map ``ds`` (rows ``{"input": path_or_url}`` or ``read_binary_files(..., include_paths=True)`` rows)
    to a Dataset of ``{"input", "status", "record"}`` rows, ``record`` being the JSON line ``wanwu recognize``
    writes for that input. Lazy, like every Ray Dataset: nothing runs until it is consumed or written.

    >>> ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)   # doctest: +SKIP
    >>> recognize_dataset(ds, "model.onnx", labels="labels.txt").write_json("s3://bucket/records/")
    """
    ray = import_ray()
    options = options or RecognizeOptions()
    layout = ray_options or RayOptions()
    spec = model if isinstance(model, ModelSpec) else resolve_model(model, Path(labels) if labels else None)
    if options.cache:  # one cache for every node: the driver's (redis://… reaches them all)
        options = replace(options, cache_path=options.cache_location())
    # Decode tasks are spread over the nodes (Ray Data's default) and retried when a node dies under them (Ray's
    # default of 3 retries; a bad file is a record, never a failed task). Their memory reservation, which the
    # actors do not share, also keeps Ray from fusing decoding into the inference actors: decoding batch N+1
    # overlaps inferring batch N, on other cores.
    decoded = ds.map_batches(
        decode_batch, batch_size=layout.decode_batch, batch_format="numpy", num_cpus=layout.decode_cpus,
        memory=layout.decode_memory,
        fn_kwargs={"context": Context.of(spec, options), "options": options},
    )
    return decoded.map_batches(
        Infer, batch_size=options.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=layout.actors),
        num_cpus=layout.actor_cpus, num_gpus=layout.gpus(options),
        fn_constructor_kwargs={"spec": spec, "options": options, "record": record or options.record},
    )
