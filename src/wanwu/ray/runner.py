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
from itertools import groupby, islice
from pathlib import Path
from types import TracebackType
from typing import Any

from wanwu.config import RecognizeOptions
from wanwu.errors import ClosedError
from wanwu.models import resolve_model
from wanwu.ray.dataset import RayOptions, import_ray, recognize_dataset
from wanwu.ray.stages import item_rows
from wanwu.records import Record, RecordOptions
from wanwu.shards import shard_rows
from wanwu.sources import InputItem, SourceOptions
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
        self.cache_hits = 0  # records answered from the result cache, over every run of this runner
        self.unchanged = 0  # not told apart on a cluster: what the stat memo answered is among cache_hits
        self._connected = False
        self._closed = False
        if self.ray.is_initialized():
            pass  # the caller's Ray session: use it, leave it open
        elif address:
            self.ray.init(address=address, log_to_driver=False)
            self._connected = True
        else:
            self.ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
            self._connected = True

    def recognize(self, inputs: Iterable[InputItem], record: RecordOptions | None = None) -> Iterator[Record]:
        """One record per input, in input order. ``record`` shapes them (default ``options.record``). Raises
        ClosedError once closed.

        Consecutive WebDataset shards not yet read (``shard`` items) are read on the cluster, one read task
        per shard, each streaming its samples into the decode stage."""
        if self._closed:
            raise ClosedError("this Ray runner is closed")
        for deferred, group in groupby(inputs, key=lambda item: item.kind == "shard"):
            items = iter(group)
            while part := list(islice(items, self.shard_size)):
                if deferred:
                    shards = [{"shard": item.locator} for item in part]
                    ds = self.ray.data.from_items(shards, override_num_blocks=len(shards)).flat_map(
                        shard_rows, fn_kwargs={"options": SourceOptions(max_bytes=self.options.max_bytes)})
                else:
                    ds = self.ray.data.from_items(item_rows(part), override_num_blocks=self._blocks(len(part)))
                yield from self._records(ds, record)

    def _records(self, ds: Any, record: RecordOptions | None) -> Iterator[Record]:
        out = recognize_dataset(ds, self.spec, options=self.options, ray_options=self.ray_options, record=record)
        # This run's own settings (each Dataset carries a copy of the context): the caller's are left alone.
        out.context.execution_options.preserve_order = True
        out.context.enable_progress_bars = False
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            self.cache_hits += int(batch["cached"].sum())
            for line in batch["record"]:
                yield Record.from_dict(json.loads(line))

    def _blocks(self, n: int) -> int:
        """Blocks of one decode call (records stream back as blocks finish), at most 1,000 per shard to plan."""
        return max(1, min(1000, n // self.ray_options.decode_batch))

    def close(self) -> None:
        self._closed = True
        if self._connected:
            self.ray.shutdown()
            self._connected = False

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
