"""The service's dynamic batcher on its own: batches across submitting threads, whole refusals, failures kept to
their own batch, a clean stop. (It needs no web framework: these run in the minimal install too.)"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.helpers import waiting_for_company
from wanwu.errors import QueueError
from wanwu.records import TopScores
from wanwu.service.batcher import Batcher, BatcherConfig, QueueFullError

Make = Callable[..., Batcher]

WAIT = 60.0  # seconds a test waits for a result that should come at once


def _crop(value: int) -> np.ndarray:
    return np.full((2, 2, 3), value, np.uint8)


def _scores(pixels: list[np.ndarray]) -> list[TopScores]:
    """Each crop's own value as its top index: which answer went where is visible."""
    return [TopScores(np.array([int(p[0, 0, 0])], np.int32), np.array([1.0], np.float32), 0.0) for p in pixels]


class Model:
    """Records every batch; ``hold`` keeps the next batch on the model until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()
        self.fail_values: set[int] = set()
        self.rows: list[bool] = []  # per batch: whether it was asked for score rows
        self._seen = threading.Condition()

    def __call__(self, pixels: list[np.ndarray], rows: bool = False) -> list[TopScores]:
        values = [int(p[0, 0, 0]) for p in pixels]
        with self._seen:
            self.batches.append(values)
            self.rows.append(rows)
            self._seen.notify_all()
        if self.hold.is_set():
            self.hold.clear()
            self.holding.set()
            assert self.release.wait(WAIT), "the test never released the batch"
        if self.fail_values & set(values):
            raise RuntimeError("the model failed")
        return _scores(pixels)

    def seen(self, n: int) -> bool:
        """Wait until ``n`` batches have reached the model."""
        with self._seen:
            return self._seen.wait_for(lambda: len(self.batches) >= n, WAIT)


@pytest.fixture
def model() -> Model:
    return Model()


@pytest.fixture
def make(model: Model) -> Iterator[Make]:
    made: list[Batcher] = []

    def build(more_coming: Callable[[], bool] = lambda: True, **config: object) -> Batcher:
        batcher = Batcher(model, BatcherConfig(**config), more_coming=more_coming)  # type: ignore[arg-type]
        batcher.start()
        made.append(batcher)
        return batcher

    yield build
    for batcher in made:
        batcher.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("wanwu-batcher")], "a consumer outlived stop()"


def _top(tops: list[TopScores]) -> list[int]:
    return [int(t.indices[0]) for t in tops]


def test_crops_queued_during_a_batch_form_the_next_one_across_threads(model: Model, make: Make) -> None:
    batcher = make(max_batch_size=32, max_delay_s=0.05, streams=1)
    model.hold.set()
    first = batcher.submit([_crop(1), _crop(2), _crop(3), _crop(4)] * 8)  # a full batch: starts at once
    assert model.holding.wait(WAIT)
    with ThreadPoolExecutor(10) as pool:  # ten requests arrive while it runs
        futures = list(pool.map(lambda v: batcher.submit([_crop(v)]), range(10, 20)))
    model.release.set()
    assert _top(first.result(WAIT)) == [1, 2, 3, 4] * 8
    assert [_top(f.result(WAIT)) for f in futures] == [[v] for v in range(10, 20)]  # each got its own answer
    # the ten queued while the one consumer was busy: the next batch took them all
    assert sorted(model.batches[1]) == list(range(10, 20)) and len(model.batches) == 2


def test_a_lone_crop_starts_its_batch_at_once_when_no_other_is_on_its_way(model: Model, make: Make) -> None:
    batcher = make(max_batch_size=32, max_delay_s=3600.0, streams=1, more_coming=lambda: False)
    assert _top(batcher.submit([_crop(7)]).result(WAIT)) == [7]  # not an hour later
    assert model.batches == [[7]]


def test_a_batch_waits_for_crops_on_their_way_and_goes_once_none_are(model: Model, make: Make) -> None:
    coming = True
    batcher = make(max_batch_size=4, max_delay_s=3600.0, streams=1, more_coming=lambda: coming)
    first = batcher.submit([_crop(1)])
    waiting_for_company(batcher, WAIT)  # more are being decoded: the consumer holds the crop and waits
    second = batcher.submit([_crop(2)])
    assert model.batches == [] and not first.done()
    coming = False  # the last one arrives: nothing else is on its way
    third = batcher.submit([_crop(3)])
    assert [_top(f.result(WAIT)) for f in (first, second, third)] == [[1], [2], [3]]
    assert model.batches == [[1, 2, 3]]  # one batch, not full, started by the last arrival


def test_a_waiting_batch_goes_when_nudged_once_nothing_else_is_on_its_way(model: Model, make: Make) -> None:
    """The last decode in flight failed: no crop comes to wake the batch, so the decode pool's nudge does (with
    an hour's delay, the crop would otherwise wait an hour)."""
    coming = True
    batcher = make(max_batch_size=4, max_delay_s=3600.0, streams=1, more_coming=lambda: coming)
    first = batcher.submit([_crop(1)])
    waiting_for_company(batcher, WAIT)
    batcher.nudge()  # nothing changed: it keeps waiting
    waiting_for_company(batcher, WAIT)
    assert model.batches == [] and not first.done()
    coming = False
    batcher.nudge()
    assert _top(first.result(WAIT)) == [1] and model.batches == [[1]]


