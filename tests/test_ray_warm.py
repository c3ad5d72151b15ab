"""The first records of a run on a private Ray, recognized on this machine while Ray starts
(:mod:`wanwu.ray.warm`): the hand-off to Ray, without starting one (the Ray side is a second recognizer)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import image_bytes
from wanwu.config import RecognizeOptions
from wanwu.errors import ClosedError
from wanwu.pipeline import Recognizer
from wanwu.ray.warm import RayStart, warm_records
from wanwu.records import Record, RecordOptions
from wanwu.sinks import dumps
from wanwu.sources import InputItem, expand


@pytest.fixture()
def inputs(tmp_path: Path) -> list[InputItem]:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.png").write_bytes(image_bytes((20 * i, 90, 200 - 9 * i), (40 + i, 30), "PNG"))
    (folder / "zz_notes.png").write_bytes("不是图片".encode())
    return list(expand([str(folder)]))


def _recognizer(tiny_model: tuple[Path, Path]) -> Recognizer:
    return Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=RecognizeOptions(cache=False, decoders=0))


class _Ray:
    """Stands in for the Ray side: what it was handed, recognized by a recognizer of its own."""

    def __init__(self, rec: Recognizer) -> None:
        self.rec = rec
        self.given: list[InputItem] | None = None

    def __call__(self, rest: Iterator[InputItem]) -> Iterator[Record]:
        self.given = list(rest)
        return self.rec.recognize(self.given)


def test_the_first_block_is_recognized_here_and_the_rest_on_ray_in_order(
    tiny_model: tuple[Path, Path], inputs: list[InputItem]
) -> None:
    with _recognizer(tiny_model) as rec, _recognizer(tiny_model) as other:
        expected = [dumps(r) for r in rec.recognize(inputs)]
        ray = _Ray(other)
        got = [dumps(r) for r in warm_records(rec, iter(inputs), RecordOptions(), lambda: False, ray, 5)]
    assert got == expected  # every record, in input order, the bad file's error record included
    assert ray.given == inputs[5:]  # the local run took exactly the first block; Ray all the rest


def test_ray_takes_the_rest_as_soon_as_it_has_started(
    tiny_model: tuple[Path, Path], inputs: list[InputItem]
) -> None:
    up, seen_up = threading.Event(), threading.Event()

    def started() -> bool:
        if up.is_set():
            seen_up.set()
        return up.is_set()

    def source() -> Iterator[InputItem]:  # Ray is up once the fourth input is taken; the fifth waits for that
        for i, item in enumerate(inputs):
            if i == 3:
                up.set()
            if i == 4:
                assert seen_up.wait(timeout=60), "the hand-off never looked at Ray's start"
            yield item

    with _recognizer(tiny_model) as rec, _recognizer(tiny_model) as other:
        expected = [dumps(r) for r in rec.recognize(inputs)]
        ray = _Ray(other)
        got = [dumps(r) for r in warm_records(rec, source(), RecordOptions(), started, ray, len(inputs))]
    assert got == expected
    assert ray.given == inputs[5:]  # the local run kept what it took; Ray all the rest: none twice, none skipped


def test_a_run_done_here_never_waits_for_ray(tiny_model: tuple[Path, Path], inputs: list[InputItem]) -> None:
    with _recognizer(tiny_model) as rec, _recognizer(tiny_model) as other:
        ray = _Ray(other)
        got = list(warm_records(rec, iter(inputs), RecordOptions(), lambda: False, ray, len(inputs)))
    assert len(got) == len(inputs)
    assert ray.given is None


def test_ray_start_raises_what_the_start_raised_and_its_thread_ends_on_release() -> None:
    def fail() -> int:
        raise RuntimeError("no Ray here")

    start = RayStart(fail)
    assert isinstance(start.wait(), RuntimeError)
    assert start.ready()
    with pytest.raises(RuntimeError, match="no Ray here"):
        start.result()
    start.release()
    assert not any(t.name == "wanwu-ray-start" for t in threading.enumerate())


def test_ray_starts_thread_lives_until_released() -> None:
    start = RayStart(lambda: 7)
    assert start.result() == 7
    assert any(t.name == "wanwu-ray-start" for t in threading.enumerate())  # what it started lives with it
    start.release()
    assert not any(t.name == "wanwu-ray-start" for t in threading.enumerate())


def test_a_start_told_to_wait_begins_on_go_and_never_once_cancelled() -> None:
    calls: list[int] = []
    waiting = RayStart(lambda: calls.append(1) or 1, wait=True)
    assert not waiting.ready() and calls == []
    waiting.go()
    assert waiting.result() == 1 and calls == [1]
    waiting.release()

    never = RayStart(lambda: calls.append(2) or 2, wait=True)
    never.cancel()
    assert isinstance(never.wait(), ClosedError)
    never.release()
    assert calls == [1]  # the cancelled start never ran
