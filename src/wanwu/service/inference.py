"""The service's :class:`~wanwu.inference.Inference`: crops from every request go to one dynamic batcher.

Requests run through the one orchestrator (:class:`~wanwu.pipeline.Recognizer`), each on a thread of its own;
their crops join the shared :class:`~wanwu.service.batcher.Batcher` straight from that thread, and the batcher
forms batches across requests. A full batcher queue refuses the whole request (:class:`QueueFullError`, 503).
"""

from __future__ import annotations

from concurrent.futures import Future

from wanwu.inference import Pixels
from wanwu.records import TopScores
from wanwu.service.batcher import Batcher


class BatcherInference:
    gather = 1  # the batcher gathers, across requests
    in_flight = 1 << 30  # the batcher's own queue bound applies

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def submit(self, pixels: list[Pixels], rows: bool = False) -> Future[list[TopScores]]:
        return self.batcher.submit(pixels, rows)

    def close(self) -> None:
        pass
