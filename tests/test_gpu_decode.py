"""The GPU JPEG decode path, routed by the orchestrator, tested on a CPU with a stand-in decoder: which files go to
it, that whatever it refuses or fails on still gets its correct record from the decode processes, its own cache
namespace, and that it is off unless asked for."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.helpers import image_bytes
from wanwu import gpudecode
from wanwu.cli.main import main
from wanwu.config import RecognizeOptions
from wanwu.errors import InputError, UsageError
from wanwu.gpudecode import FALLS_BACK, gpu_decodable
from wanwu.imaging import Prepared, prepare
from wanwu.pipeline import Recognizer
from wanwu.records import Record
from wanwu.spec import PreprocessSpec

Model = tuple[Path, Path]
MARK = 1000  # added to the width a marking stand-in reports: a record with it came from the GPU path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _StandIn:
    """A JpegDecoder that decodes with Pillow (so its crops are the CPU path's), noting what it was given, and
    that refuses, fails on or misshapes the files it is told to."""

    name = "stand-in"

    def __init__(self, mark: int = 0, refuse: Sequence[bytes] = (), fail: Sequence[bytes] = (),
                 misshape: Sequence[bytes] = ()) -> None:
        self.mark, self.refuse, self.fail, self.misshape = mark, set(refuse), set(fail), set(misshape)
        self.seen: list[str] = []
        self.batches: list[int] = []
        self._lock = threading.Lock()

    def decode(self, datas: Sequence[bytes], spec: PreprocessSpec) -> list[Prepared | None]:
        with self._lock:
            self.seen.extend(_sha(d) for d in datas)
            self.batches.append(len(datas))
        if self.fail & set(datas):
            raise RuntimeError("nvjpegDecodeBatched: the bitstream is corrupt")  # the whole batch, like nvJPEG
        out: list[Prepared | None] = []
        for data in datas:
            if data in self.refuse:
                out.append(None)
            elif data in self.misshape:
                out.append(Prepared(np.zeros((7, 7, 3), np.uint8), 7, 7))
            else:
                try:
                    p = prepare(data, spec)
                except InputError:  # what nvJPEG fails on alone (NvJpegDecoder answers None for it)
                    out.append(None)
                    continue
                out.append(Prepared(p.pixels, p.width + self.mark, p.height, p.warnings))
        return out


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> dict[str, _StandIn]:
    """Registers ``stand-in`` in JPEG_DECODERS; the dict holds the instance a recognizer made."""
    made: dict[str, _StandIn] = {"next": _StandIn()}

    def factory(device: str) -> _StandIn:
        made["made"] = made["next"]
        return made["next"]

    monkeypatch.setitem(gpudecode.JPEG_DECODERS._entries, "stand-in", factory)
    return made


def _jpeg(image: Image.Image, **save: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **save)
    return out.getvalue()


@pytest.fixture
def mixed(photos: Path, tmp_path: Path) -> list[Path]:
    """Real photos (baseline JPEGs, web size) and files the GPU must not take: a progressive JPEG, a CMYK one,
    a PNG, a large photo (decoded at reduced size on the CPU), a strip, and a truncated JPEG."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    sources = sorted(photos.glob("*.JPEG"))[::97][:10]
    paths = []
    for path in sources:
        paths.append(folder / path.name)
        paths[-1].write_bytes(path.read_bytes())
    image = Image.open(sources[0]).convert("RGB")
    others = {
        "progressive.jpg": _jpeg(image, progressive=True),
        "cmyk.jpg": _jpeg(image.convert("CMYK")),
        "png.png": image_bytes(fmt="PNG"),
        "large.jpg": _jpeg(image.resize((2400, 1800))),
        "strip.jpg": _jpeg(image.resize((6000, 4))),
        "truncated.jpg": sources[1].read_bytes()[:3000],
    }
    for name, data in others.items():
        paths.append(folder / name)
        paths[-1].write_bytes(data)
    return paths


def _run(model: Model, paths: list[Path], **options: Any) -> tuple[list[Record], Recognizer]:
    opts = RecognizeOptions(**{"cache": False, "decoders": 0, "batch_size": 4, **options})
    with Recognizer(str(model[0]), labels=model[1], options=opts) as rec:
        return list(rec.recognize(paths)), rec


def _rows(records: list[Record]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in records]


def test_qualifying_jpegs_go_to_the_gpu_decoder_and_its_crops_make_their_records(
    tiny_model: Model, mixed: list[Path], stand_in: dict[str, _StandIn]
) -> None:
    stand_in["next"] = _StandIn(mark=MARK)
    spec = PreprocessSpec()
    qualifying = {p.name for p in mixed if gpu_decodable(p.read_bytes(), spec, RecognizeOptions().max_pixels)}
    assert len(qualifying) == 11  # the 10 photos and the truncated one (its header is a baseline JPEG's)
    cpu, _ = _run(tiny_model, mixed)
    gpu, _ = _run(tiny_model, mixed, jpeg_decoder="stand-in")
    decoder = stand_in["made"]
    assert sorted(decoder.seen) == sorted(_sha(p.read_bytes()) for p in mixed if p.name in qualifying)
    assert max(decoder.batches) <= 4 and sum(decoder.batches) == 11  # batches of at most --batch-size
    for path, on_cpu, on_gpu in zip(mixed, cpu, gpu, strict=True):
        got, want = on_gpu.to_dict(), on_cpu.to_dict()
        if path.name in qualifying and want["status"] == "ok":
            assert got["width"] == want["width"] + MARK  # the stand-in's crop and size made this record
            got["width"] = want["width"]
        assert got == want, path.name


def test_files_gather_into_batches_while_the_gpu_decoder_is_busy(
    tiny_model: Model, mixed: list[Path], stand_in: dict[str, _StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = mixed[:10]
    routed = threading.Event()
    taken: list[bytes] = []
    takes = gpudecode.GpuDecoding.takes

    def counting(self: gpudecode.GpuDecoding, data: bytes, spec: PreprocessSpec) -> bool:
        taken.append(data)
        if len(taken) == len(photos):
            routed.set()
        return takes(self, data, spec)

    class Busy(_StandIn):
        def decode(self, datas: Sequence[bytes], spec: PreprocessSpec) -> list[Prepared | None]:
            assert routed.wait(60), "the photos were never all routed to the GPU decoder"
            return super().decode(datas, spec)

    monkeypatch.setattr(gpudecode.GpuDecoding, "takes", counting)
    stand_in["next"] = Busy()
    records, _ = _run(tiny_model, photos, jpeg_decoder="stand-in")
    # two batches went at once (one decoding, one waiting, each of what had arrived: usually one file); the rest
    # gathered meanwhile, into batches of --batch-size
    batches = stand_in["made"].batches
    left = len(photos) - batches[0] - batches[1]
    assert sum(batches) == len(photos) and max(batches) <= 4 and batches[2] == min(4, left)
    assert all(r.status == "ok" for r in records)


def test_what_the_gpu_decoder_refuses_or_fails_on_is_decoded_on_the_cpu(
    tiny_model: Model, mixed: list[Path], stand_in: dict[str, _StandIn], caplog: pytest.LogCaptureFixture
) -> None:
    data = [p.read_bytes() for p in mixed]
    truncated = data[-1]
    stand_in["next"] = _StandIn(refuse=[data[0], data[5]], fail=[truncated], misshape=[data[3]])
    cpu, _ = _run(tiny_model, mixed)
    with caplog.at_level("DEBUG", logger="wanwu"):  # batches of one: the failing and the misshaped file apart
        gpu, _ = _run(tiny_model, mixed, jpeg_decoder="stand-in", batch_size=1)
    assert _sha(truncated) in stand_in["made"].seen and _sha(data[3]) in stand_in["made"].seen
    said = [r for r in caplog.records if "decoding the batch on the CPU" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING", "DEBUG"]  # the first said aloud, the next at debug level
    assert "failed on a batch" in caplog.text and "RuntimeError" in caplog.text and "shape (7, 7, 3)" in caplog.text
    assert _rows(gpu) == _rows(cpu)  # every file its record, the same as the CPU path gives
    assert [r.status for r in gpu].count("ok") == len(mixed) - 1
    assert gpu[-1].to_dict()["error"]["type"] == "decode_error"  # the truncated file: the CPU path's verdict


def test_a_gpu_decoder_that_hangs_is_given_up_at_the_decode_timeout_and_its_files_decoded_on_the_cpu(
    tiny_model: Model, mixed: list[Path], stand_in: dict[str, _StandIn], caplog: pytest.LogCaptureFixture
) -> None:
    """A decoder stuck in its driver never answers: at --decode-timeout its batches go to the CPU path, it takes
    no file again, and every file still gets the CPU path's record; the run does not wait for it."""
    release = threading.Event()

    class Hung(_StandIn):
        def decode(self, datas: Sequence[bytes], spec: PreprocessSpec) -> list[Prepared | None]:
            with self._lock:
                self.batches.append(len(datas))
            release.wait(timeout=120)  # stuck until the test ends
            return [None] * len(datas)

    stand_in["next"] = Hung()
    cpu, _ = _run(tiny_model, mixed)
    try:
        with caplog.at_level("WARNING", logger="wanwu"):
            gpu, rec = _run(tiny_model, mixed, jpeg_decoder="stand-in", decode_timeout=1.0)
        assert _rows(gpu) == _rows(cpu)
        assert rec.gpu_decoding is not None and rec.gpu_decoding.stuck
        assert stand_in["made"].batches == [stand_in["made"].batches[0]]  # one batch reached it, and hung
        assert "has not answered a batch in 1 s" in caplog.text
    finally:
        release.set()


def test_the_gpu_decoders_time_counts_against_the_runs_decode_budget(
    tiny_model: Model, mixed: list[Path], stand_in: dict[str, _StandIn]
) -> None:
    """--decode-budget holds on the GPU path too: once a run's batches have taken it, what is left is not decoded
    (the CPU path would be no way round it) and each such file says why."""
    photos = mixed[:10]

    class Slow(_StandIn):
        def decode(self, datas: Sequence[bytes], spec: PreprocessSpec) -> list[Prepared | None]:
            time.sleep(0.6)  # every batch costs more than the whole budget
            return super().decode(datas, spec)

    stand_in["next"] = Slow(mark=MARK)
    records, _ = _run(tiny_model, photos, jpeg_decoder="stand-in", batch_size=2, decode_budget=0.5)
    rows = _rows(records)
    spent = [r for r in rows if r["status"] == "error"]
    assert len(rows) == len(photos) and spent  # at most the two batches in flight when it ran out were decoded
    assert all(r["error"]["type"] == "too_large" and "decode-time budget of 0.5 s" in r["error"]["message"]
               for r in spent)
    decoded = [r for r in rows if r["status"] == "ok"]
    assert decoded and all(r["width"] > MARK for r in decoded)  # by the GPU path: none went round by the CPU
    assert sum(stand_in["made"].batches) == len(decoded)


def test_a_run_with_a_gpu_decoder_has_a_cache_namespace_of_its_own(
    tiny_model: Model, mixed: list[Path], stand_in: dict[str, _StandIn], tmp_path: Path
) -> None:
    photos = mixed[:10]
    cache = tmp_path / "cache.sqlite3"
    _, cpu = _run(tiny_model, photos, cache=True, cache_path=cache)
    assert cpu.cache_hits == 0
    stand_in["next"] = _StandIn()
    records, gpu = _run(tiny_model, photos, cache=True, cache_path=cache, jpeg_decoder="stand-in")
    assert gpu.cache_hits == 0 and len(stand_in["made"].seen) == 10  # the CPU's results were not used ...
    assert all(r.status == "ok" for r in records)
    stand_in["next"] = again = _StandIn()
    _, gpu = _run(tiny_model, photos, cache=True, cache_path=cache, jpeg_decoder="stand-in")
    assert gpu.cache_hits == 10 and again.seen == []  # ... its own were
    _, cpu = _run(tiny_model, photos, cache=True, cache_path=cache)
    assert cpu.cache_hits == 10
    assert gpu.numerics == {**gpu.engine.numerics, "decoder": "stand-in"} and cpu.numerics == cpu.engine.numerics


def test_off_by_default_nothing_changes(
    tiny_model: Model, mixed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    monkeypatch.setitem(gpudecode.JPEG_DECODERS._entries, "nvjpeg", lambda device: made.append(device) or _StandIn())
    assert RecognizeOptions().jpeg_decoder == "cpu"
    records, rec = _run(tiny_model, mixed)
    assert made == [] and rec.gpu_decoding is None and rec.numerics == rec.engine.numerics
    assert [r.status for r in records].count("ok") == len(mixed) - 1


def test_auto_without_a_gpu_says_once_that_it_decodes_on_the_cpu(
    tiny_model: Model, mixed: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # no gpu-decode extra (as here): nvJPEG cannot start
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    opts = RecognizeOptions(cache=False, decoders=0, jpeg_decoder="auto")
    with caplog.at_level("WARNING", logger="wanwu"), Recognizer(str(tiny_model[0]), labels=tiny_model[1],
                                                               options=opts) as rec:
        first = list(rec.recognize(mixed))
        second = list(rec.recognize(mixed[:3]))
    warnings = [r.getMessage() for r in caplog.records if FALLS_BACK in r.getMessage()]
    assert len(warnings) == 1 and "gpu-decode" in warnings[0] and "nvjpeg" in warnings[0]
    assert rec.gpu_decoding is None and rec.numerics == rec.engine.numerics  # CPU pixels: the CPU's namespace
    assert _rows(first) == _rows(_run(tiny_model, mixed)[0]) and all(r.status == "ok" for r in second)


def test_jpeg_decoder_option_on_the_command_line(
    tiny_model: Model, mixed: list[Path], stand_in: dict[str, _StandIn], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UsageError, match="--jpeg-decoder: unknown 'nope'"):
        RecognizeOptions(jpeg_decoder="nope")
    code = main(["recognize", *map(str, mixed[:3]), "--model", str(tiny_model[0]), "--labels", str(tiny_model[1]),
                 "--no-cache", "-j", "0", "-q", "--jpeg-decoder", "stand-in"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(stand_in["made"].seen) == 3 and all(json.loads(line)["status"] == "ok" for line in out.splitlines())
    if importlib.util.find_spec("ray") is not None:  # (without the cluster extra, --runner ray itself fails)
        code = main(["recognize", str(mixed[0]), "--model", str(tiny_model[0]), "--labels", str(tiny_model[1]),
                     "--runner", "ray", "--jpeg-decoder", "auto", "-q"])
        assert code != 0 and "--jpeg-decoder needs --runner local" in capsys.readouterr().err


def test_which_jpegs_stay_on_the_cpu_by_size(photos: Path) -> None:
    image = Image.open(sorted(photos.glob("*.JPEG"))[3]).convert("RGB")
    spec = PreprocessSpec(jpeg_draft_factor=0.0)  # --full-decode: size alone would not keep a photo off the GPU
    assert gpu_decodable(_jpeg(image), spec, max_pixels=image.width * image.height)
    assert not gpu_decodable(_jpeg(image), spec, max_pixels=image.width * image.height - 1)  # too_large on the CPU
    assert not gpu_decodable(_jpeg(image.resize((20000, 8))), spec)  # a strip: the CPU resamples only the crop


@pytest.mark.extra("torch")
def test_nvjpeg_sends_only_the_file_it_fails_on_to_the_cpu(
    photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nvJPEG fails a whole batch for one bad file: the decoder tries each alone, so only that one goes back."""
    import sys
    import types

    import torch

    def decode_jpeg(encoded: list[torch.Tensor], **kw: Any) -> list[torch.Tensor]:
        frames = []
        for tensor in encoded:
            try:
                rgb = np.array(Image.open(io.BytesIO(tensor.numpy().tobytes())).convert("RGB"))
            except OSError as e:
                raise RuntimeError(f"nvjpegDecode failed: {e}") from None
            frames.append(torch.from_numpy(rgb).permute(2, 0, 1))
        return frames

    fake_io = types.ModuleType("torchvision.io")
    fake_io.decode_jpeg = decode_jpeg  # type: ignore[attr-defined]
    fake_io.ImageReadMode = types.SimpleNamespace(RGB=3)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", fake_io)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    decoder = gpudecode.NvJpegDecoder("cuda")
    decoder._device = torch.device("cpu")  # the stand-in decodes on the CPU
    datas = [p.read_bytes() for p in sorted(photos.glob("*.JPEG"))[:4]]
    datas.insert(2, datas[0][:200])
    spec = PreprocessSpec()
    got = decoder.decode(datas, spec)
    assert got[2] is None
    for data, prepared in zip(datas[:2] + datas[3:], got[:2] + got[3:], strict=True):
        assert prepared is not None
        want = prepare(data, spec)
        assert (prepared.width, prepared.height) == (want.width, want.height)
        assert prepared.pixels.shape == want.pixels.shape and prepared.pixels.dtype == np.uint8
        assert np.abs(prepared.pixels.astype(int) - want.pixels.astype(int)).mean() < 1.5
