"""The torch backend's device path, tested on a CPU: channels-last and the dtype through every ResNeSt block,
the network cast once with an fp32 head, normalising and ranking on the device, precision and device choice,
out-of-memory handling, and the cache namespace that follows the numerics."""

from __future__ import annotations

import contextlib
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.seed_helpers import make_modelscope_folder, tiny_network
from wanwu.backends import BackendOptions, create_backend
from wanwu.backends import torch as torch_backend
from wanwu.config import RecognizeOptions
from wanwu.engine import Engine
from wanwu.errors import OutOfMemoryError, UsageError
from wanwu.imaging import prepare, to_batch
from wanwu.models import resolve_model
from wanwu.pipeline import Recognizer
from wanwu.records import top_scores
from wanwu.seed.resnest import Bottleneck, RSoftMax, SplAtConv2d


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_modelscope_folder(tmp_path_factory.mktemp("ms") / "cv_tiny_general_recognition")


@pytest.fixture(scope="module")
def crops(folder: Path, photos: Path) -> list[np.ndarray]:  # type: ignore[type-arg]
    spec = resolve_model(str(folder))
    paths = sorted(photos.glob("*.JPEG"))[::125][:8]
    return [prepare(p.read_bytes(), spec.preprocess).pixels for p in paths]


def _record_blocks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, Bottleneck | SplAtConv2d):
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    return seen


# --- the network ----------------------------------------------------------------------------------------------


def test_channels_last_survives_every_block() -> None:
    model = tiny_network().to(memory_format=torch.channels_last)
    seen = _record_blocks(model)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
    assert len(seen) == 8  # 4 blocks and their split-attention convs
    undone = [name for name, out in seen.items() if not out.is_contiguous(memory_format=torch.channels_last)]
    assert undone == []


def test_split_attention_keeps_the_blocks_dtype_when_its_softmax_runs_in_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CUDA autocast runs softmax in fp32; ``att * part`` then turned every block's output into fp32."""
    real = RSoftMax.forward
    monkeypatch.setattr(RSoftMax, "forward", lambda self, x: real(self, x.float()))  # fp32 out, as on CUDA
    model = tiny_network()
    model.cast_body(torch.bfloat16)
    seen = _record_blocks(model)
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16))
    assert {name: out.dtype for name, out in seen.items()} == dict.fromkeys(seen, torch.bfloat16)
    assert logits.dtype == torch.float32 and model.fc.weight.dtype == torch.float32  # the head stays fp32


def test_bf16_autocast_keeps_bf16_through_the_blocks() -> None:
    model = tiny_network()
    seen = _record_blocks(model)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 64, 64))
    assert {out.dtype for out in seen.values()} == {torch.bfloat16}


# --- the device path --------------------------------------------------------------------------------------------


def test_device_path_gives_what_the_cpu_path_gives(folder: Path, crops: list[np.ndarray]) -> None:  # type: ignore[type-arg]
    spec = resolve_model(str(folder))
    backend = create_backend(spec, BackendOptions(device="cpu", threads=1))
    indices, values, lse = backend.infer_top(crops, 5)  # type: ignore[attr-defined]
    want = top_scores(backend.infer(to_batch(crops, spec.preprocess)), 5)
    assert indices.dtype == np.int32 and values.dtype == np.float32 and lse.shape == (len(crops),)
    np.testing.assert_array_equal(indices, [w.indices for w in want])
    np.testing.assert_allclose(values, [w.values for w in want], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, [w.logsumexp for w in want], rtol=1e-5, atol=1e-5)


def test_bf16_casts_the_network_once_and_keeps_the_head_fp32(
    folder: Path, crops: list[np.ndarray],  # type: ignore[type-arg]
) -> None:
    spec = resolve_model(str(folder))
    fp32 = Engine(spec, create_backend(spec, BackendOptions(device="cpu", threads=1)))
    bf16 = Engine(spec, create_backend(spec, BackendOptions(device="cpu", threads=1, precision="bf16")))
    network = bf16.backend._model  # type: ignore[attr-defined]
    assert network.conv1[0].weight.dtype == torch.bfloat16 and network.fc.weight.dtype == torch.float32
    assert bf16.backend._autocast_dtype is None  # type: ignore[attr-defined]  # no per-batch re-cast
    got, want = bf16.infer(crops), fp32.infer(crops)
    assert all(g.values.dtype == np.float32 for g in got)
    assert [g.indices[0] for g in got] == [w.indices[0] for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.values[:3], w.values[:3], atol=0.1)


