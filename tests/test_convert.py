"""``wanwu convert``: a ModelScope PyTorch folder to an ONNX model folder, checked for parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import image_bytes
from tests.seed_helpers import SEED_LABELS, make_modelscope_folder, tiny_network
from wanwu.backends import BackendOptions, create_backend
from wanwu.cli.main import main
from wanwu.convert import ConvertOptions, convert
from wanwu.errors import ModelError, UsageError
from wanwu.models import MANIFEST, resolve_model
from wanwu.spec import PreprocessSpec

pytestmark = [pytest.mark.slow]  # each conversion checks ONNX Runtime against PyTorch: tens of seconds


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_modelscope_folder(tmp_path_factory.mktemp("src") / "cv_tiny", seed=3)


@pytest.fixture(scope="module")
def converted(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dst") / "tiny-onnx"
    convert(ConvertOptions(model=str(source), output=out))
    return out


def test_converted_folder_loads_as_onnx_with_the_same_preprocessing(converted: Path) -> None:
    assert sorted(p.name for p in converted.iterdir() if not p.name.endswith(".sha256")) == [
        "labels.txt", "model.onnx", MANIFEST,
    ]
    manifest = json.loads((converted / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["backend"] == "onnx" and manifest["parity_max_abs_diff"] <= 1e-3
    assert "jpeg_eighth_scale" not in manifest["preprocess"]  # left to the weights: a float graph, the 1/4 rule
    spec = resolve_model(str(converted))
    assert spec.backend == "onnx" and spec.labels == SEED_LABELS
    assert spec.preprocess == PreprocessSpec(jpeg_eighth_scale=False)
    assert not list(converted.parent.glob(".tiny-onnx.*"))  # the work folder was moved, not left behind


def test_onnx_and_torch_outputs_agree(converted: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(converted / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    batch = np.random.default_rng(7).normal(size=(5, 3, 224, 224)).astype(np.float32)  # dynamic batch
    (got,) = session.run(["output"], {"input": batch})
    with torch.inference_mode():
        want = tiny_network(seed=3)(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_recognize_top1_matches_between_torch_folder_and_converted_onnx(
    source: Path, converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = []
    for i, color in enumerate([(230, 20, 20), (20, 220, 60), (30, 30, 240), (250, 250, 250), (90, 60, 20)]):
        path = tmp_path / f"p{i}.jpg"
        path.write_bytes(image_bytes(color, size=(280 + 30 * i, 300)))
        images.append(str(path))
    results = {}
    for model in (source, converted):
        rc = main(["recognize", *images, "--model", str(model), "--score", "logit", "-k", "5", "--no-cache",
                   "-j", "0", "-q", "-f", "jsonl", "--device", "cpu"])
        assert rc == 0
        results[model] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for a, b in zip(results[source], results[converted], strict=True):
        assert a["input"] == b["input"]
        assert a["predictions"][0]["index"] == b["predictions"][0]["index"]
        assert a["predictions"][0]["label"] == b["predictions"][0]["label"]
        np.testing.assert_allclose([p["score"] for p in a["predictions"]],
                                   [p["score"] for p in b["predictions"]], atol=1e-4)


def test_fp16_weights_halve_the_file_within_tolerance(source: Path, converted: Path, tmp_path: Path) -> None:
    report = convert(ConvertOptions(model=str(source), output=tmp_path / "half", fp16=True))
    assert report.max_abs_diff <= report.tolerance
    size32 = (converted / "model.onnx").stat().st_size
    assert report.onnx_bytes < 0.6 * size32
    backend = create_backend(report.spec, BackendOptions(device="cpu", threads=1))
    out = backend.infer(np.zeros((2, 3, 224, 224), np.float32))
    assert out.dtype == np.float32 and out.shape == (2, len(SEED_LABELS))


def test_parity_failure_writes_nothing_and_exits_1(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import wanwu.convert as conv

    real = conv.torch_logits
    monkeypatch.setattr(conv, "torch_logits", lambda *a: real(*a) + np.float32(0.01))
    out = tmp_path / "bad"
    assert main(["convert", "--model", str(source), "--output", str(out)]) == 1
    assert "differs from PyTorch by up to 0.01" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".bad.*"))
    # a looser tolerance accepts the same difference
    assert main(["convert", "--model", str(source), "--output", str(out), "--tolerance", "0.02"]) == 0
    assert (out / MANIFEST).is_file()


def test_existing_output_and_onnx_input_are_refused(source: Path, converted: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--force"):
        convert(ConvertOptions(model=str(source), output=converted))
    with pytest.raises(UsageError, match="already a onnx model"):
        convert(ConvertOptions(model=str(converted), output=tmp_path / "again"))
    with pytest.raises(UsageError, match="opset"):
        convert(ConvertOptions(model=str(source), output=tmp_path / "x", opset=9))


def test_convert_refuses_a_mismatched_checkpoint(tmp_path: Path) -> None:
    state = tiny_network().state_dict()
    state["fc.weight"] = state["fc.weight"][:, :100]
    folder = make_modelscope_folder(tmp_path / "bad", state=state)
    with pytest.raises(ModelError, match=r"fc\.weight"):
        convert(ConvertOptions(model=str(folder), output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
