"""The runner's two stages on Ray core: decode tasks and inference actors, no Ray Data execution.

``wanwu recognize --runner ray`` runs :func:`~wanwu.ray.stages.decode_batch` as plain Ray tasks and
:class:`~wanwu.ray.stages.Infer` in plain Ray actors, and keeps input order itself. The records are the same as
through :func:`~wanwu.ray.recognize_dataset` (the same two stage functions); what it saves is start-up. A Ray
Data execution starts three service actors of its own (stats, autoscaling coordinator, actor locations) and
imports ``ray.data`` (with pandas and pyarrow) in the driver and in every worker process, on top of the
workers wanwu needs: on a 2-core machine that doubled the CPU time spent before the first record
(docs/cluster.md has the figures). Here the workers import only ``wanwu.ray.stages``.

Layout: the decode tasks are spread over the nodes (``SPREAD``, as Ray Data does) and retried by Ray when a
node dies under them (3 retries, Ray's default; a bad file is a record, never a failed task); the actors are
restarted elsewhere and their calls retried (``max_restarts=-1``, ``max_task_retries=-1``, as Ray Data's actor
pool). One inference call takes the decoded blocks of one batch; a bounded window of calls is in flight, and
their results are taken in input order. The first call takes a single decode block, so the first record does
not wait for a whole batch to be decoded. The actors are created once per runner and serve every shard.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from wanwu.config import RecognizeOptions
from wanwu.ray.stages import Batch, Infer, decode_batch
from wanwu.records import RecordOptions
from wanwu.rules import Context
from wanwu.spec import ModelSpec


def decode_rows(rows: list[dict[str, str]], context: Context, options: RecognizeOptions) -> Batch:
    """A decode task: rows as :func:`~wanwu.ray.stages.item_rows` writes them, to the decode stage's columns."""
    columns = {name: np.array([row[name] for row in rows], dtype=object) for name in rows[0]}
    return decode_batch(columns, context=context, options=options)


class InferActor:
    """An inference actor: one model, loaded once; each call takes the decoded blocks of one batch."""

    def __init__(self, spec: ModelSpec, options: RecognizeOptions, namespace: str, split: bool) -> None:
        self.infer = Infer(spec, options, None, namespace, split)

    def ready(self) -> bool:
        return True

    def infer_blocks(self, record: RecordOptions, *blocks: Batch) -> tuple[list[str], int]:
        """The records (JSON lines) of ``blocks``' rows in order, and how many came from the cache."""
        batch = blocks[0] if len(blocks) == 1 else {
            name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]
        }
        self.infer.record = record
        out = self.infer(batch)
        return [str(line) for line in out["record"]], int(out["cached"].sum())


@dataclass(frozen=True)
class Layout:
    """What :class:`TaskStages` needs of the run's plan (:func:`wanwu.ray.dataset.prepare`)."""

    spec: ModelSpec
    options: RecognizeOptions  # the decode tasks' (the driver's, with the cache location made absolute)
    actor_options: RecognizeOptions  # the actors' (the device each sees)
    context: Context
    actors: int
    actor_cpus: float
    actor_gpus: float
    calls_per_actor: int
    decode_rows: int  # rows per decode task
    decode_cpus: float
    decode_memory: int


class TaskStages:
    """Decode tasks and an actor pool on the connected Ray, for any number of runs, until :meth:`close`."""

    def __init__(self, ray: Any, layout: Layout) -> None:
        self.ray = ray
        self.layout = layout
        self._decode = ray.remote(decode_rows).options(
            num_cpus=layout.decode_cpus, memory=layout.decode_memory, scheduling_strategy="SPREAD",
        )
        actor = ray.remote(InferActor).options(
            num_cpus=layout.actor_cpus, num_gpus=layout.actor_gpus, max_restarts=-1, max_task_retries=-1,
            max_concurrency=layout.calls_per_actor,
        )
        # Created now, so the actors start (and load the model) while the first blocks decode.
        self.actors = [
            actor.remote(layout.spec, layout.actor_options, layout.context.namespace, layout.calls_per_actor == 1)
            for _ in range(layout.actors)
        ]
        self._shared = (ray.put(layout.context), ray.put(layout.options))
        self._next_actor = 0

    def run(self, rows: Iterable[dict[str, str]], record: RecordOptions) -> Iterator[tuple[list[str], int]]:
        """Per inference call, in input order: its records (JSON lines) and its cache hits. The first calls are
        submitted here, before the first result is asked for."""
        rows = iter(rows)
        blocks_per_call = max(1, -(-self.layout.options.batch_size // self.layout.decode_rows))
        window = max(2 * len(self.actors) * self.layout.calls_per_actor, self._decode_slots() // blocks_per_call + 2)
        pending: deque[Any] = deque()
        first = self._submit(rows, 1, record)  # the first call takes a single block: the first record comes soon
        if first is not None:
            pending.append(first)
            self._fill(pending, window, rows, blocks_per_call, record)
        return self._results(pending, window, rows, blocks_per_call, record)

    def _results(
        self, pending: deque[Any], window: int, rows: Iterator[dict[str, str]], blocks: int, record: RecordOptions,
    ) -> Iterator[tuple[list[str], int]]:
        try:
            while pending:
                yield self.ray.get(pending.popleft())
                self._fill(pending, window, rows, blocks, record)
        finally:
            if pending and self.ray.is_initialized():
                for ref in pending:
                    self.ray.cancel(ref)

    def _fill(
        self, pending: deque[Any], window: int, rows: Iterator[dict[str, str]], blocks: int, record: RecordOptions,
    ) -> None:
        while len(pending) < window:
            call = self._submit(rows, blocks, record)
            if call is None:
                return
            pending.append(call)

    def _submit(self, rows: Iterator[dict[str, str]], blocks: int, record: RecordOptions) -> Any:
        decoded = []
        for _ in range(blocks):
            part = list(islice(rows, self.layout.decode_rows))
            if not part:
                break
            decoded.append(self._decode.remote(part, *self._shared))
        if not decoded:
            return None
        actor = self.actors[self._next_actor % len(self.actors)]
        self._next_actor += 1
        return actor.infer_blocks.remote(record, *decoded)

    def _decode_slots(self) -> int:
        cpus = float(self.ray.cluster_resources().get("CPU", 1.0))
        return max(1, int(cpus / self.layout.decode_cpus))

    def close(self) -> None:
        if self.ray.is_initialized():
            for actor in self.actors:
                self.ray.kill(actor)
        self.actors = []
