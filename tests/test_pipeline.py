"""The orchestrator: one record per input, in input order, never a neighbour's result."""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from tests.helpers import WrappedBackend, image_bytes, wait_for
from wanwu import RecognizeOptions, Recognizer
from wanwu.backends import BackendOptions
from wanwu.engine import Engine
from wanwu.errors import OutOfMemoryError
from wanwu.imaging import decode_jobs, prepare
from wanwu.sources import InputItem, expand

COLORS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230), (240, 240, 240)]


def _recognizer(model: tuple[Path, Path], **kw: object) -> Recognizer:
    opts = RecognizeOptions(cache=False, **kw)  # type: ignore[arg-type]
    return Recognizer(str(model[0]), labels=model[1], options=opts)


@pytest.fixture
def mixed(tmp_path: Path, photos: Path) -> tuple[list[str], dict[str, str]]:
    """18 distinct real photos (18 different answers) interleaved with every kind of bad input."""
    good, bad = {}, {}
    for path in sorted(photos.iterdir())[::55][:18]:
        good[str(path)] = "ok"
    cases = {
        "corrupt.jpg": b"\xff\xd8\xff\xe0garbage-not-a-jpeg" * 3,
        "truncated.jpg": image_bytes(size=(900, 700))[:3000],
        "text.png": b"hello, I am text",
        "empty.jpg": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        bad[str(tmp_path / name)] = "decode_error" if name != "text.png" else "unsupported"
    misnamed = tmp_path / "really_a_png.jpg"
    misnamed.write_bytes(image_bytes((20, 230, 20), fmt="PNG"))
    good[str(misnamed)] = "ok"
    noext = tmp_path / "noextension"
    noext.write_bytes(image_bytes((230, 20, 20)))
    good[str(noext)] = "ok"
    missing = str(tmp_path / "missing.jpg")
    bad[missing] = "not_found"
    order = list(good) + list(bad)
    rng = np.random.default_rng(1)
    rng.shuffle(order)
    return order, {**good, **bad}


@pytest.mark.shared
@pytest.mark.parametrize("workers", [0, 2])
def test_each_input_gets_its_own_record(
    mobilenet: tuple[Path, Path], mixed: tuple[list[str], dict[str, str]], workers: int
) -> None:
    order, expected = mixed
    with _recognizer(mobilenet, decoders=workers, batch_size=4) as rec:
        records = list(rec.recognize(order))
        singles = {p: rec.recognize_one(p) for p in order if expected[p] == "ok"}
    assert [r.input for r in records] == order  # input order, exactly once each
    tops = {singles[p].predictions[0].index for p in singles}
    assert len(tops) >= 15, "the photos must have distinguishable answers, or a swap could go unseen"
    for r in records:
        want = expected[r.input]
        if want == "ok":
            assert r.status == "ok", r
            # batched result == the image's own result alone: never a neighbour's
            assert [p.index for p in r.predictions] == [p.index for p in singles[r.input].predictions]
            assert r.predictions[0].score == pytest.approx(singles[r.input].predictions[0].score, abs=1e-5)
        else:
            assert r.status == "error" and r.error is not None
            assert r.error.type == want, (r.input, r.error)


def test_records_are_streamed(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    p.write_bytes(image_bytes())

    def endless() -> Iterator[str]:
        while True:
            yield str(p)

    with _recognizer(tiny_model, decoders=0, batch_size=8) as rec:
        stream = rec.recognize(endless())
        first = [next(stream) for _ in range(20)]  # an endless input still yields records
        stream.close()
    assert all(r.ok for r in first)


def test_what_has_arrived_is_recognized_while_the_source_waits(
    tiny_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """A source that gives 40 inputs and then waits (a list piped on stdin, still open): their records come
    out while it waits, with the stat memo's block reads on (a cache), before any further input exists."""
    paths = []
    for i, color in enumerate(COLORS * 7):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(image_bytes(color, fmt="PNG", size=(40 + i, 40)))
    release = threading.Event()

    def slow() -> Iterator[str]:
        yield from map(str, paths[:40])
        assert release.wait(300), "the test never released the source"
        yield str(paths[40])

    opts = RecognizeOptions(cache_path=tmp_path / "c.sqlite3", decoders=0, batch_size=8)
    with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=opts) as rec:
        stream = rec.recognize(slow())
        first = [next(stream) for _ in range(40)]  # would wait for ever if the run waited for the source
        release.set()
        rest = list(stream)
    assert [r.input for r in first + rest] == list(map(str, paths[:41]))
    assert all(r.ok for r in first + rest)


def test_duplicate_content_is_inferred_once(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    data = image_bytes((20, 20, 230))
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"copy{i}.jpg")
        paths[-1].write_bytes(data)
    with _recognizer(tiny_model, decoders=0, batch_size=4) as rec:
        seen: list[int] = []
        infer = rec.engine.infer

        def counting(pixels: list[npt.NDArray[np.uint8]]) -> list[object]:
            seen.append(len(pixels))
            return infer(pixels)  # type: ignore[return-value]

        rec.engine.infer = counting  # type: ignore[method-assign]
        records = list(rec.recognize([str(p) for p in paths]))
    assert sum(seen) == 1
    assert [r.input for r in records] == [str(p) for p in paths]
    assert len({r.predictions[0].index for r in records}) == 1


def test_an_inference_whose_submit_takes_only_the_pixels_still_works(tiny_model: tuple[Path, Path]) -> None:
    """``Inference.submit`` grew ``rows`` (whole score rows, asked for only by records that want them): an
    Inference written before, taking just the pixels, is called as before."""
    from concurrent.futures import Future

    from wanwu.inference import LocalInference

    engine = Engine.load(str(tiny_model[0]), tiny_model[1])
    calls: list[int] = []

    class PixelsOnly:
        gather, in_flight = 4, 1

        def __init__(self) -> None:
            self.inner = LocalInference(engine, 4)

        def submit(self, pixels: list[npt.NDArray[np.uint8]]) -> Future[Any]:
            calls.append(len(pixels))
            return self.inner.submit(pixels)

        def close(self) -> None:
            self.inner.close()

    with Recognizer(engine=engine, options=RecognizeOptions(cache=False, decoders=0),
                    inference=PixelsOnly()) as rec:  # type: ignore[arg-type]
        records = list(rec.recognize([InputItem.from_bytes(f"{i}.png", image_bytes((40 * i, 90, 200), fmt="PNG"))
                                      for i in range(3)]))
    assert [r.ok for r in records] == [True, True, True] and sum(calls) == 3


@pytest.mark.parametrize("full_decode", [False, True])
def test_large_jpegs_decode_reduced_unless_full_decode(
    tiny_model: tuple[Path, Path], tmp_path: Path, full_decode: bool
) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(1536, 2048, 3), dtype=np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(noise).save(path, "JPEG", quality=90)
    with _recognizer(tiny_model, decoders=0, full_decode=full_decode) as rec:
        spec = rec.spec.preprocess
        seen: list[npt.NDArray[np.uint8]] = []
        infer = rec.engine.infer

        def spying(pixels: list[npt.NDArray[np.uint8]]) -> list[object]:
            seen.extend(pixels)
            return infer(pixels)  # type: ignore[return-value]

        rec.engine.infer = spying  # type: ignore[method-assign]
        (record,) = rec.recognize([str(path)])
    assert record.ok and (record.width, record.height) == (2048, 1536)
    full = prepare(path.read_bytes(), replace(spec, jpeg_draft_factor=0)).pixels
    reduced = prepare(path.read_bytes(), spec).pixels
    assert not np.array_equal(full, reduced)  # noise: the reduced decode really differs
    np.testing.assert_array_equal(seen[0], full if full_decode else reduced)


def crashing_decode(datas: list[bytes], spec: object, max_pixels: int) -> list[object]:
    """Decodes like wanwu, except that a file starting with CRASH kills the worker process outright."""
    if any(d.startswith(b"CRASH") for d in datas):
        os._exit(1)
    return decode_jobs(datas, spec, max_pixels)  # type: ignore[arg-type, return-value]


def test_a_decoder_crash_costs_only_its_own_file(
    tiny_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = []
    for i in range(20):
        paths.append(str(tmp_path / f"{i:02d}.png"))
        Path(paths[-1]).write_bytes(image_bytes(COLORS[i % 6], size=(220 + i, 200), fmt="PNG"))
    for i in (3, 11):
        Path(paths[i]).write_bytes(b"CRASH" + image_bytes())
    with _recognizer(tiny_model, decoders=0) as rec:
        singles = {p: rec.recognize_one(p) for p in paths if not Path(p).read_bytes().startswith(b"CRASH")}
    monkeypatch.setattr("wanwu.pipeline._Run.decode", staticmethod(crashing_decode))
    with _recognizer(tiny_model, decoders=2, batch_size=4) as rec:
        records = list(rec.recognize(paths))
    assert [r.input for r in records] == paths
    for i, r in enumerate(records):
        if i in (3, 11):
            assert r.error is not None and r.error.type == "decode_error" and "crashed" in r.error.message
        else:
            assert r.ok and [p.index for p in r.predictions] == [p.index for p in singles[r.input].predictions]


class _OomBackend(WrappedBackend):
    """Wraps a real backend, two streams; refuses batches above a limit like a GPU out of memory."""

    def __init__(self, inner: object, limit: int) -> None:
        super().__init__(inner, streams=2)
        self.limit, self.sizes = limit, []  # type: ignore[var-annotated]

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self.sizes.append(len(batch))
        if len(batch) > self.limit:
            raise OutOfMemoryError(f"fake OOM at {len(batch)}")
        return self.inner.infer(batch)  # type: ignore[no-any-return]


def test_out_of_memory_halves_the_batch(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    paths = []
    for i in range(40):
        paths.append(str(tmp_path / f"{i}.png"))
        Path(paths[-1]).write_bytes(image_bytes(COLORS[i % 6], size=(240 + i, 240), fmt="PNG"))
    engine = Engine.load(str(tiny_model[0]), tiny_model[1], BackendOptions(), max_batch=16)
    fake = _OomBackend(engine.backend, limit=5)
    engine.backend = fake
    rec = Recognizer(engine=engine, options=RecognizeOptions(cache=False, decoders=0, batch_size=16))
    records = list(rec.recognize(paths))
    assert [r.input for r in records] == paths and all(r.ok for r in records)
    # On a loaded machine the first batch may leave before all 16 are decoded: whatever its size, a batch above
    # the limit was tried, and each one that ran out of memory was tried again in halves or smaller (two streams
    # may run out at once: 12 and 16 both fail, and both go on at 6, the smaller half).
    assert any(s > 5 for s in fake.sizes), fake.sizes
    for i, size in enumerate(fake.sizes):
        if size > 5:
            assert any(later <= size // 2 for later in fake.sizes[i + 1 :]), fake.sizes
    assert engine.max_batch <= 5
    # nothing lost or doubled: every image inferred exactly once successfully
    assert sum(s for s in fake.sizes if s <= 5) == 40


def test_the_last_crops_of_a_run_are_shared_among_the_free_streams(
    tiny_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer crops than a batch, two streams: each stream infers its share of them (half of what is left when
    it starts), not one batch on one core while the other waits."""
    from wanwu.run import _Run

    monkeypatch.setattr(_Run, "FLUSH_AFTER_S", 60.0)  # no partial batch leaves early, however slow the decodes
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        Path(paths[-1]).write_bytes(image_bytes(COLORS[i % 6], size=(220 + i, 230), fmt="PNG"))
    loaded = Engine.load(str(tiny_model[0]), tiny_model[1])
    sizes = _OomBackend(loaded.backend, limit=32)  # streams: 2; records each batch's size, refuses none
    engine = Engine(loaded.spec, sizes, max_batch=32)
    with Recognizer(engine=engine, options=RecognizeOptions(cache=False, decoders=0, batch_size=32)) as rec:
        records = list(rec.recognize(paths))
    assert [r.input for r in records] == paths and all(r.ok for r in records)
    assert sum(sizes.sizes) == 6 and max(sizes.sizes) == 3, sizes.sizes


def test_once_every_input_is_in_each_stream_takes_its_share_of_what_is_left(
    tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 images, batches of 8, two streams, one image slow to decode: the first batch takes half of what is
    left (6) as soon as that many are ready, rather than a full 8 on one stream while the other waits for the
    slow decode and then infers what remains alone (on 100 phone photos, the last batch ran alone for 0.12 s)."""
    from wanwu.run import _Run

    monkeypatch.setattr(_Run, "FLUSH_AFTER_S", 60.0)  # no partial batch leaves early, however slow the decodes
    uploads = [InputItem.from_bytes(f"u{i}", image_bytes(COLORS[i % 6], size=(220 + i, 230), fmt="PNG"))
               for i in range(12)]
    slow, batch_started = uploads[-1].data, threading.Event()

    def decode(datas: list[bytes], *args: Any) -> list[Any]:
        if datas == [slow]:
            batch_started.wait(timeout=60)  # held until some batch has started
        return decode_jobs(datas, *args)

    monkeypatch.setattr(_Run, "decode", staticmethod(decode))

    class Sizes(_OomBackend):
        def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            result = super().infer(batch)
            batch_started.set()
            return result

    loaded = Engine.load(str(tiny_model[0]), tiny_model[1])
    sizes = Sizes(loaded.backend, limit=32)  # streams: 2; records each batch's size, refuses none
    engine = Engine(loaded.spec, sizes, max_batch=8)
    options = RecognizeOptions(cache=False, decoders=0, batch_size=8, fetch_threads=8)
    with Recognizer(engine=engine, options=options) as rec:
        records = list(rec.recognize(uploads))
    assert [r.input for r in records] == [u.input for u in uploads] and all(r.ok for r in records)
    # the batches reach the model in any order (two streams): the largest is the first stream's share
    assert max(sizes.sizes) == 6 and sum(sizes.sizes) == 12, sizes.sizes


@pytest.mark.parametrize(("ready", "busy", "gather", "share"), [
    (6, 0, 32, 3), (7, 0, 32, 4), (1, 0, 32, 1), (6, 1, 32, 6),  # one stream busy: the free one takes them all
    (6, 0, 1, 6),  # a service's batcher gathers across requests itself: everything at once
    (300, 0, 32, 150),
])
def test_a_partial_batch_takes_its_share_of_the_ready_crops(ready: int, busy: int, gather: int, share: int) -> None:
    from types import SimpleNamespace

    from wanwu.run import _Run

    run = SimpleNamespace(handoff=256 if gather == 1 else gather, ready=[None] * ready, streams=2,
                          pending_infer=busy, inference=SimpleNamespace(gather=gather))
    assert _Run._share(run) == min(share, run.handoff)  # type: ignore[arg-type]


class _ConcurrencyProbe(WrappedBackend):
    """Wraps a real backend; slow, and records how many batches it ran at once."""

    def __init__(self, inner: object, streams: int) -> None:
        super().__init__(inner, streams)
        self.running = self.most = 0
        self.lock = threading.Condition()

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.lock.notify_all()
            # Held until `streams` batches have run at once (on a loaded machine the next batch may take a
            # while to decode), or for long enough to tell that they never will.
            self.lock.wait_for(lambda: self.most >= self._streams, timeout=30)
        time.sleep(0.15)  # slow work, so that more batches than `streams` would be seen running together
        with self.lock:
            self.running -= 1
        return self.inner.infer(batch)  # type: ignore[no-any-return]


@pytest.mark.parametrize("streams", [1, 2])
def test_streams_run_batches_at_once(tiny_model: tuple[Path, Path], tmp_path: Path, streams: int) -> None:
    paths = []
    for i in range(24):
        paths.append(str(tmp_path / f"{i}.png"))
        Path(paths[-1]).write_bytes(image_bytes(COLORS[i % 6], size=(200 + i, 210), fmt="PNG"))
    probe = _ConcurrencyProbe(Engine.load(str(tiny_model[0]), tiny_model[1]).backend, streams)
    engine = Engine(Engine.load(str(tiny_model[0]), tiny_model[1]).spec, probe, max_batch=4)
    with Recognizer(engine=engine, options=RecognizeOptions(cache=False, decoders=0, batch_size=4)) as rec:
        records = list(rec.recognize(paths))
        singles = [rec.recognize_one(p) for p in paths]
    assert probe.most == streams
    assert [r.input for r in records] == paths
    assert [r.predictions[0].index for r in records] == [r.predictions[0].index for r in singles]


def test_expand_folder_glob_and_stdin(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ["a.JPG", "b.png", "sub/c.WebP", "sub/deeper/d.jpeg", "notes.txt", "sub/e.tif"]:
        (tmp_path / name).write_bytes(b"x")
    walked = [i.input for i in expand([str(tmp_path)])]
    assert [Path(p).relative_to(tmp_path).as_posix() for p in walked] == [
        "a.JPG", "b.png", "sub/c.WebP", "sub/e.tif", "sub/deeper/d.jpeg",
    ]
    globbed = [i.input for i in expand([str(tmp_path / "**" / "*.jp*g")])]
    assert sorted(Path(p).name for p in globbed) == ["a.JPG", "d.jpeg"] or sorted(
        Path(p).name for p in globbed
    ) == ["d.jpeg"]
    import io

    stdin = io.StringIO(f"{tmp_path / 'b.png'}\n\n{tmp_path / 'notes.txt'}\n")
    assert [i.input for i in expand(["-"], stdin=stdin)] == [str(tmp_path / "b.png"), str(tmp_path / "notes.txt")]
    empty = tmp_path / "empty"
    empty.mkdir()
    (item,) = list(expand([str(empty)]))
    assert item.kind == "missing" and "no image" in item.error
    (nomatch,) = list(expand([str(tmp_path / "*.nothing")]))
    assert nomatch.kind == "missing"


class _Handler(http.server.BaseHTTPRequestHandler):
    images: ClassVar[dict[str, bytes]] = {}
    release: ClassVar[threading.Event] = threading.Event()  # /slow.jpg answers only once the test is over

    def do_GET(self) -> None:
        if self.path == "/slow.jpg":
            self.release.wait(120)
        body = self.images.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_images() -> Iterator[str]:
    _Handler.images = {
        "/red.jpg": image_bytes((230, 20, 20)),
        "/big.png": b"\x89PNG\r\n\x1a\n" + bytes(300_000),
        "/slow.jpg": image_bytes(),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Handler.release = threading.Event()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _Handler.release.set()
    server.shutdown()
    server.server_close()


def test_urls(tiny_model: tuple[Path, Path], http_images: str) -> None:
    opts = RecognizeOptions(cache=False, decoders=0, max_bytes=200_000, fetch_timeout=5.0, allow_private_urls=True)
    urls = [f"{http_images}/red.jpg", f"{http_images}/missing.jpg", f"{http_images}/big.png",
            f"{http_images}/slow.jpg", "http://127.0.0.1:9/refused.jpg"]
    with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=opts) as rec:
        records = {r.input: r for r in rec.recognize(urls)}
    assert records[urls[0]].ok and records[urls[0]].width == 320
    types = {u: (r.error.type if r.error else "ok") for u, r in records.items()}
    assert types == {urls[0]: "ok", urls[1]: "not_found", urls[2]: "too_large", urls[3]: "fetch_error",
                     urls[4]: "fetch_error"}


def test_bytes_items(tiny_model: tuple[Path, Path]) -> None:
    with _recognizer(tiny_model, decoders=0) as rec:
        a, b = rec.recognize([InputItem.from_bytes("up1", image_bytes()), InputItem.from_bytes("up2", b"x")])
    assert a.ok and a.input == "up1"
    assert b.error is not None and b.error.type == "unsupported"


@pytest.mark.shared
@pytest.mark.slow
def test_real_photos_accuracy_and_reference_agreement(mobilenet: tuple[Path, Path], photos: Path) -> None:
    import csv

    data = photos.parent
    with open(data / "labels.csv", encoding="utf-8") as f:
        truth = {r["file"]: int(r["class_index"]) for r in csv.DictReader(f)}
    with open(data / "reference_predictions_mobilenetv2-12-int8.csv", encoding="utf-8") as f:
        ref = {r["file"]: int(r["top1_index"]) for r in csv.DictReader(f)}
    with _recognizer(mobilenet, batch_size=32) as rec:
        records = list(rec.recognize([str(photos)]))
    assert len(records) == 1000 and all(r.ok for r in records)
    key = {r.input: f"imagenet-sample-images/{Path(r.input).name}" for r in records}
    top1 = {key[r.input]: r.predictions[0].index for r in records}
    accuracy = sum(top1[f] == truth[f] for f in top1) / len(top1)
    agreement = sum(top1[f] == ref[f] for f in top1) / len(top1)
    assert accuracy >= 0.825, accuracy
    assert agreement >= 0.99, agreement
    tench = next(r for r in records if r.input.endswith("n01440764_tench.JPEG"))
    assert tench.predictions[0].label == "丁鲷" and tench.predictions[0].score > 0.8


def test_a_thread_decode_given_up_at_its_deadline_no_longer_counts_as_decoding(
    tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With -j 0 a stuck decoder's thread cannot be stopped; once its run gives up on it, the recognizer no
    longer says images are being decoded (the service's batcher would otherwise wait out its delay for good)."""
    from wanwu.run import _Run

    release = threading.Event()

    def decode(datas: list[bytes], *args: Any) -> list[Any]:
        if datas[0].startswith(b"HANG"):
            release.wait(timeout=120)  # stuck until the test ends
        return decode_jobs(datas, *args)

    monkeypatch.setattr(_Run, "decode", staticmethod(decode))
    with _recognizer(tiny_model, decoders=0, decode_timeout=3.0) as rec:  # the fine file: well within it
        try:
            stuck, fine = rec.recognize([InputItem.from_bytes("stuck", b"HANG" + image_bytes()),
                                         InputItem.from_bytes("fine", image_bytes((20, 230, 20)))])
            assert stuck.error is not None and stuck.error.type == "decode_error" and fine.ok
            assert not rec.decoding()
        finally:
            release.set()


def test_a_decode_process_runs_one_blas_thread_whatever_its_parent_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode processes do no linear algebra: their numpy gets one OpenBLAS thread (a thread per core costs each
    process about 0.05 s of CPU when numpy is imported), even where the parent runs more."""
    from wanwu.decoders import DecodeProcess

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "8")  # the forkserver inherits it, if this test starts it
    process = DecodeProcess()
    try:
        assert process.call(os.getenv, "OPENBLAS_NUM_THREADS", timeout=60) == "1"
    finally:
        process.close()


def test_a_decode_process_answers_after_a_crash_a_hang_and_an_exception() -> None:
    """DecodeProcess (the Ray stage's decoder): each failure costs only its own call."""
    from tests.ray_support import hostile_decode
    from wanwu.decoders import DecodeProcess, DecoderDiedError, DecodeTimeoutError
    from wanwu.imaging import DecodeOptions, Prepared
    from wanwu.spec import PreprocessSpec

    photo = image_bytes(size=(320, 240))
    args = (PreprocessSpec(), DecodeOptions())
    process = DecodeProcess()
    try:
        first = process.call(hostile_decode, photo, *args, timeout=30)
        assert isinstance(first, Prepared) and first.pixels.shape == (224, 224, 3)
        with pytest.raises(DecoderDiedError):
            process.call(hostile_decode, b"CRASH" + photo, *args, timeout=30)
        start = time.monotonic()
        with pytest.raises(DecodeTimeoutError):
            process.call(hostile_decode, b"HANG" + photo, *args, timeout=1)
        assert time.monotonic() - start < 30  # its deadline, not the hang (which is endless)
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            process.call(divmod, 1, 0, timeout=30)
        again = process.call(hostile_decode, photo, *args, timeout=30)
        assert np.array_equal(again.pixels, first.pixels)
        child = process._process
    finally:
        process.close()
    assert child is not None and not child.is_alive()


def test_decode_processes_fail_only_the_task_that_crashed_and_stop_a_hung_one(tmp_path: Path) -> None:
    """DecodeProcesses: a crash costs its own task, not the ones running beside it; kill() stops a hung task
    and the workers carry on; shutting down never waits for a hung decoder and leaves no process behind."""
    from concurrent.futures import wait

    from tests.hostile_seams import marking_decode
    from tests.ray_support import hostile_decode
    from wanwu.decoders import DecodeProcesses, DecoderDiedError
    from wanwu.imaging import DecodeOptions
    from wanwu.spec import PreprocessSpec

    photos = [image_bytes(color, size=(320 + 16 * i, 240)) for i, color in enumerate(
        [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (120, 60, 160)])]
    args = (PreprocessSpec(), DecodeOptions())
    alone = [hostile_decode(p, *args).pixels for p in photos]
    pool = DecodeProcesses(2)
    children: list[Any] = []
    try:
        futures = [pool.submit(hostile_decode, p, *args) for p in photos[:3]]
        crash = pool.submit(hostile_decode, b"CRASH" + photos[0], *args)
        futures += [pool.submit(hostile_decode, p, *args) for p in photos[3:]]
        wait([*futures, crash], timeout=60)
        assert isinstance(crash.exception(), DecoderDiedError)
        for future, pixels in zip(futures, alone, strict=True):  # every neighbour got its own pixels
            assert np.array_equal(future.result().pixels, pixels)

        marks = tmp_path / "marks"
        hang = pool.submit(marking_decode, [b"HANG:" + str(marks).encode() + b"|"], *args)
        # in its process (killed before that, the task would start in a fresh process and hang for good)
        wait_for(marks.exists, 60, "the hung task to start decoding")
        start = time.monotonic()
        pool.kill()
        assert isinstance(hang.exception(timeout=20), DecoderDiedError)
        assert time.monotonic() - start < 20  # killed, not waited for (it hangs for good)
        after = [pool.submit(hostile_decode, p, *args) for p in photos[:2]]  # fresh processes take over
        assert all(np.array_equal(f.result(timeout=60).pixels, px) for f, px in zip(after, alone, strict=False))

        stuck = pool.submit(hostile_decode, b"HANG" + photos[2], *args)
        # taken by a process's thread: shutting down can no longer cancel it
        wait_for(stuck.running, 60, "the hung task to start")
        children = [p._process for p in pool._processes if p._process is not None]
    finally:
        start = time.monotonic()
        pool.shutdown(wait=True, cancel_futures=True)
        assert time.monotonic() - start < 20  # the hung decoder was killed, not waited for
    assert isinstance(stuck.exception(timeout=20), DecoderDiedError)
    assert children and not any(child.is_alive() for child in children)


def test_a_decode_deadline_counts_from_when_its_task_starts_and_stops_only_that_task() -> None:
    from concurrent.futures import wait

    from tests.ray_support import hostile_decode
    from wanwu.decoders import DecodeProcesses, DecodeTimeoutError
    from wanwu.imaging import DecodeOptions
    from wanwu.spec import PreprocessSpec

    photo = image_bytes((40, 120, 200), size=(320, 240))
    args = (PreprocessSpec(), DecodeOptions())
    expected = hostile_decode(photo, *args).pixels
    pool = DecodeProcesses(1)
    try:
        # each takes 2 s, with 5 s allowed (3 s to spare on a loaded machine); counted from submission instead
        # of from its start, the third (6 s after it was queued) would time out
        slow = [pool.submit_within(5.0, hostile_decode, b"SLOW" + photo, *args) for _ in range(3)]
        wait(slow, timeout=60)
        assert all(np.array_equal(f.result().pixels, expected) for f in slow)
        hang = pool.submit_within(1.0, hostile_decode, b"HANG" + photo, *args)
        after = pool.submit_within(30.0, hostile_decode, photo, *args)  # queued behind the hung one
        assert isinstance(hang.exception(timeout=15), DecodeTimeoutError)
        assert np.array_equal(after.result(timeout=60).pixels, expected)  # a fresh process took it
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def test_a_recognizer_works_out_its_cache_namespace_once_and_a_view_of_another_model_its_own(
    tiny_model: tuple[Path, Path]
) -> None:
    options = RecognizeOptions(cache=False, decoders=0)
    with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=options) as rec:
        own = rec.cache_namespace()
        assert own == options.cache_namespace(rec.spec, rec.numerics)
        assert rec.cache_namespace() is own  # once, not per run (a service runs one per request)
        # another model (here: the same network with other preprocessing), run through this recognizer's pools
        preprocess = rec.spec.preprocess
        spec = replace(rec.spec, preprocess=replace(preprocess, resize_short=preprocess.crop_size + 8))
        view = rec.sharing(Engine(spec, rec.engine.backend, 4), rec.inference)
        assert view.cache_namespace() == options.cache_namespace(spec, rec.numerics) != own
        assert rec.cache_namespace() == own