def test_only_a_batch_holding_a_crop_that_wants_its_score_row_asks_the_model_for_rows(
    model: Model, make: Make
) -> None:
    """/v2 wants every class's score; /v1 the top ones, which a backend may rank on its device: a batch of /v1
    crops must not pay for rows (the seed model's are 54,092 floats an image)."""
    batcher = make(max_batch_size=4, max_delay_s=3600.0, streams=1)
    plain = batcher.submit([_crop(v) for v in range(4)])  # full: starts at once
    assert _top(plain.result(WAIT)) == [0, 1, 2, 3]
    model.hold.set()
    held = batcher.submit([_crop(v) for v in range(10, 14)])
    assert model.holding.wait(WAIT)
    mixed = [batcher.submit([_crop(20), _crop(21)]), batcher.submit([_crop(22)], rows=True),
             batcher.submit([_crop(23)])]  # queued during the held batch: the next batch takes them together
    model.release.set()
    assert _top(held.result(WAIT)) == [10, 11, 12, 13]
    assert [_top(f.result(WAIT)) for f in mixed] == [[20, 21], [22], [23]]
    assert model.batches == [[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]]
    assert model.rows == [False, False, True]


def test_a_submission_split_across_batches_comes_back_whole_and_in_order(model: Model, make: Make) -> None:
    batcher = make(max_batch_size=4, max_delay_s=3600.0, streams=2)  # only a full batch starts
    future = batcher.submit([_crop(v) for v in range(10)])  # 4 + 4 start at once (full); 2 wait for company
    assert model.seen(2)
    waiting_for_company(batcher, WAIT)
    more = batcher.submit([_crop(v) for v in range(100, 102)])  # ...which fills the third batch: it starts
    assert _top(future.result(WAIT)) == list(range(10))
    assert _top(more.result(WAIT)) == [100, 101]
    assert sorted(len(b) for b in model.batches) == [4, 4, 4]


def test_a_submission_without_room_for_all_its_crops_is_refused_whole(model: Model, make: Make) -> None:
    batcher = make(max_batch_size=2, max_delay_s=3600.0, max_queue=5, streams=1)
    model.hold.set()
    running = batcher.submit([_crop(1), _crop(2)])  # on the model, held: the queue is empty again
    assert model.holding.wait(WAIT)
    queued = batcher.submit([_crop(3), _crop(4), _crop(5), _crop(6)])
    refused = batcher.submit([_crop(7), _crop(8)])  # 4 queued + 2 > 5
    with pytest.raises(QueueFullError):
        refused.result(WAIT)
    assert batcher.depth == 4 and batcher.room() == 1  # nothing of the refused one was queued
    model.release.set()
    assert _top(running.result(WAIT)) == [1, 2] and _top(queued.result(WAIT)) == [3, 4, 5, 6]
    assert not {7, 8} & {v for b in model.batches for v in b}


def test_a_failing_batch_fails_only_the_submissions_in_it(model: Model, make: Make) -> None:
    batcher = make(max_batch_size=2, max_delay_s=3600.0, streams=1)
    model.fail_values = {66}
    bad = batcher.submit([_crop(66), _crop(67)])
    with pytest.raises(RuntimeError, match="the model failed"):
        bad.result(WAIT)
    good = batcher.submit([_crop(1), _crop(2)])
    assert _top(good.result(WAIT)) == [1, 2]  # the consumer lived on


def test_stop_fails_what_is_queued_and_refuses_what_comes_after(model: Model, make: Make) -> None:
    batcher = make(max_batch_size=8, max_delay_s=3600.0, streams=1)
    waiting = batcher.submit([_crop(1)])  # waits an hour for company
    batcher.stop()
    with pytest.raises(QueueError, match="shutting down"):
        waiting.result(WAIT)
    with pytest.raises(QueueError, match="shutting down"):
        batcher.submit([_crop(2)]).result(WAIT)
    assert model.batches == []


def test_an_empty_submission_is_answered_at_once(make: Make) -> None:
    batcher = make()
    assert batcher.submit([]).result(WAIT) == []


def test_stop_fails_a_batch_still_on_the_model_and_does_not_wait_for_it_forever(model: Model, make: Make) -> None:
    batcher = make(max_batch_size=1, max_delay_s=0.0, streams=1)
    model.hold.set()
    stuck = batcher.submit([_crop(1)])
    assert model.holding.wait(WAIT)  # the model hangs on it
    batcher.stop(wait_s=0.1)  # returns although the consumer is still inside the model
    with pytest.raises(QueueError, match="shutting down"):
        stuck.result(WAIT)  # its request ends now, not when (if ever) the model returns
    model.release.set()  # the consumer comes back, answers nothing more and ends
    for thread in [t for t in threading.enumerate() if t.name.startswith("wanwu-batcher")]:
        thread.join(WAIT)
