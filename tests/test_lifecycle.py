"""Lifecycles: close() closes, a closed object raises and never starts threads or processes again, and the
service's shutdown waits (a bounded time) for the work in hand."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import image_bytes
from wanwu.config import RecognizeOptions
from wanwu.decoders import DecodePool
from wanwu.engine import Engine
from wanwu.errors import ClosedError
from wanwu.inference import LocalInference
from wanwu.pipeline import Recognizer
from wanwu.records import RecordOptions
from wanwu.sources import InputItem


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def test_a_closed_recognizer_raises_and_starts_nothing_again(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    photo = tmp_path / "a.png"
    photo.write_bytes(image_bytes(fmt="PNG"))
    rec = Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=RecognizeOptions(cache=False, decoders=1))
    run = rec.recognize([str(photo), str(photo)])
    assert next(run).ok  # a run in flight
    rec.close()
    rec.close()  # idempotent
    for call in (lambda: rec.recognize([str(photo)]), rec.fetch_pool, rec.url_pool, rec.decoders.get,
                 lambda: rec.inference.submit([np.zeros((4, 4, 3), np.uint8)])):
        with pytest.raises(ClosedError):
            call()
    assert _threads("wanwu-fetch") == [] and _threads("wanwu-url") == []  # none re-created


def test_a_run_in_flight_fails_rather_than_restart_pools_after_close(
    tiny_model: tuple[Path, Path], tmp_path: Path
) -> None:
    photos = []
    for i in range(300):  # more than one window: the run must fetch again after close
        photos.append(tmp_path / f"{i:03d}.png")
        photos[-1].write_bytes(image_bytes((i % 250, 40, 90), size=(40 + i % 7, 30), fmt="PNG"))
    rec = Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=RecognizeOptions(cache=False, decoders=0))
    run = rec.recognize(map(str, photos))
    assert next(run).ok
    rec.close()
    with pytest.raises(ClosedError):
        list(run)
    assert _threads("wanwu-fetch") == [] and _threads("wanwu-decode") == []


def test_decode_pool_and_inference_stay_closed(tiny_model: tuple[Path, Path]) -> None:
    pool = DecodePool(0, threads=2)
    assert pool.get().submit(int).result() == 0
    pool.close()
    with pytest.raises(ClosedError):
        pool.get()
    with pytest.raises(ClosedError):
        pool.submit(int, timeout=1.0)
    engine = Engine.load(str(tiny_model[0]), tiny_model[1])
    inference = LocalInference(engine, 4)
    inference.close()
    with pytest.raises(ClosedError):
        inference.submit([np.zeros((4, 4, 3), np.uint8)])
    engine.close()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
    loop.close()


@pytest.mark.extra("server")
def test_runtime_close_waits_for_the_requests_in_hand(
    tiny_model: tuple[Path, Path], loop: asyncio.AbstractEventLoop
) -> None:
    from wanwu.service import ServeConfig
    from wanwu.service.batcher import _NoObserver
    from wanwu.service.runtime import Runtime

    engine = Engine.load(str(tiny_model[0]), tiny_model[1])
    release, started = threading.Event(), threading.Event()
    real_infer = engine.infer

    def held_infer(pixels: list[Any], keep_rows: bool = False) -> Any:
        started.set()
        assert release.wait(120), "the test never released the batch"
        return real_infer(pixels, keep_rows)

    engine.infer = held_infer  # type: ignore[method-assign]
    config = ServeConfig(model=str(tiny_model[0]), labels=tiny_model[1],
                         options=RecognizeOptions(cache=False, decoders=0))
    runtime = Runtime(config, engine, None, _NoObserver(), drain_s=120)
    runtime.start()
    item = InputItem.from_bytes("a.png", image_bytes(fmt="PNG"))
    request = asyncio.run_coroutine_threadsafe(runtime.recognize([item], RecordOptions()), loop)
    assert started.wait(120)  # the request's image is on the model
    closing = asyncio.run_coroutine_threadsafe(runtime.close(), loop)
    refused = asyncio.run_coroutine_threadsafe(runtime.recognize([item], RecordOptions()), loop)
    with pytest.raises(ClosedError):
        refused.result(timeout=60)  # new work is refused at once, while the one in hand still runs
    assert not closing.done() and not request.done()
    release.set()
    records = request.result(timeout=120)
    closing.result(timeout=120)
    assert [r.ok for r in records] == [True]  # finished, not cut off by the shutdown
    with pytest.raises(ClosedError):
        runtime.recognizer.recognize([item])


@pytest.mark.extra("server")
def test_the_service_asks_the_model_for_score_rows_only_for_requests_that_want_them(
    tiny_model: tuple[Path, Path], loop: asyncio.AbstractEventLoop
) -> None:
    """A /v1 request's records carry top scores, a /v2 one's (RecordOptions.scores) every class's: only the
    latter's batches keep rows."""
    from wanwu.service import ServeConfig
    from wanwu.service.batcher import _NoObserver
    from wanwu.service.runtime import Runtime

    engine = Engine.load(str(tiny_model[0]), tiny_model[1])
    asked: list[bool] = []
    real_infer = engine.infer

    def spying_infer(pixels: list[Any], keep_rows: bool = False) -> Any:
        asked.append(keep_rows)
        return real_infer(pixels, keep_rows)

    engine.infer = spying_infer  # type: ignore[method-assign]
    config = ServeConfig(model=str(tiny_model[0]), labels=tiny_model[1],
                         options=RecognizeOptions(cache=False, decoders=0))
    runtime = Runtime(config, engine, None, _NoObserver())
    runtime.start()
    try:
        items = [InputItem.from_bytes("a.png", image_bytes(fmt="PNG"))]
        top = asyncio.run_coroutine_threadsafe(runtime.recognize(items, RecordOptions()), loop).result(120)
        assert asked == [False] and top[0].ok and top[0].scores is None
        every = asyncio.run_coroutine_threadsafe(runtime.recognize(items, RecordOptions(scores=True)), loop)
        records = every.result(120)
        assert asked == [False, True]
        assert records[0].scores is not None and records[0].scores.shape == (engine.spec.num_classes,)
    finally:
        asyncio.run_coroutine_threadsafe(runtime.close(), loop).result(120)