def test_a_network_without_cast_body_runs_under_autocast(
    folder: Path, monkeypatch: pytest.MonkeyPatch, crops: list[np.ndarray],  # type: ignore[type-arg]
) -> None:
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 10))
    monkeypatch.setattr("wanwu.archs.build_network", lambda spec: plain)
    backend = create_backend(resolve_model(str(folder)), BackendOptions(device="cpu", precision="bf16"))
    assert backend._autocast_dtype == torch.bfloat16  # type: ignore[attr-defined]
    _, values, lse = backend.infer_top(crops[:2], 3)  # type: ignore[attr-defined]
    assert values.dtype == np.float32 and np.isfinite(lse).all()


def test_streams_are_honoured_and_batches_run_at_once(folder: Path, crops: list[np.ndarray]) -> None:  # type: ignore[type-arg]
    spec = resolve_model(str(folder))
    assert create_backend(spec, BackendOptions(device="cpu")).streams == 1
    backend = create_backend(spec, BackendOptions(device="cpu", streams=2))
    assert backend.streams == 2
    inside, both = threading.Barrier(2, timeout=60), []
    network = backend._model  # type: ignore[attr-defined]

    def meeting(x: torch.Tensor) -> torch.Tensor:
        inside.wait()  # returns only when the other batch is inside the network too
        both.append(True)
        out: torch.Tensor = network(x)
        return out

    backend._model = meeting  # type: ignore[attr-defined]
    threads = [threading.Thread(target=backend.infer_top, args=(crops[:2], 5)) for _ in range(2)]  # type: ignore[attr-defined]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert both == [True, True]


def test_closing_a_relabelled_copy_leaves_the_original_working(
    folder: Path, crops: list[np.ndarray],  # type: ignore[type-arg]
) -> None:
    """The service closes a label list's relabelled backend when it is evicted; the shared one must go on."""
    spec = resolve_model(str(folder))
    backend = create_backend(spec, BackendOptions(device="cpu", threads=1))
    backend._model.relabel = lambda spec: backend._model  # type: ignore[attr-defined]  # as a zero-shot head
    backend.relabel(spec).close()  # type: ignore[attr-defined]
    done: list[object] = []
    worker = threading.Thread(target=lambda: done.append(backend.infer_top(crops[:1], 5)), daemon=True)  # type: ignore[attr-defined]
    worker.start()
    worker.join(timeout=120)
    assert done, "the original backend waits for a lane its closed copy took"


def test_bucketed_batch_sizes() -> None:
    sizes = (1, 2, 3, 5, 8, 9, 17, 32, 33, 128)
    assert [torch_backend.bucket(n) for n in sizes] == [1, 2, 4, 8, 8, 16, 24, 32, 40, 128]


# --- device and precision ------------------------------------------------------------------------------------


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int, bf16_native: bool) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        calls.append({"including_emulation": including_emulation})
        return bf16_native or including_emulation  # a T4: bf16 only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return calls


def test_cuda_n_keeps_its_index_and_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, count=2, bf16_native=True)
    assert torch_backend.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UsageError, match="there are 2 CUDA device"):
        torch_backend.resolve_device("cuda:2")
    for bad in ("cuda:x", "cuda:", "cuda1", "gpu"):
        with pytest.raises(UsageError, match="unknown device"):
            torch_backend.resolve_device(bad)


