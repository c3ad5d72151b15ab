"""The seed model's network, checkpoint loading, ModelScope folder loader and torch backend."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import image_bytes
from tests.seed_helpers import SEED_LABELS, make_modelscope_folder, model_labels, tiny_network
from wanwu.backends import BackendOptions, create_backend
from wanwu.cli.main import main
from wanwu.engine import Engine
from wanwu.errors import CheckpointMismatchError, MissingExtraError, ModelError, OutOfMemoryError, UsageError
from wanwu.imaging import prepare, to_batch
from wanwu.models import resolve_model
from wanwu.records import TopScores
from wanwu.seed.checkpoint import infer_config, load_resnest
from wanwu.seed.resnest import ANIMAL_CLASSES, GENERAL_CLASSES, ResNeStConfig, RSoftMax, resnest101
from wanwu.spec import PreprocessSpec

BLOCK_KEYS = {
    "conv1.weight", "conv2.conv.weight", "conv2.fc1.weight", "conv2.fc1.bias", "conv2.fc2.weight",
    "conv2.fc2.bias", "conv3.weight",
    *(f"{bn}.{p}" for bn in ("bn1", "conv2.bn0", "conv2.bn1", "bn3")
      for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
}


@pytest.fixture(scope="module")
def full_size() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no 629 MB allocation
        model = resnest101()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["#params"] = (sum(p.numel() for p in model.parameters()),)
    return shapes


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_modelscope_folder(tmp_path_factory.mktemp("ms") / "cv_tiny_general_recognition")


def _images(tmp_path: Path) -> list[Path]:
    colors = [(220, 30, 30), (30, 200, 40), (20, 40, 230), (240, 240, 240), (10, 10, 10)]
    paths = []
    for i, color in enumerate(colors):
        path = tmp_path / f"img{i}.jpg"
        path.write_bytes(image_bytes(color, size=(300 + 40 * i, 260)))
        paths.append(path)
    return paths


def _jsonl(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


# --- the network -------------------------------------------------------------------------------------


def test_full_size_resnest101_matches_the_documented_checkpoint(
    full_size: dict[str, tuple[int, ...]],
) -> None:
    params = full_size.pop("#params")[0]
    assert len(full_size) == 935
    assert params == 157_060_524
    assert full_size["fc.weight"] == (GENERAL_CLASSES, 2048) and full_size["fc.bias"] == (GENERAL_CLASSES,)
    assert 2048 * GENERAL_CLASSES + GENERAL_CLASSES == 110_834_508
    stem = {k for k in full_size if k.startswith("conv1.")}
    assert {k.split(".")[1] for k in stem} == {"0", "1", "3", "4", "6"}
    assert full_size["conv1.0.weight"] == (64, 3, 3, 3) and full_size["conv1.6.weight"] == (128, 64, 3, 3)
    for stage, blocks in zip(range(1, 5), (3, 4, 23, 3), strict=True):
        for b in range(blocks):
            keys = {k[len(f"layer{stage}.{b}.") :] for k in full_size if k.startswith(f"layer{stage}.{b}.")}
            down = {k for k in keys if k.startswith("downsample.")}
            assert keys - down == BLOCK_KEYS
            assert {k.split(".")[1] for k in down} == ({"1", "2"} if b == 0 else set())
        assert f"layer{stage}.{blocks}.conv1.weight" not in full_size
    assert full_size["layer1.0.conv2.conv.weight"] == (128, 32, 3, 3)  # radix 2, groups*radix = 2
    assert full_size["layer1.0.conv2.fc1.weight"] == (32, 64, 1, 1)  # inter = max(64*2//4, 32)
    assert full_size["layer4.2.conv3.weight"] == (2048, 512, 1, 1)


def test_config_is_read_back_from_the_full_size_state_dict() -> None:
    with torch.device("meta"):
        general = resnest101().state_dict()
        animal = resnest101(ANIMAL_CLASSES).state_dict()
    assert infer_config(general) == ResNeStConfig()
    assert infer_config(animal) == ResNeStConfig(num_classes=ANIMAL_CLASSES)


def test_avd_pooling_only_in_the_first_block_of_layers_2_to_4() -> None:
    with torch.device("meta"):
        model = resnest101()
    with_avd = {name for name, m in model.named_modules() if hasattr(m, "avd_layer")}
    assert with_avd == {"layer2.0", "layer3.0", "layer4.0"}


def test_rsoftmax_normalizes_across_the_radix_splits() -> None:
    x = torch.randn(3, 2 * 16, 1, 1)
    att = RSoftMax(radix=2, cardinality=1)(x.view(3, -1)).view(3, 2, 16)
    assert torch.allclose(att.sum(dim=1), torch.ones(3, 16), atol=1e-6)


# --- checkpoints ---------------------------------------------------------------------------------------


def _save(tmp_path: Path, state: object) -> Path:
    path = tmp_path / "pytorch_model.pt"
    torch.save(state, path)
    return path


def test_module_prefix_and_state_dict_wrapper_are_accepted(tmp_path: Path) -> None:
    net = tiny_network()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        want = net(x)
    wrapped = {"state_dict": {"module." + k: v for k, v in net.state_dict().items()}, "epoch": 3}
    inner = {k.replace("conv2.", "conv2.module.", 1): v for k, v in net.state_dict().items()}
    for state in (wrapped, inner):
        model = load_resnest(_save(tmp_path, state), len(SEED_LABELS))
        with torch.inference_mode():
            assert torch.equal(model(x), want)


def test_strict_loading_refuses_a_missing_key(tmp_path: Path) -> None:
    state = tiny_network().state_dict()
    del state["layer2.0.conv2.fc1.bias"]
    with pytest.raises(CheckpointMismatchError) as info:
        load_resnest(_save(tmp_path, state))
    assert info.value.missing == ["layer2.0.conv2.fc1.bias"] and not info.value.mismatched
    assert "layer2.0.conv2.fc1.bias" in str(info.value) and "missing" in str(info.value)


def test_strict_loading_refuses_a_misshaped_and_an_unexpected_key(tmp_path: Path) -> None:
    state = tiny_network().state_dict()
    state["layer3.0.bn3.weight"] = torch.ones(7)
    state["head.extra.weight"] = torch.ones(2)
    with pytest.raises(CheckpointMismatchError) as info:
        load_resnest(_save(tmp_path, state))
    message = str(info.value)
    assert "layer3.0.bn3.weight" in message and "(7,)" in message and "head.extra.weight" in message
    assert info.value.unexpected == ["head.extra.weight"]
    assert [k for k, _, _ in info.value.mismatched] == ["layer3.0.bn3.weight"]


def test_class_count_must_match_the_labels(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"10 classes .* 12 lines"):
        load_resnest(_save(tmp_path, tiny_network().state_dict()), 12)


def test_garbage_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.pt"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        load_resnest(path)
    with pytest.raises(ModelError, match="not a ResNeSt state dict"):
        load_resnest(_save(tmp_path, {"weight": torch.ones(3)}))


# --- the ModelScope folder loader and the torch backend ------------------------------------------------


def test_modelscope_folder_becomes_a_torch_spec(folder: Path) -> None:
    spec = resolve_model(str(folder))
    assert spec.backend == "torch" and spec.weights == folder / "pytorch_model.pt"
    assert spec.labels == SEED_LABELS
    # ModelScope's exact preprocessing; a float network: JPEGs decode at no less than 1/4 (see test_scale_rule)
    assert spec.preprocess == PreprocessSpec(jpeg_eighth_scale=False)
    assert spec.weights_fingerprint == hashlib.sha256(spec.weights.read_bytes()).hexdigest()


def test_animal_sibling_with_label_mapping_loads_through_the_same_code(tmp_path: Path) -> None:
    folder = make_modelscope_folder(tmp_path / "animal", num_classes=23, label_file="label_mapping.txt")
    spec = resolve_model(str(folder))
    assert spec.labels == model_labels(23)
    backend = create_backend(spec, BackendOptions(device="cpu", threads=1))
    assert backend.infer(np.zeros((2, 3, 224, 224), np.float32)).shape == (2, 23)


def test_mismatched_checkpoint_stops_engine_load(tmp_path: Path) -> None:
    state = tiny_network().state_dict()
    del state["fc.bias"]
    folder = make_modelscope_folder(tmp_path / "broken", state=state)
    with pytest.raises(CheckpointMismatchError, match=r"fc\.bias"):
        Engine.load(str(folder), backend_options=BackendOptions(device="cpu"))


def test_torch_backend_returns_the_networks_logits(folder: Path) -> None:
    spec = resolve_model(str(folder))
    backend = create_backend(spec, BackendOptions(device="cpu", threads=1))
    assert backend.device == "cpu"
    batch = np.random.default_rng(1).normal(size=(3, 3, 224, 224)).astype(np.float32)
    out = backend.infer(batch)
    with torch.inference_mode():
        want = tiny_network()(torch.from_numpy(batch)).numpy()
    assert out.dtype == np.float32 and out.shape == (3, 10)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_missing_torch_names_the_extra(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = resolve_model(str(folder))
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'wanwu-vision\[torch\]'"):
        create_backend(spec, BackendOptions(device="cpu"))


@pytest.mark.parametrize(
    ("device", "precision", "message"),
    [("tpu", "auto", "unknown device"), ("cpu", "fp16", "needs a CUDA device"), ("cuda:x", "auto", "cuda")],
)
def test_bad_device_or_precision_is_a_usage_error(
    folder: Path, device: str, precision: str, message: str
) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match=message):
        create_backend(resolve_model(str(folder)), BackendOptions(device=device, precision=precision))


def test_cuda_oom_halves_the_batch_without_losing_or_doubling_images(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine.load(str(folder), backend_options=BackendOptions(device="cpu", threads=1), max_batch=8)
    rng = np.random.default_rng(2)
    crops = [rng.integers(0, 255, size=(224, 224, 3), dtype=np.uint8) for _ in range(7)]
    want = engine.infer(crops)
    network = engine.backend._model  # type: ignore[attr-defined]
    seen: list[int] = []

    def tight(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append(x.shape[0])
        out: torch.Tensor = network(x)
        return out

    monkeypatch.setattr(engine.backend, "_model", tight)
    engine.max_batch = 8
    got = engine.infer(crops)
    assert engine.max_batch <= 2 and sum(seen) == 7 and max(seen) <= 2  # 7 -> 3 -> 1
    assert len(got) == 7
    for a, b in zip(got, want, strict=True):
        assert isinstance(a, TopScores)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-6)


def test_engine_oom_retry_with_a_fake_backend_keeps_every_record_once(folder: Path) -> None:
    spec = resolve_model(str(folder))

    class Fake:
        device = "fake"
        streams = 1

        def __init__(self) -> None:
            self.rows: list[float] = []

        def infer(self, batch: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
            if len(batch) > 3:
                raise OutOfMemoryError("fake OOM")
            self.rows.extend(float(b.mean()) for b in batch)
            out = np.zeros((len(batch), 10), np.float32)
            out[np.arange(len(batch)), [round(float(b.mean()) * 10) % 10 for b in batch]] = 1.0
            return out

        def close(self) -> None:
            pass

    fake = Fake()
    engine = Engine(spec, fake, max_batch=16)
    crops = [np.full((224, 224, 3), 20 * i, np.uint8) for i in range(11)]
    tops = engine.infer(crops)
    assert len(tops) == 11 and len(fake.rows) == 11 and len(set(fake.rows)) == 11
    assert engine.max_batch == 2  # 11 -> 5 -> 2


def test_recognize_cli_with_a_modelscope_folder_and_raw_logits(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path)
    rc = main(["recognize", *map(str, images), "--model", str(folder), "--score", "logit", "-k", "3",
               "--no-cache", "-j", "0", "-q", "--device", "cpu", "-f", "jsonl"])
    assert rc == 0
    records = _jsonl(capsys)
    assert [r["input"] for r in records] == [str(p) for p in images]
    spec = resolve_model(str(folder))
    pixels = [prepare(p.read_bytes(), spec.preprocess, 10**8).pixels for p in images]
    batch = to_batch(pixels, spec.preprocess)
    with torch.inference_mode():
        logits = tiny_network()(torch.from_numpy(batch)).numpy()
    for record, row in zip(records, logits, strict=True):
        preds = record["predictions"]
        assert isinstance(preds, list) and len(preds) == 3
        order = np.argsort(-row)[:3]
        assert [p["index"] for p in preds] == order.tolist()
        assert [p["label"] for p in preds] == [SEED_LABELS[i] for i in order]
        np.testing.assert_allclose([p["score"] for p in preds], row[order], atol=2e-5)


def test_default_model_offline_and_absent_fails_with_a_way_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "no-modelscope-cache"))
    image = tmp_path / "x.jpg"
    image.write_bytes(image_bytes())
    rc = main(["recognize", str(image), "--no-cache", "-j", "0"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "damo/cv_resnest101_general_recognition" in err and "WANWU_OFFLINE" in err
    assert "--model DIR" in err and "modelscope download" in err
