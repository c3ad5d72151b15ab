"""GPU-facing logic that runs without a GPU: onnxruntime's device and providers, what counts as out of memory,
the engine's batch back-off and regrowth, and an out-of-memory at batch one as the device's error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from tests.helpers import image_bytes
from wanwu.backends import BackendOptions, create_backend, default_cpu_streams, is_out_of_memory, parse_cuda_index
from wanwu.backends import onnx as onnx_backend
from wanwu.config import RecognizeOptions
from wanwu.engine import Engine
from wanwu.errors import DeviceOutOfMemoryError, OutOfMemoryError, UsageError
from wanwu.models import resolve_model
from wanwu.pipeline import Recognizer

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
REAL_SESSION = ort.InferenceSession


class _FakeSession:
    """An InferenceSession that asked for CUDA and got the CPU (what onnxruntime does without cuDNN)."""

    made: ClassVar[list[Any]] = []
    got: ClassVar[list[str]] = [CPU]
    error: ClassVar[str | None] = None

    def __init__(self, model: Any, options: Any, providers: list[Any]) -> None:
        self.providers = providers
        _FakeSession.made.append(self)
        self.real = REAL_SESSION(model, options, providers=[CPU])

    def get_providers(self) -> list[str]:
        return list(self.got)

    def get_inputs(self) -> Any:
        return self.real.get_inputs()

    def get_outputs(self) -> Any:
        return self.real.get_outputs()

    def run(self, names: Any, feed: Any) -> Any:
        if self.error:
            raise RuntimeError(self.error)  # onnxruntime raises its own untyped exceptions
        return self.real.run(names, feed)


@pytest.fixture
def fake_ort(monkeypatch: pytest.MonkeyPatch) -> type[_FakeSession]:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    monkeypatch.setattr(_FakeSession, "made", [])
    monkeypatch.setattr(_FakeSession, "got", [CPU])
    monkeypatch.setattr(_FakeSession, "error", None)
    return _FakeSession


# --- onnxruntime ----------------------------------------------------------------------------------------------


def test_cuda_n_keeps_its_index_with_a_heuristic_algorithm_search() -> None:
    providers = onnx_backend._providers("cuda:1", [CUDA, CPU])
    assert providers == [(CUDA, {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"}), CPU]
    assert onnx_backend._providers("cuda", [CUDA, CPU])[0] == (CUDA, {"device_id": 0,
                                                                      "cudnn_conv_algo_search": "HEURISTIC"})
    assert onnx_backend._providers("auto", [CPU]) == [CPU]
    for bad in ("cuda:x", "cuda1", "tpu"):
        with pytest.raises(UsageError, match="unknown device"):
            onnx_backend._providers(bad, [CUDA, CPU])
    with pytest.raises(UsageError, match="pip uninstall -y onnxruntime onnxruntime-gpu"):
        onnx_backend._providers("cuda:0", [CPU])
    assert [parse_cuda_index(d) for d in ("cuda", "cuda:0", "CUDA:3")] == [None, 0, 3]


def test_a_session_that_fell_back_to_the_cpu_reports_cpu(
    fake_ort: type[_FakeSession], tiny_model: tuple[Path, Path]
) -> None:
    spec = resolve_model(str(tiny_model[0]), tiny_model[1])
    backend = create_backend(spec, BackendOptions(device="cuda:1"))
    (session,) = fake_ort.made
    assert session.providers[0] == (CUDA, {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"})
    assert backend.device == "cpu" and backend.numerics == {}  # type: ignore[attr-defined]
    assert backend.streams == default_cpu_streams()  # sized for the CPU it really runs on

    fake_ort.got = [CUDA, CPU]
    backend = create_backend(spec, BackendOptions(device="cuda:1"))
    assert backend.device == "cuda:1" and backend.streams == 1
    assert backend.numerics == {"device": "cuda", "precision": "fp32"}  # type: ignore[attr-defined]


def test_int8_models_stay_on_the_cpu_provider(fake_ort: type[_FakeSession], mobilenet: tuple[Path, Path]) -> None:
    create_backend(resolve_model(str(mobilenet[0]), mobilenet[1]), BackendOptions(device="cuda"))
    assert [s.providers for s in fake_ort.made] == [[CPU]]


@pytest.mark.parametrize(("message", "oom"), [
    ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer of size 1", True),
    ("BFCArena::AllocateRawInternal Available memory of 0 is smaller than requested bytes of 1", True),
    ("CUDA error cudaErrorIllegalAddress:an illegal memory access was encountered", False),
    ("CUDA failure 700: an illegal memory access was encountered", False),
])
def test_onnx_out_of_memory_versus_a_fault(
    fake_ort: type[_FakeSession], tiny_model: tuple[Path, Path], message: str, oom: bool
) -> None:
    engine = Engine.load(str(tiny_model[0]), tiny_model[1], BackendOptions(device="cuda"), max_batch=4)
    fake_ort.error = message
    crops = [np.zeros((224, 224, 3), np.uint8)] * 4
    with pytest.raises(DeviceOutOfMemoryError if oom else RuntimeError, match="memory"):
        engine.infer(crops)
    assert engine.max_batch == (1 if oom else 4)  # halved down to one, or never retried


@pytest.mark.parametrize(("message", "oom"), [
    ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
    ("CUDA error: out of memory", True),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes", True),
    ("CUDA error: an illegal memory access was encountered", False),
    ("CUDA error: misaligned address", False),
    ("shape mismatch", False),
])
def test_what_counts_as_out_of_memory(message: str, oom: bool) -> None:
    assert is_out_of_memory(RuntimeError(message)) is oom


# --- the engine's batch size -------------------------------------------------------------------------------


class _Fake:
    """A backend whose memory fits ``limit`` images at a time; ``limit`` can change as other work comes and goes."""

    device, streams = "fake", 1

    def __init__(self, limit: int) -> None:
        self.limit, self.sizes, self.rows = limit, [], []  # type: ignore[var-annotated]

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self.sizes.append(len(batch))
        if len(batch) > self.limit:
            raise OutOfMemoryError(f"fake OOM at {len(batch)}")
        self.rows.extend(float(b[0, 0, 0]) for b in batch)
        return np.zeros((len(batch), 10), np.float32)

    def close(self) -> None:
        pass


def _crops(n: int) -> list[npt.NDArray[np.uint8]]:
    return [np.full((224, 224, 3), i % 250, np.uint8) for i in range(n)]


def test_the_batch_grows_back_after_successes(tiny_model: tuple[Path, Path]) -> None:
    spec = resolve_model(str(tiny_model[0]), tiny_model[1])
    fake = _Fake(limit=4)
    engine = Engine(spec, fake, max_batch=16)
    engine.infer(_crops(16))
    assert engine.max_batch == 4  # 16 -> 8 -> 4
    fake.limit = 16  # the other process on the GPU is gone
    fake.sizes.clear()
    engine.infer(_crops(4 * Engine.REGROW_AFTER + 8 * Engine.REGROW_AFTER + 16))
    assert engine.max_batch == 16 and fake.sizes[Engine.REGROW_AFTER] == 8 and fake.sizes[-1] == 16
    assert len(fake.rows) == 16 + 4 * Engine.REGROW_AFTER + 8 * Engine.REGROW_AFTER + 16  # none lost or doubled


def test_a_regrowth_that_fails_again_waits_twice_as_long(tiny_model: tuple[Path, Path]) -> None:
    spec = resolve_model(str(tiny_model[0]), tiny_model[1])
    fake = _Fake(limit=4)
    engine = Engine(spec, fake, max_batch=8)
    wait = Engine.REGROW_AFTER
    engine.infer(_crops(4 * (wait + 2 * wait) + 8))
    tries = [i for i, s in enumerate(fake.sizes) if s == 8]
    # the first batch, a regrowth after `wait` successes, the next after twice as many
    assert tries == [0, 1 + wait, 1 + wait + 1 + 2 * wait]
    assert engine.max_batch == 4 and len(fake.rows) == 4 * 3 * wait + 8


def test_out_of_memory_at_batch_one_is_the_devices_error_not_the_images(
    tiny_model: tuple[Path, Path], tmp_path: Path
) -> None:
    engine = Engine.load(str(tiny_model[0]), tiny_model[1], BackendOptions(), max_batch=4)
    engine.backend = _Fake(limit=0)
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_bytes(image_bytes((40 * i, 80, 120), fmt="PNG"))
    with pytest.raises(DeviceOutOfMemoryError, match="even for a batch of one image"):
        engine.infer(_crops(2))
    with Recognizer(engine=engine, options=RecognizeOptions(cache=False, decoders=0, batch_size=4)) as rec:
        records = list(rec.recognize([str(p) for p in paths]))
    assert [r.error.type if r.error else None for r in records] == ["model_error"] * 3
    assert all(r.error and "out of memory" in r.error.message for r in records)


# --- Ray: a GPU per inference actor ---------------------------------------------------------------------------


class _Recorded:
    """Stands in for a Ray Dataset: records what ``recognize_dataset`` asks of each stage."""

    def __init__(self) -> None:
        self.stages: list[dict[str, Any]] = []

    def map_batches(self, fn: Any, **kwargs: Any) -> _Recorded:
        self.stages.append({"fn": fn, **kwargs})
        return self


@pytest.mark.extra("cluster")
def test_ray_reserves_a_gpu_per_actor_for_auto_on_a_cluster_with_gpus(
    tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from wanwu.ray import dataset

    probed: list[Any] = []
    monkeypatch.setattr(dataset, "planned_numerics",
                        lambda ray, spec, plan, layout: probed.append(plan) or {"device": "cuda", "precision": "fp32"})
    ray.init(num_cpus=1, num_gpus=2, include_dashboard=False, log_to_driver=False)  # GPUs declared, not real
    try:
        assert dataset.cluster_gpus(ray) == 2
        ds = _Recorded()
        options = RecognizeOptions(cache=False, backend=BackendOptions(device="auto"))
        dataset.recognize_dataset(ds, str(tiny_model[0]), labels=tiny_model[1], options=options)
    finally:
        ray.shutdown()
    decode, infer = ds.stages
    assert decode.get("num_gpus") is None and infer["num_gpus"] == 1.0
    assert infer["fn_constructor_kwargs"]["options"].backend.device == "cuda"
    assert infer["fn_constructor_kwargs"]["split"] is False and probed[0].calls_per_actor == 2
    # the decode tasks look up the cache under the actors' numerics, and the actors check they agree
    planned = options.cache_namespace(resolve_model(str(tiny_model[0]), tiny_model[1]),
                                      {"device": "cuda", "precision": "fp32"})
    assert decode["fn_kwargs"]["context"].namespace == infer["fn_constructor_kwargs"]["namespace"] == planned


def test_ray_plans_devices_for_actors() -> None:
    from wanwu.ray.dataset import RayOptions, plan_inference

    def plan(device: str, gpus: float, actor_gpus: float | None = None) -> tuple[float, str, int]:
        options = RecognizeOptions(backend=BackendOptions(device=device))
        p = plan_inference(options, RayOptions(actor_gpus=actor_gpus), gpus)
        return p.gpus, p.options.backend.device, p.calls_per_actor

    assert plan("auto", 2) == (1.0, "cuda", 2)
    assert plan("auto", 0) == (0.0, "cpu", 1)  # Ray would hide the GPUs anyway: say so
    assert plan("cuda:1", 4) == (1.0, "cuda", 2)  # the actor's own GPU, whichever Ray assigned
    assert plan("cpu", 2) == (0.0, "cpu", 1)
    assert plan("cpu", 2, actor_gpus=1) == (1.0, "cpu", 1)
    with pytest.raises(UsageError, match="the Ray cluster has 0"):
        plan("cuda", 0)


# --- GPU JPEG decoding: selection, fallback, namespace ----------------------------------------------------------


class _FakeDecoder:
    name = "fake"

    def decode(self, datas: Any, spec: Any) -> list[Any]:
        return []


def test_jpeg_decoder_selection_and_its_cpu_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys
    import types

    from wanwu import gpudecode
    from wanwu.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "torchvision", None)  # as here: torchvision not installed
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    assert gpudecode.select_jpeg_decoder("cpu", "cuda") is None
    with caplog.at_level("INFO", logger="wanwu"):
        assert gpudecode.select_jpeg_decoder("auto", "cuda:0") is None  # falls back to the CPU ...
    assert "nvjpeg not used" in caplog.text and "gpu-decode" in caplog.text  # ... and says why
    with pytest.raises(MissingExtraError, match=r"\[gpu-decode\]"):  # named explicitly: never a silent fallback
        gpudecode.select_jpeg_decoder("nvjpeg", "cuda")

    pytest.importorskip("torch", reason="the rest needs the torch extra (the fake nvJPEG runs on torch)")
    fake_io = types.ModuleType("torchvision.io")
    fake_io.decode_jpeg = lambda *a, **k: []  # type: ignore[attr-defined]
    fake_io.ImageReadMode = types.SimpleNamespace(RGB=3)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", fake_io)
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="no usable CUDA device"):
        gpudecode.select_jpeg_decoder("nvjpeg", "cuda")

    monkeypatch.setitem(gpudecode.JPEG_DECODERS._entries, "fake", lambda device: _FakeDecoder())
    assert isinstance(gpudecode.select_jpeg_decoder("fake", "cuda"), _FakeDecoder)


def test_a_gpu_decoder_has_its_own_cache_namespace(tiny_model: tuple[Path, Path]) -> None:
    from wanwu.gpudecode import decoder_numerics

    spec = resolve_model(str(tiny_model[0]), tiny_model[1])
    assert decoder_numerics(None) == {}
    assert spec.cache_namespace(decoder_numerics(_FakeDecoder())) != spec.cache_namespace()
    assert spec.cache_namespace(decoder_numerics(None)) == spec.cache_namespace()


def test_which_jpegs_a_gpu_decodes(photos: Path) -> None:
    import io

    from PIL import Image

    from wanwu.gpudecode import gpu_decodable, jpeg_frame
    from wanwu.spec import PreprocessSpec

    spec = PreprocessSpec()
    photo = sorted(photos.glob("*.JPEG"))[7].read_bytes()
    image = Image.open(io.BytesIO(photo)).convert("RGB")

    def saved(img: Image.Image, **kw: Any) -> bytes:
        out = io.BytesIO()
        img.save(out, **kw)
        return out.getvalue()

    frame = jpeg_frame(saved(image, format="JPEG"))
    assert frame is not None and frame[1:] == (*image.size, 3)
    assert gpu_decodable(saved(image, format="JPEG"), spec)
    assert not gpu_decodable(saved(image, format="JPEG", progressive=True), spec)
    assert not gpu_decodable(saved(image.convert("CMYK"), format="JPEG"), spec)
    assert not gpu_decodable(saved(image, format="PNG"), spec)
    assert not gpu_decodable(photo[:2] + b"\xff\xda\x00\x02", spec)
    big = saved(image.resize((2048, 1536)), format="JPEG")
    assert not gpu_decodable(big, spec)  # the CPU decodes it at half scale, cheaper than a full GPU decode
    from dataclasses import replace

    assert gpu_decodable(big, replace(spec, jpeg_draft_factor=0.0))  # --full-decode


@pytest.mark.extra("torch")
def test_device_resize_and_crop_match_the_cpu_paths_geometry(photos: Path) -> None:
    import io

    import torch
    from PIL import Image

    from wanwu.gpudecode import resize_crop
    from wanwu.imaging import prepare
    from wanwu.spec import PreprocessSpec

    spec = PreprocessSpec()
    for path in sorted(photos.glob("*.JPEG"))[::250]:
        data = path.read_bytes()
        rgb = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        got = resize_crop(torch.from_numpy(rgb).permute(2, 0, 1), spec).numpy()
        want = prepare(data, spec).pixels
        assert got.shape == want.shape == (224, 224, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 1.5  # other resampling, same pixels' place


def test_ray_inference_records_out_of_memory_at_batch_one_as_the_devices_error(tiny_model: tuple[Path, Path]) -> None:
    from wanwu.ray.stages import Infer

    spec = resolve_model(str(tiny_model[0]), tiny_model[1])
    infer = Infer(spec, RecognizeOptions(cache=False, batch_size=4))
    infer.engine.backend = _Fake(limit=0)

    def column(values: list[Any]) -> Any:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    crop = np.zeros((224, 224, 3), np.uint8).tobytes()
    batch = {"input": column(["a.jpg", "b.jpg"]), "sha256": column(["1" * 64, "2" * 64]),
             "error_type": column(["", ""]), "error_message": column(["", ""]), "cached": column([b"", b""]),
             "pixels": column([crop, crop]), "warnings": column(["", ""]),
             "width": np.array([300, 300]), "height": np.array([300, 300])}
    out = infer(batch)
    records = [json.loads(line) for line in out["record"]]
    assert [r["error"]["type"] for r in records] == ["model_error", "model_error"]
    assert all("even for a batch of one image" in r["error"]["message"] for r in records)
