"""Whether an ONNX model computes on int8 activations, read from its file without ``onnx`` or numpy.

:func:`wanwu.models.resolve_model` asks, to settle the JPEG scale rule (see
:attr:`wanwu.spec.PreprocessSpec.jpeg_eighth_scale`), on the way to a one-photo run: so no import here costs
more than the scan.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path

QOPS = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool"}  # the QOperator format's core
# Operators that compute on quantized activations: QOperator and QDQ formats, dynamic quantization. A
# DequantizeLinear alone (weights kept in int8, computed in float) is not one of them.
ACTIVATION_INT8_OPS = (
    *sorted(QOPS), "QLinearMul", "QLinearAveragePool", "QLinearConcat", "QLinearLeakyRelu", "QLinearSigmoid",
    "QLinearSoftmax", "QLinearReduceMean", "QuantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
    "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QAttention",
)
# A node's op_type in the file: NodeProto field 4, length-delimited (tag 0x22), then the name's length and bytes.
_INT8_NODE = re.compile(b"|".join(re.escape(bytes([0x22, len(op)]) + op.encode()) for op in ACTIVATION_INT8_OPS))


def quantizes_activations(path: Path, fingerprint: str = "") -> bool:
    """Whether the ONNX model at ``path`` computes on int8 activations (a node of :data:`ACTIVATION_INT8_OPS`).

    The file is scanned for such a node's op_type as protobuf writes it, without importing or parsing ``onnx``
    (nodes come before the weights in the file, so a quantized model is told at once), and the answer is kept
    under ``$WANWU_HOME/int8`` by the weights' ``fingerprint``: a float model's file is read once, not per run.
    An unreadable or empty file counts as float (loading it reports what is wrong)."""
    memo = None
    if fingerprint:
        from wanwu.paths import wanwu_home

        memo = wanwu_home() / "int8" / f"{fingerprint}.activations"
        try:
            return memo.read_text(encoding="ascii").strip() == "int8"
        except OSError:
            pass
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found = _INT8_NODE.search(data) is not None
    except (OSError, ValueError):
        return False
    if memo is not None:
        from wanwu.paths import keep

        keep(memo, "int8\n" if found else "float\n")  # or, in an unwritable home, scan again next time
    return found
