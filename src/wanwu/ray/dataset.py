"""``recognize_dataset``: a Ray Dataset of inputs in, a Dataset of records out (one row per input row)."""

from __future__ import annotations

import logging
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

log = logging.getLogger("wanwu")
GPU_CALLS_PER_ACTOR = 2  # batches in flight in a GPU actor: one copies and ranks while the other computes


def import_ray(data: bool = True) -> Any:
    """``ray``, with ``ray.data`` imported too unless ``data`` is False (it costs pandas and pyarrow: a second
    or two of CPU, which the runner spends only when it reads WebDataset shards on the cluster)."""
    try:
        import ray

        if data:
            import ray.data
    except ImportError:
        raise MissingExtraError("ray[data]", "cluster", "the Ray runner") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """How the two stages are laid out on the cluster.

    ``actors``: inference actors (model copies), a fixed pool; ``actor_cpus``/``actor_gpus``: what each
    reserves (``actor_gpus`` defaults to 1 when the device is ``cuda``, or ``auto`` on a cluster that has
    GPUs: see :func:`plan_inference`); ``decode_batch``: rows per
    decode task call; ``decode_cpus``/``decode_memory``: what each decode task reserves (bytes; a scheduling
    figure, not a limit).

    Half a CPU each, by default: an actor spends part of its time waiting for the next batch, and with whole
    CPUs a 2-CPU node runs the actor and a single decode task, one core half idle (0.62× the local runner's
    throughput on 2 cores); with halves it runs the actor and three decode tasks (0.87×). A quarter
    oversubscribes (0.49×). ``benchmarks/bench_ray.py`` measures it.

    ``local_start``: while a private Ray starts (:class:`~wanwu.ray.RayRunner` without an address), at most
    this many of the first inputs are recognized on this machine by the local orchestrator
    (:mod:`wanwu.ray.warm`), so the first records do not wait for Ray's start; 0 waits for Ray instead.
    """

    actors: int = 1
    actor_cpus: float = 0.5
    actor_gpus: float | None = None
    decode_batch: int = 16
    decode_cpus: float = 0.5
    decode_memory: int = 256 * 1024 * 1024
    local_start: int = 64

    def __post_init__(self) -> None:
        if self.actors < 1 or self.decode_batch < 1 or self.local_start < 0:
            raise UsageError("the Ray runner needs at least one actor, a decode batch of at least one and a "
                             "local start of 0 or more")



@dataclass(frozen=True)
class InferencePlan:
    """How the inference actors run: the GPUs each reserves, the options they load the model with, and how
    many batches each has in flight."""

    gpus: float
    options: RecognizeOptions
    calls_per_actor: int


def plan_inference(options: RecognizeOptions, layout: RayOptions, cluster_gpus: float) -> InferencePlan:
    """Ray shows an actor only the GPUs it reserved (as ``cuda:0``...), so ``--device auto`` must reserve one
    when the cluster has GPUs, or every actor silently runs on the CPU; ``cuda:N`` names the actor's own GPU,
    whichever Ray assigned. A GPU actor takes two batches at once (each on its own CUDA stream)."""
    device = (options.backend.device or "auto").strip().lower()
    gpus = layout.actor_gpus
    if gpus is None:
        gpus = 1.0 if device.startswith("cuda") or (device == "auto" and cluster_gpus >= 1) else 0.0
    if gpus > cluster_gpus:
        raise UsageError(f"each inference actor would reserve {gpus:g} GPU(s), and the Ray cluster has "
                         f"{cluster_gpus:g}: use --device cpu, or add GPU nodes")
    if gpus > 0 and device != "cpu":
        if device.startswith("cuda:"):
            log.info("--device %s on Ray: each actor runs on the GPU Ray assigns it", device)
        device = "cuda"
    elif device == "auto":
        device = "cpu"  # the actor sees no GPU
    actor_options = replace(options, backend=replace(options.backend, device=device))
    return InferencePlan(gpus, actor_options, GPU_CALLS_PER_ACTOR if device == "cuda" else 1)


def cluster_gpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def planned_numerics(ray: Any, spec: ModelSpec, plan: InferencePlan, layout: RayOptions) -> dict[str, str]:
    """The numerics (device class, precision) the actors will compute with, for the decode tasks' cache
    lookups: none for fp32 on CPUs; else asked of a task placed as an actor is (``auto`` precision depends
    on the GPU model). An actor that finds other numerics refuses to run (:class:`~wanwu.ray.stages.Infer`)."""
    backend = plan.options.backend
    if plan.gpus == 0 and backend.device == "cpu" and backend.precision in ("auto", "fp32"):
        return {}
    probe = ray.remote(_numerics).options(num_gpus=plan.gpus, num_cpus=layout.actor_cpus)
    numerics: dict[str, str] = ray.get(probe.remote(spec, plan.options))
    return numerics


def _numerics(spec: ModelSpec, options: RecognizeOptions) -> dict[str, str]:
    from wanwu.engine import Engine

    engine = Engine.load(spec, None, options.backend, 1)
    try:
        return engine.numerics
    finally:
        engine.close()


def prepare(
    ray: Any, spec: ModelSpec, options: RecognizeOptions, layout: RayOptions
) -> tuple[RecognizeOptions, InferencePlan, Context]:
    """A run's decode options (the cache location made absolute: one cache for every node, the driver's;
    ``redis://…`` reaches them all), its inference plan, and the context the decode tasks look up and decode
    with."""
    if options.cache:
        options = replace(options, cache_path=options.cache_location())
    plan = plan_inference(options, layout, cluster_gpus(ray))
    return options, plan, Context.of(spec, options, planned_numerics(ray, spec, plan, layout))


def _actor_pool(ray: Any, actors: int, calls: int) -> Any:
    if calls == 1:
        return ray.data.ActorPoolStrategy(size=actors)
    return ray.data.ActorPoolStrategy(
        size=actors, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True
    )


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
    layout = ray_options or RayOptions()
    spec = model if isinstance(model, ModelSpec) else resolve_model(model, Path(labels) if labels else None)
    options, plan, context = prepare(ray, spec, options or RecognizeOptions(), layout)
    # Decode tasks are spread over the nodes (Ray Data's default) and retried when a node dies under them (Ray's
    # default of 3 retries; a bad file is a record, never a failed task). Their memory reservation, which the
    # actors do not share, also keeps Ray from fusing decoding into the inference actors: decoding batch N+1
    # overlaps inferring batch N, on other cores.
    decoded = ds.map_batches(
        decode_batch, batch_size=layout.decode_batch, batch_format="numpy", num_cpus=layout.decode_cpus,
        memory=layout.decode_memory, fn_kwargs={"context": context, "options": options},
    )
    return decoded.map_batches(
        Infer, batch_size=options.batch_size, batch_format="numpy",
        compute=_actor_pool(ray, layout.actors, plan.calls_per_actor),
        num_cpus=layout.actor_cpus, num_gpus=plan.gpus,
        fn_constructor_kwargs={
            "spec": spec, "options": plan.options, "record": record or options.record,
            "namespace": context.namespace, "split": plan.calls_per_actor == 1,
        },
    )