def test_wanwu_leaves_the_process_warnings_hook_as_it_found_it(tmp_path: Path) -> None:
    import subprocess
    import sys
    import warnings

    from tests.helpers import with_corrupt_exif
    from wanwu.imaging import prepare
    from wanwu.spec import PreprocessSpec

    code = ("import warnings; before = warnings.showwarning; import wanwu.imaging, wanwu.pipeline, wanwu.ray; "
            "assert warnings.showwarning is before, 'importing wanwu replaced warnings.showwarning'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        prepared = prepare(with_corrupt_exif(image_bytes((90, 40, 160), size=(80, 60))), PreprocessSpec())
    assert any("Corrupt EXIF" in w for w in prepared.warnings)  # the file's warning reached its record
    assert warnings.showwarning is before  # and the hook is the application's again


def test_the_chinese_cli_leaves_click_itself_alone() -> None:
    import subprocess
    import sys

    code = ("import click.core, click.exceptions, click.formatting, click.decorators\n"
            "before = {m: getattr(m, '_', None) for m in (click.core, click.exceptions, click.formatting, "
            "click.decorators)}\n"
            "from wanwu.cli.main import main\n"
            "assert main(['recognize', '--help']) == 0\n"
            "assert main(['recognize', 'x', '--top-k', '0']) == 2\n"
            "assert all(getattr(m, '_', None) is f for m, f in before.items()), 'click was patched'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "WANWU_LANG": "zh", "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "用法：" in done.stdout and "[默认：5; 1<=x<=50]" in done.stdout
    assert "错误：'-k' / '--top-k' 的值无效" in done.stderr and "用 'wanwu recognize -h' 查看帮助。" in done.stderr