@pytest.mark.parametrize(("native", "want"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_is_bf16_only_where_native(
    monkeypatch: pytest.MonkeyPatch, native: bool, want: torch.dtype
) -> None:
    calls = _fake_cuda(monkeypatch, count=1, bf16_native=native)
    assert torch_backend.resolve_precision("auto", torch.device("cuda", 0)) == want
    assert calls == [{"including_emulation": False}]
    assert torch_backend.resolve_precision("auto", torch.device("cpu")) is None
    assert torch_backend.resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16


# --- out of memory -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", [
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
])
def test_runtime_error_shaped_ooms_back_off(folder: Path, crops: list[np.ndarray], message: str) -> None:  # type: ignore[type-arg]
    engine = Engine.load(str(folder), backend_options=BackendOptions(device="cpu", threads=1), max_batch=8)
    network = engine.backend._model  # type: ignore[attr-defined]
    sizes: list[int] = []

    def tight(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        if x.shape[0] > 2:
            raise RuntimeError(message)
        out: torch.Tensor = network(x)
        return out

    engine.backend._model = tight  # type: ignore[attr-defined]
    assert len(engine.infer(crops)) == len(crops)
    assert engine.max_batch == 2 and sizes[:3] == [8, 4, 2]


def test_illegal_memory_access_is_fatal_not_an_oom(folder: Path, crops: list[np.ndarray]) -> None:  # type: ignore[type-arg]
    engine = Engine.load(str(folder), backend_options=BackendOptions(device="cpu", threads=1), max_batch=8)
    sizes: list[int] = []

    def faulty(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.backend._model = faulty  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.infer(crops)
    assert sizes == [8] and engine.max_batch == 8  # not retried smaller


def test_memory_is_released_after_the_failed_batch_is(folder: Path, crops: list[np.ndarray]) -> None:  # type: ignore[type-arg]
    """empty_cache() inside the ``except`` would run while the traceback still holds the batch's tensors."""
    backend = create_backend(resolve_model(str(folder)), BackendOptions(device="cpu", threads=1))
    held: list[weakref.ref[torch.Tensor]] = []
    freed_at_release: list[bool] = []

    def oom(x: torch.Tensor) -> torch.Tensor:
        activations = x * 2  # what a forward pass holds when it runs out of memory
        held.append(weakref.ref(activations))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    backend._model = oom  # type: ignore[attr-defined]
    backend._release_memory = lambda: freed_at_release.append(held[0]() is None)  # type: ignore[attr-defined]
    with pytest.raises(OutOfMemoryError):
        backend.infer_top(crops[:2], 5)  # type: ignore[attr-defined]
    assert freed_at_release == [True]


# --- the cache namespace follows the numerics ---------------------------------------------------------------


def test_cache_namespace_changes_with_precision(folder: Path, tmp_path: Path, crops: list[np.ndarray]) -> None:  # type: ignore[type-arg]
    spec = resolve_model(str(folder))
    fp32 = create_backend(spec, BackendOptions(device="cpu", threads=1))
    bf16 = create_backend(spec, BackendOptions(device="cpu", threads=1, precision="bf16"))
    options = RecognizeOptions()
    assert options.cache_namespace(spec, Engine(spec, fp32).numerics) == options.cache_namespace(spec)  # as before
    assert options.cache_namespace(spec, Engine(spec, bf16).numerics) != options.cache_namespace(spec)
    assert spec.cache_namespace({"device": "cuda", "precision": "bf16"}) != spec.cache_namespace(
        {"device": "cuda", "precision": "fp16"})

    image = tmp_path / "photo.jpg"
    from PIL import Image

    Image.fromarray(crops[0]).save(image)
    run = RecognizeOptions(cache_path=tmp_path / "cache.sqlite3", decoders=0)
    reached: list[int] = []
    for precision in ("fp32", "bf16", "bf16"):
        engine = Engine.load(str(folder), backend_options=BackendOptions(device="cpu", precision=precision))
        inner = engine.infer
        engine.infer = lambda px, inner=inner: reached.append(len(px)) or inner(px)  # type: ignore[method-assign]
        with Recognizer(engine=engine, options=run) as rec:
            assert [r.ok for r in rec.recognize([str(image)])] == [True]
    assert reached == [1, 1]  # fp32 computed, bf16 computed (not served fp32's entry), bf16 again from the cache
