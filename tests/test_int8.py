"""The exact-int8 rewrite: same integer result as a non-saturating machine, whatever this CPU has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from wanwu.backends.int8 import cpu_has_vnni, emulate_qoperator, is_qoperator
from wanwu.backends.onnx import _maybe_exact_int8
from wanwu.paths import wanwu_home
from wanwu.spec import ModelSpec, file_fingerprint

X_SCALE, X_ZERO, Y_SCALE, Y_ZERO = 0.02, 0, 0.5, 128


def _qconv_model(weights: npt.NDArray[np.int8], w_scale: npt.NDArray[np.float32],
                 bias: npt.NDArray[np.int32], w_zero: npt.NDArray[np.int8] | None = None) -> onnx.ModelProto:
    out_ch, in_ch = weights.shape[:2]
    inits = [
        numpy_helper.from_array(np.array(X_SCALE, np.float32), "xs"),
        numpy_helper.from_array(np.array(X_ZERO, np.uint8), "xz"),
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(w_scale, "ws"),
        numpy_helper.from_array(np.zeros(out_ch, np.int8) if w_zero is None else w_zero, "wz"),
        numpy_helper.from_array(np.array(Y_SCALE, np.float32), "ys"),
        numpy_helper.from_array(np.array(Y_ZERO, np.uint8), "yz"),
        numpy_helper.from_array(bias, "b"),
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            kernel_shape=[1, 1])
    graph = helper.make_graph(
        [node], "qconv",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, in_ch, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [None, out_ch, 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _exact(x: npt.NDArray[np.uint8], weights: npt.NDArray[np.int8], w_scale: npt.NDArray[np.float32],
           bias: npt.NDArray[np.int32]) -> npt.NDArray[np.uint8]:
    """QLinearConv in plain integer arithmetic: int32 accumulation, float32 multiplier, round half to even."""
    acc = np.einsum("nchw,oc->nohw", x.astype(np.int64) - X_ZERO, weights[:, :, 0, 0].astype(np.int64))
    acc += bias.reshape(1, -1, 1, 1)
    mult = (np.float32(X_SCALE) * w_scale / np.float32(Y_SCALE)).astype(np.float32).reshape(1, -1, 1, 1)
    y = np.rint(acc.astype(np.float32) * mult) + Y_ZERO
    return np.clip(y, 0, 255).astype(np.uint8)


def _run(model: onnx.ModelProto, x: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_rewrite_matches_exact_integer_arithmetic_where_saturation_bites() -> None:
    rng = np.random.default_rng(0)
    in_ch, out_ch = 64, 16
    # bright activations against large weights of one sign: adjacent u8 x s8 product pairs exceed int16
    x = rng.integers(200, 256, size=(2, in_ch, 4, 4), dtype=np.uint8)
    weights = rng.integers(100, 128, size=(out_ch, in_ch, 1, 1)).astype(np.int8)
    weights[::2] *= -1
    w_scale = rng.uniform(5e-4, 1e-3, size=out_ch).astype(np.float32)
    bias = rng.integers(-5000, 5000, size=out_ch).astype(np.int32)
    model = _qconv_model(weights, w_scale, bias)

    rewritten = emulate_qoperator(model)
    expected = _exact(x, weights, w_scale, bias)
    assert len(np.unique(expected)) > 20 and expected.min() > 0 and expected.max() < 255  # nothing clipped
    np.testing.assert_array_equal(_run(rewritten, x), expected)
    if not cpu_has_vnni():  # on this CPU the stock kernels saturate: proof that the test bites
        assert np.any(_run(model, x) != expected)
    # the rewrite shifted the weights to uint8 and dropped the originals
    names = {t.name: t for t in rewritten.graph.initializer}
    assert "w" not in names and numpy_helper.to_array(names["w__wanwu_u8"]).dtype == np.uint8
    assert is_qoperator(rewritten)


def test_asymmetric_weights_are_left_alone() -> None:
    weights = np.ones((4, 8, 1, 1), np.int8)
    model = _qconv_model(weights, np.full(4, 0.01, np.float32), np.zeros(4, np.int32),
                         w_zero=np.full(4, 1, np.int8))
    rewritten = emulate_qoperator(model)
    assert [n.input for n in rewritten.graph.node] == [n.input for n in model.graph.node]


def test_the_rewrite_is_kept_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second load takes the stored rewrite (no onnx parsing), and it computes the same thing."""
    rng = np.random.default_rng(1)
    weights = rng.integers(-127, 128, size=(8, 16, 1, 1)).astype(np.int8)
    model = _qconv_model(weights, np.full(8, 8e-4, np.float32), np.zeros(8, np.int32))
    path = tmp_path / "q.onnx"
    onnx.save(model, path)
    spec = ModelSpec("q", "onnx", path, ("a",), weights_fingerprint=file_fingerprint(path))

    first, exact = _maybe_exact_int8(spec, "exact")
    assert exact and isinstance(first, bytes)
    stored = list((wanwu_home() / "int8").glob("*.onnx"))
    assert len(stored) == 1 and stored[0].read_bytes() == first
    second, exact = _maybe_exact_int8(spec, "exact")
    assert exact and second == str(stored[0])
    x = rng.integers(0, 256, size=(1, 16, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(_run(onnx.load(second), x), _run(onnx.ModelProto.FromString(first), x))

    # a float model is remembered as needing nothing; an unwritable home only costs the caching
    plain = tmp_path / "plain.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "f",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), plain)
    plain_spec = ModelSpec("p", "onnx", plain, ("a",), weights_fingerprint=file_fingerprint(plain))
    assert _maybe_exact_int8(plain_spec, "exact") == (str(plain), False)
    assert list((wanwu_home() / "int8").glob("*.plain"))
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("WANWU_HOME", str(blocker / "home"))  # nothing can be created under a file
    other = tmp_path / "q2.onnx"
    onnx.save(_qconv_model(weights, np.full(8, 9e-4, np.float32), np.zeros(8, np.int32)), other)
    other_spec = ModelSpec("q2", "onnx", other, ("a",), weights_fingerprint=file_fingerprint(other))
    data, exact = _maybe_exact_int8(other_spec, "exact")
    assert exact and isinstance(data, bytes)


def test_a_model_file_replaced_in_place_gets_a_rewrite_of_its_own(tmp_path: Path) -> None:
    """The stored rewrite is keyed by the weights' fingerprint: new weights at the same path never load the old
    rewrite, and the new one computes with the new weights."""
    rng = np.random.default_rng(2)
    path = tmp_path / "q.onnx"
    stored: list[bytes] = []
    x = rng.integers(0, 256, size=(1, 16, 4, 4), dtype=np.uint8)
    for seed in (3, 4):
        weights = np.random.default_rng(seed).integers(-127, 128, size=(8, 16, 1, 1)).astype(np.int8)
        onnx.save(_qconv_model(weights, np.full(8, 8e-4, np.float32), np.zeros(8, np.int32)), path)
        spec = ModelSpec("q", "onnx", path, ("a",), weights_fingerprint=file_fingerprint(path))
        _maybe_exact_int8(spec, "exact")  # stores the rewrite
        again, exact = _maybe_exact_int8(spec, "exact")  # what a later run loads
        assert exact and isinstance(again, str)
        got = _run(onnx.load(again), x)
        np.testing.assert_array_equal(got, _exact(x, weights, np.full(8, 8e-4, np.float32), np.zeros(8, np.int32)))
        stored.append(Path(again).read_bytes())
    assert stored[0] != stored[1] and len(list((wanwu_home() / "int8").glob("*.onnx"))) == 2
