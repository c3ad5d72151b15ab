"""The hand-over of a run's inputs from their reading thread (:class:`wanwu.intake.Intake`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from wanwu.errors import UsageError
from wanwu.intake import Intake
from wanwu.sources import InputItem

WAIT_S = 60  # generous: the reading thread may be slow to get the interpreter on a loaded machine


def _items(n: int, then: BaseException | None = None) -> Iterator[InputItem]:
    for i in range(n):
        yield InputItem(f"in-{i}", "file", f"/nowhere/{i}.jpg")
    if then is not None:
        raise then


def _drain(intake: Intake, woken: threading.Event) -> list[str]:
    """Take everything, waiting for a wake-up whenever nothing has arrived (as a run does)."""
    got: list[str] = []
    while not intake.exhausted:
        woken.clear()
        item = intake.take()
        if item is not None:
            got.append(item.input)
        elif not intake.exhausted:
            assert woken.wait(WAIT_S), "the reader added inputs without waking the run"
    return got


def test_more_inputs_than_its_capacity_all_arrive_in_order() -> None:
    woken = threading.Event()
    intake = Intake(_items(5000), woken.set, capacity=64)
    assert _drain(intake, woken) == [f"in-{i}" for i in range(5000)]
    assert intake.take() is None


def test_the_sources_error_comes_after_what_it_gave() -> None:
    woken = threading.Event()
    intake = Intake(_items(300, then=UsageError("bad listing")), woken.set, capacity=16)
    got: list[str] = []
    with pytest.raises(UsageError, match="bad listing"):
        while True:
            woken.clear()
            item = intake.take()
            if item is not None:
                got.append(item.input)
            else:
                assert woken.wait(WAIT_S)
    assert got == [f"in-{i}" for i in range(300)] and intake.exhausted


def test_a_run_that_found_nothing_is_woken_by_the_next_input() -> None:
    release = threading.Event()

    def slow() -> Iterator[InputItem]:
        yield InputItem("first", "file", "/nowhere/1.jpg")
        release.wait(WAIT_S)  # a pipe left open: nothing more for now
        yield InputItem("second", "file", "/nowhere/2.jpg")

    woken = threading.Event()
    intake = Intake(slow(), woken.set)
    assert woken.wait(WAIT_S)
    woken.clear()
    first = intake.take()
    assert first is not None and first.input == "first"
    assert intake.take() is None  # nothing yet: the run goes to sleep
    release.set()
    assert woken.wait(WAIT_S)
    second = intake.take()
    assert second is not None and second.input == "second"


def test_closing_stops_a_reader_that_waits_for_room() -> None:
    woken = threading.Event()
    before = set(threading.enumerate())
    intake = Intake(_items(10_000), woken.set, capacity=8)
    (reader,) = [t for t in set(threading.enumerate()) - before if t.name == "wanwu-inputs"]
    assert woken.wait(WAIT_S)
    intake.close()
    reader.join(WAIT_S)
    assert not reader.is_alive()


def test_a_list_is_taken_as_it_is_without_a_reading_thread() -> None:
    before = set(threading.enumerate())
    woken = threading.Event()
    intake = Intake(list(_items(3)), woken.set, capacity=2)  # a service request's uploads, held already
    assert [t for t in set(threading.enumerate()) - before if t.name == "wanwu-inputs"] == []
    assert _drain(intake, woken) == ["in-0", "in-1", "in-2"]
