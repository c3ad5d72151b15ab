"""``wanwu recognize --runner ray``: the CLI's records, computed on a Ray cluster.

The driver expands the inputs lazily and cuts them into consecutive shards of ``shard_size`` inputs; each
shard is one Ray Dataset (decode tasks → inference actors) consumed in order (``preserve_order``), so records
come back in input order and the CLI writes them exactly as the local runner does, each flushed as it
arrives. The output file is the done marker: ``--resume`` skips every input it records and a killed driver
redoes only what is not recorded. Memory on the driver is bounded by one shard's list of inputs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from types import TracebackType

from wanwu.config import RecognizeOptions
from wanwu.models import resolve_model
from wanwu.ray.dataset import RayOptions, import_ray, recognize_dataset
from wanwu.ray.stages import item_rows
from wanwu.records import Record, RecordOptions
from wanwu.sources import InputItem
from wanwu.spec import ModelSpec

log = logging.getLogger("wanwu")


class RayRunner:
    """Connects to ``address`` (``ray start --head`` prints it), or starts a private local Ray when None and
    shuts it down on close."""

    def __init__(
        self, model: str | ModelSpec | None = None, *, labels: Path | str | None = None,
        options: RecognizeOptions | None = None, address: str | None = None,
        ray_options: RayOptions | None = None, shard_size: int = 100_000, label_column: str | None = None,
    ) -> None:
        self.options = options or RecognizeOptions()
        self.ray_options = ray_options or RayOptions()
        self.shard_size = shard_size
        self.ray = import_ray()
        self.spec = model if isinstance(model, ModelSpec) else resolve_model(
            model, Path(labels) if labels else None, label_column
        )
        self.cache_hits = 0  # not counted on a cluster: cached results are answered inside the decode tasks
        self.unchanged = 0  # nor are inputs the stat memo answered
        self._connected = False
        if self.ray.is_initialized():
            pass  # the caller's Ray session: use it, leave it open
        elif address:
            self.ray.init(address=address, log_to_driver=False)
            self._connected = True
        else:
            self.ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
            self._connected = True
        ctx = self.ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False

    def recognize(self, inputs: Iterable[InputItem], record: RecordOptions | None = None) -> Iterator[Record]:
        """One record per input, in input order. ``record`` shapes them (default ``options.record``)."""
        items = iter(inputs)
        while shard := list(islice(items, self.shard_size)):
            ds = self.ray.data.from_items(item_rows(shard), override_num_blocks=self._blocks(len(shard)))
            out = recognize_dataset(
                ds, self.spec, options=self.options, ray_options=self.ray_options, record=record
            )
            for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
                for line in batch["record"]:
                    yield Record.from_dict(json.loads(line))

    def _blocks(self, n: int) -> int:
        """Blocks of one decode call (records stream back as blocks finish), at most 1,000 per shard to plan."""
        return max(1, min(1000, n // self.ray_options.decode_batch))

    def close(self) -> None:
        if self._connected:
            self.ray.shutdown()
            self._connected = False

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
