"""``wanwu recognize --runner ray``: the CLI's records, computed on a Ray cluster.

The driver expands the inputs lazily and cuts them into consecutive shards of ``shard_size`` inputs; each
shard goes through decode tasks and inference actors on Ray core (:mod:`wanwu.ray.tasks`: the same stages as
:func:`~wanwu.ray.recognize_dataset`, without a Ray Data execution's start-up), the actors created once for
every shard, and records come back in input order, so the CLI writes them exactly as the local runner does,
each flushed as it arrives. WebDataset shards not yet read are read on the cluster through Ray Data. The
output file is the done marker: ``--resume`` skips every input it records and a killed driver redoes only what
is not recorded. Memory on the driver is bounded by one shard's list of inputs.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from collections.abc import Generator, Iterable, Iterator
from dataclasses import replace
from itertools import groupby, islice
from pathlib import Path
from types import TracebackType

from wanwu.config import RecognizeOptions
from wanwu.errors import ClosedError
from wanwu.models import resolve_model
from wanwu.ray.dataset import RayOptions, import_ray, prepare, recognize_dataset
from wanwu.ray.tasks import Layout, TaskStages
from wanwu.records import Record, RecordOptions
from wanwu.shards import shard_rows
from wanwu.sources import InputItem, SourceOptions
from wanwu.spec import ModelSpec

log = logging.getLogger("wanwu")
# Ray ends a worker idle for 1 s once more workers exist than CPUs (the actor and the decode tasks' workers
# always do): decode workers waiting for the actor to catch up were ended and started again (Python, the stage's
# imports, a decode process), 22 worker processes for 1,000 photos in one run on a busy 2-core machine (5.5
# img/s). A private Ray keeps idle workers a minute; a cluster keeps what ``ray start`` set
# (``RAY_idle_worker_killing_time_threshold_ms``).
PRIVATE_RAY_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


class RayRunner:
    """Connects to ``address`` (``ray start --head`` prints it), or starts a private local Ray when None and
    shuts it down on close."""

    def __init__(
        self, model: str | ModelSpec | None = None, *, labels: Path | str | None = None,
        options: RecognizeOptions | None = None, address: str | None = None,
        ray_options: RayOptions | None = None, shard_size: int = 100_000, label_column: str | None = None,
        sources: SourceOptions | None = None,
    ) -> None:
        """``sources``: how the WebDataset shards read on the cluster are read (``with_meta``)."""
        self.options = options or RecognizeOptions()
        self.sources = replace(sources or SourceOptions(), max_bytes=self.options.max_bytes, defer_shards=False)
        self.ray_options = ray_options or RayOptions()
        self.shard_size = shard_size
        self.ray = import_ray(data=False)
        self.spec = model if isinstance(model, ModelSpec) else resolve_model(
            model, Path(labels) if labels else None, label_column
        )
        self.cache_hits = 0  # records answered from the result cache, over every run of this runner
        self.unchanged = 0  # not told apart on a cluster: what the stat memo answered is among cache_hits
        self._connected = False
        self._closed = False
        self._stages: TaskStages | None = None  # created on the first run, kept for every later one
        self._runs: weakref.WeakSet[Generator[Record, None, None]] = weakref.WeakSet()  # closed before Ray
        if self.ray.is_initialized():
            pass  # the caller's Ray session: use it, leave it open
        elif address:
            self.ray.init(address=address, log_to_driver=False)
            self._connected = True
        else:
            self.ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                          _system_config=PRIVATE_RAY_CONFIG)
            self._connected = True

    def recognize(self, inputs: Iterable[InputItem], record: RecordOptions | None = None) -> Iterator[Record]:
        """One record per input, in input order. ``record`` shapes them (default ``options.record``). Raises
        ClosedError once closed.

        Consecutive WebDataset shards not yet read (``shard`` items) are read on the cluster, one read task
        per shard, each streaming its samples into the decode stage."""
        if self._closed:
            raise ClosedError("this Ray runner is closed")
        run = self._recognize(inputs, record or self.options.record)
        self._runs.add(run)
        return run

    def _recognize(
        self, inputs: Iterable[InputItem], record: RecordOptions
    ) -> Generator[Record, None, None]:
        for deferred, group in groupby(inputs, key=lambda item: item.kind == "shard"):
            items = iter(group)
            while part := list(islice(items, self.shard_size)):
                if deferred:
                    yield from self._shard_records(part, record)
                else:
                    for lines, hits in self._task_stages().run((item.to_row() for item in part), record):
                        self.cache_hits += hits
                        yield from (Record.from_dict(json.loads(line)) for line in lines)

    def _task_stages(self) -> TaskStages:
        if self._stages is None:
            layout = self.ray_options
            options, plan, context = prepare(self.ray, self.spec, self.options, layout)
            self._stages = TaskStages(self.ray, Layout(
                self.spec, options, plan.options, context, layout.actors, layout.actor_cpus, plan.gpus,
                plan.calls_per_actor, layout.decode_batch, layout.decode_cpus, layout.decode_memory,
            ))
        return self._stages

    def _shard_records(self, part: list[InputItem], record: RecordOptions) -> Iterator[Record]:
        import_ray()  # ray.data
        shards = [{"shard": item.locator} for item in part]
        ds = self.ray.data.from_items(shards, override_num_blocks=len(shards)).flat_map(
            shard_rows, fn_kwargs={"options": self.sources})
        out = recognize_dataset(ds, self.spec, options=self.options, ray_options=self.ray_options, record=record)
        # This run's own settings (each Dataset carries a copy of the context): the caller's are left alone.
        out.context.execution_options.preserve_order = True
        out.context.enable_progress_bars = False
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            self.cache_hits += int(batch["cached"].sum())
            for line in batch["record"]:
                yield Record.from_dict(json.loads(line))

    def close(self) -> None:
        """Ends the runs in progress (their tasks cancelled), the actors, and the private Ray if it started one.
        A run's iterator left unfinished ends here, not later when it is collected (by then Ray would be shut
        down, and a call into it would start a new local Ray)."""
        self._closed = True
        while self._runs:
            self._runs.pop().close()
        if self._stages is not None:
            self._stages.close()
            self._stages = None
        if self._connected:
            self.ray.shutdown()
            self._connected = False

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
