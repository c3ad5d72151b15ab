"""``wanwu recognize --runner ray``: the CLI's records, computed on a Ray cluster.

The driver expands the inputs lazily and cuts them into consecutive shards of ``shard_size`` inputs; each
shard goes through decode tasks and inference actors on Ray core (:mod:`wanwu.ray.tasks`: the same stages as
:func:`~wanwu.ray.recognize_dataset`, without a Ray Data execution's start-up), the actors created once for
every shard, and records come back in input order, so the CLI writes them exactly as the local runner does,
each flushed as it arrives. WebDataset shards not yet read are read on the cluster through Ray Data. The
output file is the done marker: ``--resume`` skips every input it records and a killed driver redoes only what
is not recorded. Memory on the driver is bounded by one shard's list of inputs.

A private Ray starts on a thread of its own (:mod:`wanwu.ray.warm`): meanwhile the driver recognizes the
first inputs (``RayOptions.local_start`` at most) with the local orchestrator (the same rules, the same
records), and the rest go to Ray.
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
from wanwu.pipeline import Recognizer
from wanwu.ray.dataset import RayOptions, import_ray, prepare, recognize_dataset
from wanwu.ray.tasks import Layout, TaskStages
from wanwu.ray.warm import RayStart, warm_records
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
        self._hits = 0  # records Ray answered from the result cache, over every run of this runner
        self._local_hits = (0, 0)  # what a closed local recognizer answered: cache hits, unchanged
        self._connected = False
        self._closed = False
        self._stages: TaskStages | None = None  # created on the first run, kept for every later one
        self._runs: weakref.WeakSet[Generator[Record, None, None]] = weakref.WeakSet()  # closed before Ray
        self._start: RayStart[TaskStages] | None = None  # a private Ray starting on a thread
        self._local: Recognizer | None = None  # the first inputs' recognizer while it does
        if self.ray.is_initialized():
            pass  # the caller's Ray session: use it, leave it open
        elif address:
            self.ray.init(address=address, log_to_driver=False)
            self._connected = True
        else:
            self._connected = True
            if self.ray_options.local_start <= 0:
                self._init_private()
                return
            self._start = RayStart(self._start_private, wait=True)  # go: at the first record
            try:
                self._local = Recognizer(self.spec, options=self.options, start_decoders=True)
            except BaseException:
                self.close()
                raise

    @property
    def cache_hits(self) -> int:
        """Records answered from the result cache, over every run of this runner."""
        local = self._local.cache_hits if self._local is not None else 0
        return self._hits + self._local_hits[0] + local

    @property
    def unchanged(self) -> int:
        """Of the cache hits, inputs the local recognizer's stat memo vouched for (not told apart on Ray:
        what the memo answered there is among :attr:`cache_hits`)."""
        return self._local_hits[1] + (self._local.unchanged if self._local is not None else 0)

    def _init_private(self) -> None:
        self.ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                      _system_config=PRIVATE_RAY_CONFIG)

    def _start_private(self) -> TaskStages:
        """A private Ray and the run's actors in it (on the ``wanwu-ray-start`` thread). The actors load the
        model while the local run finishes the inputs it holds and the first decode tasks run."""
        self._init_private()
        return self._create_stages()

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
                elif self._local is not None and self._start is not None and not self._start.ready():
                    for out in warm_records(self._local, iter(part), record, self._start.ready,
                                            lambda rest: self._task_records(rest, record),
                                            self.ray_options.local_start):
                        self._start.go()  # Ray starts once the first record is out
                        yield out
                    if self._start.ready():
                        self._close_local()
                else:
                    yield from self._task_records(iter(part), record)

    def _task_records(self, items: Iterator[InputItem], record: RecordOptions) -> Iterator[Record]:
        """``items``' records from the decode tasks and actors, their first calls submitted now."""
        calls = self._task_stages().run((item.to_row() for item in items), record)

        def records() -> Iterator[Record]:
            for lines, hits in calls:
                self._hits += hits
                yield from (Record.from_dict(json.loads(line)) for line in lines)

        return records()

    def _task_stages(self) -> TaskStages:
        if self._stages is None:
            self._stages = self._start.result() if self._start is not None else self._create_stages()
        return self._stages

    def _create_stages(self) -> TaskStages:
        layout = self.ray_options
        options, plan, context = prepare(self.ray, self.spec, self.options, layout)
        return TaskStages(self.ray, Layout(
            self.spec, options, plan.options, context, layout.actors, layout.actor_cpus, plan.gpus,
            plan.calls_per_actor, layout.decode_batch, layout.decode_cpus, layout.decode_memory,
        ))

    def _close_local(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local_hits = (self._local_hits[0] + self._local.cache_hits,
                                self._local_hits[1] + self._local.unchanged)
            self._local = None

    def _shard_records(self, part: list[InputItem], record: RecordOptions) -> Iterator[Record]:
        self._task_stages()  # a private Ray: started
        import_ray()  # ray.data
        shards = [{"shard": item.locator} for item in part]
        ds = self.ray.data.from_items(shards, override_num_blocks=len(shards)).flat_map(
            shard_rows, fn_kwargs={"options": self.sources})
        out = recognize_dataset(ds, self.spec, options=self.options, ray_options=self.ray_options, record=record)
        # This run's own settings (each Dataset carries a copy of the context): the caller's are left alone.
        out.context.execution_options.preserve_order = True
        out.context.enable_progress_bars = False
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            self._hits += int(batch["cached"].sum())
            for line in batch["record"]:
                yield Record.from_dict(json.loads(line))

    def close(self) -> None:
        """Ends the runs in progress (their tasks cancelled), the actors, and the private Ray if it started one.
        A run's iterator left unfinished ends here, not later when it is collected (by then Ray would be shut
        down, and a call into it would start a new local Ray)."""
        self._closed = True
        while self._runs:
            self._runs.pop().close()
        self._close_local()
        start, self._start = self._start, None
        if start is not None:
            start.cancel()  # a Ray not begun is never started
            error = start.wait()  # one begun is shut down once started, never while it starts
            if error is None and self._stages is None:
                self._stages = start.result()
            elif error is not None:
                log.debug("the private Ray did not start: %s", error)
        if self._stages is not None:
            self._stages.close()
            self._stages = None
        if self._connected:
            self.ray.shutdown()
            self._connected = False
        if start is not None:
            start.release()

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
