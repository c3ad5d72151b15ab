"""The JPEG scale rule follows the model: 1/8 for a model that computes on int8 activations, no smaller than 1/4
for a float one (benchmarks/bench_scale.py measured why), settled when the model is resolved."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import save_onnx
from wanwu import RecognizeOptions, quantized
from wanwu.imaging import _resize_crop, _to_rgb, draft_scale, prepare
from wanwu.models import MANIFEST, resolve_model
from wanwu.rules import Context
from wanwu.spec import PreprocessSpec


@pytest.mark.parametrize(("size", "eighth", "quarter"), [
    ((4032, 3024), 8, 4), ((8000, 6000), 8, 4), ((2048, 2048), 8, 4),
    ((2047, 2047), 2, 2), ((640, 480), 1, 1),  # where 1/8 never applies, the rule is the same
])
def test_a_float_models_rule_stops_at_a_quarter(size: tuple[int, int], eighth: int, quarter: int) -> None:
    assert draft_scale(*size, PreprocessSpec(jpeg_eighth_scale=True)) == eighth
    assert draft_scale(*size, PreprocessSpec()) == eighth  # a spec never resolved keeps the 1/8 rule
    assert draft_scale(*size, PreprocessSpec(jpeg_eighth_scale=False)) == quarter
    assert draft_scale(*size, PreprocessSpec(jpeg_eighth_scale=False, jpeg_draft_factor=0)) == 1


def test_the_rule_is_no_part_of_the_cache_namespace() -> None:
    """Reduced scales share results (as the 1/4 and 1/2 rules always have); only a full decode is apart."""
    fingerprints = {PreprocessSpec(jpeg_eighth_scale=v).fingerprint() for v in (None, True, False)}
    assert len(fingerprints) == 1
    assert PreprocessSpec(jpeg_draft_factor=0).fingerprint() not in fingerprints


def _qdq(folder: Path, quantize_activations: bool) -> Path:
    """A pooled-colour classifier in QDQ form: int8 weights through DequantizeLinear; with
    ``quantize_activations`` its input also goes through QuantizeLinear/DequantizeLinear (static int8)."""
    from onnx import helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.arange(9, dtype=np.int8).reshape(3, 3), "Wq"),
        numpy_helper.from_array(np.array(0.05, dtype=np.float32), "s"),
        numpy_helper.from_array(np.array(0, dtype=np.int8), "z"),
        numpy_helper.from_array(np.array(0, dtype=np.uint8), "zu"),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"])]
    source = "input"
    if quantize_activations:
        nodes += [helper.make_node("QuantizeLinear", ["input", "s", "zu"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "s", "zu"], ["x"])]
        source = "x"
    nodes += [helper.make_node("GlobalAveragePool", [source], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
              helper.make_node("MatMul", ["flat", "W"], ["output"])]
    return save_onnx(folder / f"{'qdq' if quantize_activations else 'weights_only'}.onnx", nodes, inits, 3)


def test_models_that_quantize_their_activations_are_told_from_float_ones(
    tmp_path: Path, tiny_model: tuple[Path, Path]
) -> None:
    assert quantized.quantizes_activations(_qdq(tmp_path, quantize_activations=True))
    assert not quantized.quantizes_activations(_qdq(tmp_path, quantize_activations=False))  # int8 weights only
    assert not quantized.quantizes_activations(tiny_model[0])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert not quantized.quantizes_activations(empty)
    named = tmp_path / "named.onnx"  # the words in a node's name or a doc string are not an op_type
    named.write_bytes(b"\x1a\x0eQuantizeLinear" + b"QLinearConv QuantizeLinear")
    assert not quantized.quantizes_activations(named)


@pytest.mark.shared
def test_the_int8_model_keeps_the_eighth_and_a_float_one_stops_at_a_quarter(
    mobilenet: tuple[Path, Path], tiny_model: tuple[Path, Path]
) -> None:
    int8_spec = resolve_model(str(mobilenet[0]), mobilenet[1])
    floating = resolve_model(str(tiny_model[0]), tiny_model[1])
    assert int8_spec.preprocess.jpeg_eighth_scale is True
    assert floating.preprocess.jpeg_eighth_scale is False
    # what the run decodes with, here and in the Ray runner's decode tasks
    assert RecognizeOptions().decode_spec(floating.preprocess).jpeg_eighth_scale is False
    assert Context.of(floating, RecognizeOptions()).preprocess.jpeg_eighth_scale is False
    assert draft_scale(4032, 3024, Context.of(int8_spec, RecognizeOptions()).preprocess) == 8
    # and the cache namespace is the one it was (the rule is not part of it)
    assert floating.cache_namespace() == resolve_model(str(tiny_model[0]), tiny_model[1]).cache_namespace()


@pytest.mark.shared
def test_a_float_model_decodes_a_phone_photo_at_a_quarter(photos: Path, tiny_model: tuple[Path, Path]) -> None:
    buf = io.BytesIO()
    Image.open(sorted(photos.iterdir())[5]).convert("RGB").resize((4032, 3024)).save(buf, "JPEG", quality=90)
    spec = resolve_model(str(tiny_model[0]), tiny_model[1]).preprocess
    got = prepare(buf.getvalue(), spec)
    quarter = Image.open(io.BytesIO(buf.getvalue()))
    quarter.draft("RGB", (1008, 756))
    assert quarter.size == (1008, 756)
    np.testing.assert_array_equal(got.pixels, _resize_crop(_to_rgb(quarter), spec))
    assert not np.array_equal(got.pixels, prepare(buf.getvalue(), PreprocessSpec()).pixels)  # not the 1/8 crop


def test_the_answer_is_remembered_by_the_weights_fingerprint(
    tiny_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qdq = _qdq(tmp_path, quantize_activations=True)
    assert quantized.quantizes_activations(qdq, "f" * 16)
    assert not quantized.quantizes_activations(tiny_model[0], "0" * 16)

    class Unread:
        def search(self, data: object) -> None:
            raise AssertionError("the file was scanned again")

    monkeypatch.setattr(quantized, "_INT8_NODE", Unread())
    assert quantized.quantizes_activations(qdq, "f" * 16)
    assert not quantized.quantizes_activations(tiny_model[0], "0" * 16)


def test_a_manifest_that_names_the_rule_is_obeyed(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    folder = tmp_path / "pinned"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(tiny_model[0].read_bytes())
    (folder / "labels.txt").write_bytes(tiny_model[1].read_bytes())
    manifest = {"format": "wanwu-model/1", "name": "pinned", "backend": "onnx", "weights": "model.onnx",
                "labels": "labels.txt", "preprocess": {"jpeg_eighth_scale": True}}
    (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    assert resolve_model(str(folder)).preprocess.jpeg_eighth_scale is True  # a float model, told to
    del manifest["preprocess"]
    (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    assert resolve_model(str(folder)).preprocess.jpeg_eighth_scale is False
