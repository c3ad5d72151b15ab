"""Hostile inputs, kills and failed starts: nothing hangs, nothing balloons, nothing is left behind."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.helpers import image_bytes, wait_for, with_corrupt_exif
from tests.servers import descendants
from wanwu import RecognizeOptions, Recognizer
from wanwu.cache import CachedResult
from wanwu.cache.sqlite import SqliteCache, decode_top
from wanwu.errors import UsageError
from wanwu.imaging import DecodeOptions, decode_jobs, prepare
from wanwu.records import top_scores
from wanwu.spec import PreprocessSpec, file_fingerprint

Model = tuple[Path, Path]
ROOT = Path(__file__).resolve().parents[1]
SPEC = PreprocessSpec()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _wanwu(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wanwu", *args], capture_output=True, text=True, env=_env(),
                          timeout=180, **kw)


# --- a 320-byte PNG must not cost 16 GB ----------------------------------------------------------------------


def test_thin_images_cost_what_their_crop_costs(tmp_path: Path) -> None:
    """1x60000 and 60000x2 strips: decoded in a child limited to 1.5 GB of address space. Resizing the whole
    strip to a short side of 256 would need 11.8 GB (and 65 s) and fail there."""
    thin, wide = tmp_path / "thin.png", tmp_path / "wide.png"
    thin.write_bytes(_png(Image.new("RGB", (1, 60000), (200, 30, 30))))
    wide.write_bytes(_png(Image.new("RGB", (60000, 2), (20, 30, 200))))
    assert thin.stat().st_size < 1000
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
        from wanwu.imaging import prepare
        from wanwu.spec import PreprocessSpec
        for path in {[str(thin), str(wide)]!r}:
            out = prepare(open(path, "rb").read(), PreprocessSpec())
            assert out.pixels.shape == (224, 224, 3), out.pixels.shape
            print(out.width, out.height, int(out.pixels[..., 0].mean()), int(out.pixels[..., 2].mean()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["1 60000 200 30", "60000 2 20 200"]


@pytest.mark.shared
@pytest.mark.slow
def test_the_crop_window_path_agrees_with_resize_then_crop(photos: Path) -> None:
    """A strip cut from a real photo, just past the size where only the crop's window is resampled: the
    result matches the plain resize-then-crop within a level (so the window is the right one)."""
    photo = Image.open(sorted(photos.iterdir())[3]).convert("RGB")
    strip = photo.resize((16, 16 * 1200)).crop((0, 0, 16, 16 * 1200))  # 1:1200, resized: 256 x 4.9M
    fast = prepare(_png(strip), SPEC).pixels.astype(int)
    height = int(256 * strip.height / strip.width)
    full = np.asarray(strip.resize((256, height), Image.Resampling.BILINEAR), dtype=int)
    top = round((height - 224) / 2.0)
    reference = full[top : top + 224, 16 : 16 + 224]
    assert np.abs(fast - reference).max() <= 2
    assert np.abs(fast - reference).mean() < 0.5


# --- a decoder that never returns ------------------------------------------------------------------------------


_RELEASE_HUNG_THREADS = threading.Event()


def sleepy_decode(datas: list[bytes], spec: Any, options: Any) -> Any:
    """Decodes like wanwu, except that a file starting with SLEEP hangs (as a looping decoder would)."""
    if any(d.startswith(b"SLEEP") for d in datas):
        import multiprocessing

        # a worker process hangs for good (it is killed); a thread, which cannot be, hangs until the test is over
        if multiprocessing.current_process().name != "MainProcess":
            time.sleep(3600)
        _RELEASE_HUNG_THREADS.wait(600)
    return decode_jobs(datas, spec, options)


@pytest.mark.shared
@pytest.mark.parametrize("workers", [2, 0])
def test_a_hung_decoder_times_out_and_costs_only_its_file(
    mobilenet: Model, photos: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    monkeypatch.setattr("wanwu.pipeline._Run.decode", staticmethod(sleepy_decode))
    chosen = sorted(photos.iterdir())[100:112]
    inputs: list[Any] = [str(p) for p in chosen]
    from wanwu.sources import InputItem

    inputs.insert(5, InputItem.from_bytes("hang.jpg", b"SLEEP" + chosen[0].read_bytes()))
    # A deadline far above a photo's decoding (tens of ms), so that a loaded machine never trips it by accident.
    options = RecognizeOptions(cache=False, decoders=workers, decode_timeout=5.0, batch_size=4)
    _RELEASE_HUNG_THREADS.clear()
    start = time.monotonic()
    try:
        with Recognizer(str(mobilenet[0]), labels=mobilenet[1], options=options) as rec:
            records = list(rec.recognize(inputs))
            elapsed = time.monotonic() - start
            _RELEASE_HUNG_THREADS.set()  # the abandoned thread may end now (closing waits for idle threads)
            alone = {str(p): rec.recognize_one(str(p)) for p in chosen}
    finally:
        _RELEASE_HUNG_THREADS.set()
    assert elapsed < 120  # the hung decoder held the run for its deadline, not for its hour
    assert [r.input for r in records] == [i if isinstance(i, str) else i.input for i in inputs]
    hung = records[5]
    assert hung.error is not None and hung.error.type == "decode_error" and "took longer" in hung.error.message
    for r in records[:5] + records[6:]:
        assert r.ok and r.predictions == alone[r.input].predictions


# --- processes left behind ---------------------------------------------------------------------------------------


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.shared
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_mid_run_leaves_no_process(mobilenet: Model, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wanwu", "recognize", str(photos), "--model", str(mobilenet[0]), "--labels",
         str(mobilenet[1]), "--no-cache", "-j", "2", "-q", "-o", str(out)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 5000):
        time.sleep(0.05)
    family = descendants(proc.pid)
    assert len(family) >= 3, "expected the forkserver, its decode workers and the resource tracker"
    proc.kill()
    proc.wait()
    # the workers look for their owner every 0.5 s; 30 s is a loaded machine's bound
    wait_for(lambda: not _alive(family), 30, "the run's processes to go")


def test_a_model_that_fails_to_load_leaves_the_output_and_no_process(
    tiny_model: Model, tmp_path: Path
) -> None:
    out = tmp_path / "results.jsonl"
    out.write_text('{"input": "yesterday.jpg", "status": "ok", "predictions": []}\n', encoding="utf-8")
    before = out.read_bytes()
    photo = tmp_path / "a.jpg"
    photo.write_bytes(image_bytes())
    proc = subprocess.Popen(
        [sys.executable, "-m", "wanwu", "recognize", str(photo), "--model", str(tmp_path / "typo.onnx"),
         "--labels", str(tiny_model[1]), "--no-cache", "-o", str(out)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _, stderr = proc.communicate(timeout=60)  # returns only once every holder of the pipes is gone
    assert proc.returncode in (1, 2)
    assert out.read_bytes() == before
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "typo.onnx" in lines[0], stderr
    assert "Traceback" not in stderr


# --- the library from a plain script, stdin and a notebook ----------------------------------------------------


SCRIPT = """
from wanwu import Recognizer, RecognizeOptions
with Recognizer({model!r}, labels={labels!r}, options=RecognizeOptions(decoders=2, cache=False)) as rec:
    for record in rec.recognize({inputs!r}):
        print(record.input, record.status, record.error.type if record.error else "")
