"""The float twin of a QOperator int8 ONNX classifier: the same weights, dequantized, in float arithmetic.

Every ``QLinear*`` node becomes its float operator on dequantized constants, followed by a ``Clip`` to the range
its uint8/int8 output could hold (that saturation is how the quantized graph applies ReLU6 and friends), and the
input's ``QuantizeLinear`` becomes a ``Clip`` to the range the input could hold. What is left out is exactly the
rounding to the quantization grid. ``bench_scale.py --model float`` uses it to tell what a decode rule costs a
float network (such as the seed ResNeSt-101) from what it costs this int8 test model, whose scores move in
steps of one quantization level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


def float_twin(path: Path) -> bytes:
    """The serialized float twin of the int8 model at ``path`` (its graph's input and output names kept)."""
    model = onnx.load(str(path))
    graph = model.graph
    consts: dict[str, np.ndarray[Any, Any]] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    added: dict[str, np.ndarray[Any, Any]] = {}

    def const(name: str, value: np.ndarray[Any, Any]) -> str:
        added[name] = np.asarray(value, dtype=np.float32)
        return name

    def dequantized(q: str, scale: str, zero: str, channels_first: bool = False) -> np.ndarray[Any, Any]:
        """Per-channel scales apply along a convolution's first axis, and along a matrix's last."""
        s, z = consts[scale].astype(np.float32), consts[zero].astype(np.float32)
        w = consts[q].astype(np.float32)
        if channels_first and s.ndim == 1:
            s = s.reshape(-1, *([1] * (w.ndim - 1)))
            z = z.reshape(-1, *([1] * (w.ndim - 1)))
        return ((w - z) * s).astype(np.float32)

    def clipped(op: onnx.NodeProto, inputs: list[str], out: str, scale: str, zero: str, **attrs: Any) -> None:
        raw = f"{out}__float"
        nodes.append(helper.make_node(op.op_type.replace("QLinear", ""), inputs, [raw], name=op.name, **attrs))
        lo, hi = _RANGES[consts[zero].dtype]
        s, z = float(consts[scale]), float(consts[zero])
        low = const(f"{out}__min", np.array((lo - z) * s))
        high = const(f"{out}__max", np.array((hi - z) * s))
        nodes.append(helper.make_node("Clip", [raw, low, high], [out]))

    for node in graph.node:
        ins, out = list(node.input), node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "QuantizeLinear":
            lo, hi = _RANGES[consts[ins[2]].dtype]
            s, z = float(consts[ins[1]]), float(consts[ins[2]])
            nodes.append(helper.make_node("Clip", [ins[0], const(f"{out}__min", np.array((lo - z) * s)),
                                                   const(f"{out}__max", np.array((hi - z) * s))], [out]))
        elif node.op_type == "DequantizeLinear":
            nodes.append(helper.make_node("Identity", [ins[0]], [out]))
        elif node.op_type == "QLinearConv":
            weight = const(f"{out}__w", dequantized(ins[3], ins[4], ins[5], channels_first=True))
            conv_in = [ins[0], weight]
            if len(ins) > 8:  # int32 bias in units of input scale x weight scale
                bias = consts[ins[8]].astype(np.float32) * consts[ins[1]] * consts[ins[4]].astype(np.float32)
                conv_in.append(const(f"{out}__b", bias))
            clipped(node, conv_in, out, ins[6], ins[7], **attrs)
        elif node.op_type == "QLinearAdd":
            a = ins[0] if ins[0] not in consts else const(f"{out}__a", dequantized(ins[0], ins[1], ins[2]))
            b = ins[3] if ins[3] not in consts else const(f"{out}__b", dequantized(ins[3], ins[4], ins[5]))
            clipped(node, [a, b], out, ins[6], ins[7])
        elif node.op_type == "QLinearMatMul":
            b = ins[3] if ins[3] not in consts else const(f"{out}__b", dequantized(ins[3], ins[4], ins[5]))
            clipped(node, [ins[0], b], out, ins[6], ins[7])
        elif node.op_type == "QLinearGlobalAveragePool":
            clipped(node, [ins[0]], out, ins[3], ins[4])
        elif node.op_type.startswith("QLinear") or node.domain not in ("", "ai.onnx"):
            raise ValueError(f"{path.name}: no float twin for {node.op_type}")
        else:
            nodes.append(node)
    used = {name for node in nodes for name in node.input}
    initializers = [i for i in graph.initializer if i.name in used and i.name not in added]
    initializers += [numpy_helper.from_array(v, k) for k, v in added.items()]
    twin = helper.make_graph(nodes, f"{graph.name}-float", list(graph.input), list(graph.output), initializers)
    out_model = helper.make_model(twin, opset_imports=[helper.make_opsetid("", 12)])
    out_model.ir_version = model.ir_version
    onnx.checker.check_model(out_model)
    return out_model.SerializeToString()
