"""The service's :class:`~wanwu.inference.Inference`: crops from every request go to one dynamic batcher.

Requests run through the one orchestrator (:class:`~wanwu.pipeline.Recognizer`), each on a thread of its own;
their crops cross into the event loop here and join the shared :class:`~wanwu.service.batcher.Batcher`, which
forms batches across requests. A full batcher queue refuses the whole request (:class:`QueueFullError`, 503).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from wanwu.inference import Pixels
from wanwu.records import TopScores
from wanwu.service.batcher import Batcher


class BatcherInference:
    gather = 1  # the batcher gathers, across requests
    in_flight = 1 << 30  # the batcher's own queue bound applies

    def __init__(self, batcher: Batcher, loop: asyncio.AbstractEventLoop) -> None:
        self.batcher = batcher
        self.loop = loop

    def submit(self, pixels: list[Pixels]) -> Future[list[TopScores]]:
        return asyncio.run_coroutine_threadsafe(self._all(pixels), self.loop)

    async def _all(self, pixels: list[Pixels]) -> list[TopScores]:
        if self.batcher.room() < len(pixels):
            from wanwu.service.batcher import QueueFullError

            raise QueueFullError(f"the recognition queue is full ({self.batcher.config.max_queue} images waiting)")
        futures = [self.batcher.submit(p) for p in pixels]
        return list(await asyncio.gather(*futures))

    def close(self) -> None:
        pass