"""


@pytest.mark.parametrize("how", ["script", "stdin", "exec"])
def test_the_library_works_from_a_script_without_a_main_guard(tiny_model: Model, tmp_path: Path, how: str) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(image_bytes(fmt="PNG"))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    source = SCRIPT.format(model=str(tiny_model[0]), labels=str(tiny_model[1]), inputs=[str(good), str(empty)])
    script = tmp_path / "lib.py"
    script.write_text(source, encoding="utf-8")
    if how == "script":
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(), timeout=120)
    elif how == "stdin":
        proc = subprocess.run([sys.executable, "-"], input=source, capture_output=True, text=True, env=_env(),
                              timeout=120)
    else:  # as a notebook cell runs: exec in a __main__ without a file
        runner = f"exec(compile(open({str(script)!r}).read(), '<cell>', 'exec'))"
        proc = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{good} ok ", f"{empty} error decode_error"]
    assert "RuntimeError" not in proc.stderr and "crashed" not in proc.stdout


# --- stderr stays wanwu's --------------------------------------------------------------------------------------


def test_decoder_warnings_go_to_the_record_and_stderr_stays_quiet(tiny_model: Model, tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "exif.jpg").write_bytes(with_corrupt_exif(image_bytes()))
    # a TIFF read by libtiff (LZW) with an unknown private tag: libtiff prints a warning in C
    image = Image.open(io.BytesIO(image_bytes(size=(64, 48))))
    from PIL import TiffImagePlugin

    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[65000] = "x"
    image.save(folder / "odd.tif", compression="tiff_lzw", tiffinfo=info)
    proc = _wanwu("recognize", str(folder), "--model", str(tiny_model[0]), "--labels", str(tiny_model[1]),
                  "--no-cache", "-j", "1", "-q", "-f", "jsonl")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    records = {Path(r["input"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    assert records["odd.tif"]["status"] == "ok"
    assert any("Corrupt EXIF" in w for w in records["exif.jpg"].get("warnings", [])), records["exif.jpg"]


# --- formats users upload --------------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.parametrize("fmt", ["AVIF", "JPEG2000", pytest.param("HEIF", marks=pytest.mark.extra("heif"))])
def test_formats_users_upload_are_recognized(mobilenet: Model, photos: Path, tmp_path: Path, fmt: str) -> None:
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    originals = sorted(photos.iterdir())[200:203]
    converted = []
    for path in originals:
        target = tmp_path / f"{path.stem}.img"  # named nothing in particular: read by content
        Image.open(path).convert("RGB").save(target, fmt, quality=90)
        converted.append(target)
    with Recognizer(str(mobilenet[0]), labels=mobilenet[1], options=RecognizeOptions(cache=False, decoders=0)) as rec:
        plain = list(rec.recognize([str(p) for p in originals]))
        other = list(rec.recognize([str(p) for p in converted]))
    for a, b in zip(plain, other, strict=True):
        assert b.ok, b.error
        assert a.predictions[0].index in [p.index for p in b.predictions]


def test_exotic_formats_are_off_unless_asked_for(tiny_model: Model, tmp_path: Path) -> None:
    dds = tmp_path / "texture.dds"
    Image.open(io.BytesIO(image_bytes(size=(64, 64)))).convert("RGBA").save(dds, "DDS")
    with pytest.raises(UsageError, match="unknown format"):
        RecognizeOptions(formats=("nosuchformat",))
    results = {}
    for formats in [(), ("dds",)]:
        options = RecognizeOptions(cache=False, decoders=0, formats=formats)
        with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=options) as rec:
            results[formats] = rec.recognize_one(str(dds))
    refused = results[()]
    assert refused.error is not None and refused.error.type == "unsupported"
    assert "DDS" in refused.error.message and "--formats dds" in refused.error.message
    assert results[("dds",)].ok
    assert DecodeOptions.with_formats(1000, ("all",)).formats.count("EPS") == 0


# --- correctness slips ----------------------------------------------------------------------------------------


@pytest.mark.shared
def test_full_decode_is_not_answered_from_a_reduced_decode(tiny_model: Model, photos: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    Image.open(sorted(photos.iterdir())[7]).convert("RGB").resize((2400, 1800)).save(big, quality=92)
    cache = tmp_path / "cache.sqlite3"
    hits = []
    for full in (False, True, True):
        options = RecognizeOptions(decoders=0, cache_path=cache, full_decode=full)
        with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=options) as rec:
            assert rec.recognize_one(str(big)).ok
            hits.append(rec.cache_hits)
    assert hits == [0, 0, 1]


def test_object_store_schemes_say_unsupported(tiny_model: Model) -> None:
    with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=RecognizeOptions(cache=False)) as rec:
        records = list(rec.recognize(["gs://bucket/a.jpg", "ftp://host/b.png"]))
    for r in records:
        assert r.error is not None and r.error.type == "unsupported" and "unsupported scheme" in r.error.message


def test_resume_refuses_a_file_written_with_another_top_k(tiny_model: Model, tmp_path: Path) -> None:
    photo = tmp_path / "a.png"
    photo.write_bytes(image_bytes(fmt="PNG"))
    other = tmp_path / "b.png"
    other.write_bytes(image_bytes((20, 200, 30), fmt="PNG"))
    out = tmp_path / "out.jsonl"
    args = ["--model", str(tiny_model[0]), "--labels", str(tiny_model[1]), "--no-cache", "-j", "0", "-q"]
    assert _wanwu("recognize", str(photo), *args, "-k", "5", "-o", str(out)).returncode == 0
    mixed = _wanwu("recognize", str(photo), str(other), *args, "-k", "1", "--resume", "-o", str(out))
    assert mixed.returncode == 2 and "-k" in mixed.stderr
    assert len(out.read_text().splitlines()) == 1
    same = _wanwu("recognize", str(photo), str(other), *args, "-k", "5", "--resume", "-o", str(out))
    assert same.returncode == 0
    assert [len(json.loads(x)["predictions"]) for x in out.read_text().splitlines()] == [5, 5]
    again = _wanwu("recognize", str(photo), *args, "-o", str(out))
    assert "overwriting" in again.stderr and "--resume" in again.stderr


def test_a_nan_score_is_an_error_record_and_never_cached(tiny_model: Model, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(image_bytes(fmt="PNG"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(image_bytes((10, 240, 10), size=(320, 241), fmt="PNG"))
    options = RecognizeOptions(decoders=0, cache_path=tmp_path / "c.sqlite3", batch_size=2)
    with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=options) as rec:
        backend = rec.engine.backend
        real = backend.infer

        def poisoned(batch: Any) -> Any:
            out = real(batch)
            out[batch[:, 1].mean(axis=(1, 2)) > 1.0] = np.nan  # the green image's row
            return out

        backend.infer = poisoned  # type: ignore[method-assign]
        records = list(rec.recognize([str(good), str(bad)]))
    assert records[0].ok
    assert records[1].error is not None and records[1].error.type == "model_error"
    assert "NaN" not in json.dumps(records[1].to_dict())
    with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=options) as rec:
        again = list(rec.recognize([str(good), str(bad)]))
        assert rec.cache_hits == 1 and again[1].ok  # only the good result was stored


def test_a_damaged_or_locked_cache_costs_a_miss_not_the_cache(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        decode_top(b"\x01\x00")
    path = tmp_path / "c.sqlite3"
    top = top_scores(np.random.default_rng(0).normal(size=(2, 20)).astype(np.float32))
    cache = SqliteCache(path, timeout=0.2)
    cache.put_many("ns", [("a" * 64, CachedResult(top[0], 5, 5)), ("b" * 64, CachedResult(top[1], 5, 5))])
    raw = sqlite3.connect(path)
    raw.execute("UPDATE results SET top = x'01' WHERE key = ?", (bytes.fromhex("a" * 64),))
    raw.commit()
    assert set(cache.get_many("ns", ["a" * 64, "b" * 64])) == {"b" * 64}  # the damaged entry is a miss
    raw.execute("BEGIN EXCLUSIVE")  # another process holds the write lock past our timeout
    cache.put_many("ns", [("c" * 64, CachedResult(top[0], 5, 5))])  # "database is locked": not stored
    assert set(cache.get_many("ns", ["b" * 64, "c" * 64])) == {"b" * 64}
    raw.rollback()
    raw.close()
    cache.put_many("ns", [("c" * 64, CachedResult(top[0], 5, 5))])
    assert set(cache.get_many("ns", ["b" * 64, "c" * 64])) == {"b" * 64, "c" * 64}  # still in use
    cache.close()


def test_fingerprints_are_memoised_under_wanwu_home_not_beside_the_model(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    weights = folder / "m.onnx"
    weights.write_bytes(b"weights v1")
    planted = folder / "m.onnx.sha256"
    first = file_fingerprint(weights)
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx"]  # nothing written beside the user's file
    planted.write_text("0 " + "0" * 64)  # a stale or planted memo beside it is never read
    assert file_fingerprint(weights) == first
    time.sleep(0.01)
    weights.write_bytes(b"weights v2")
    second = file_fingerprint(weights)
    assert second != first
    import hashlib

    assert second == hashlib.sha256(b"weights v2").hexdigest()
