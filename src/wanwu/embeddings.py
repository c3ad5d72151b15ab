"""Image embeddings: which tensor of a classifier to take, and how rows are normalised.

A classifier's pooled features (the output of its global-average-pool node, before the final linear layer)
make far better image-to-image embeddings than its logits. :func:`find_pooled_output` finds that tensor from
the graph's structure, whatever its name: a ``GlobalAveragePool``, a ``QLinearGlobalAveragePool`` (int8
models; its uint8 output is dequantized by a node :func:`expose_output` adds), or a ``ReduceMean`` over the
spatial axes (H and W) of a 4-d tensor. When a graph has none, the logits are the embedding, and the backend
says so (:attr:`EmbeddingSource.fallback`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from wanwu.errors import ModelError

log = logging.getLogger("wanwu")
EMBEDDING_OUTPUT = "wanwu_embedding"  # the graph output a rewritten model adds


@dataclass(frozen=True, slots=True)
class EmbeddingSource:
    """Where a model's embeddings come from: ``tensor`` (a graph tensor's name, or ``"logits"``)."""

    tensor: str
    fallback: bool = False  # no pooled features found: the logits stand in

    def describe(self) -> str:
        return "logits (no pooled features found)" if self.fallback else f"pooled features ({self.tensor})"


def normalise(rows: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """[N, ...] -> [N, D] float32 rows of unit length (a zero row stays zero)."""
    x = np.asarray(rows, dtype=np.float32)
    x = x.reshape(x.shape[0], -1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _spatial_mean(node: Any) -> bool:
    """A ReduceMean over axes 2 and 3 (NCHW) or 1 and 2 (NHWC) of a 4-d tensor, as an attribute."""
    for attr in node.attribute:
        if attr.name == "axes":
            axes = set(attr.ints)
            return axes in ({2, 3}, {-2, -1}, {1, 2})
    return False


def find_pooled_output(model: Any) -> tuple[str, Any] | None:
    """The global-pool node's output tensor name and the node, the last such node in the graph; None if
    the graph has none (``model``: an ``onnx.ModelProto``)."""
    found = None
    for node in model.graph.node:
        if node.op_type in ("GlobalAveragePool", "QLinearGlobalAveragePool") or (
            node.op_type == "ReduceMean" and _spatial_mean(node)
        ):
            found = (node.output[0], node)
    return found


def expose_output(model: Any, tensor: str | None) -> tuple[Any, EmbeddingSource]:
    """A copy of ``model`` with the embedding tensor as a second graph output named
    :data:`EMBEDDING_OUTPUT` (float32); ``tensor`` overrides what the graph's structure says."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    node = None
    if tensor is None:
        pooled = find_pooled_output(model)
        if pooled is None:
            log.warning("no global-pool node in this model: its logits serve as embeddings")
            return model, EmbeddingSource("logits", fallback=True)
        tensor, node = pooled
    else:
        producers = {out: n for n in graph.node for out in n.output}
        if tensor not in producers and tensor not in {i.name for i in graph.input}:
            raise ModelError(f"--embedding-output {tensor!r}: the model has no tensor of that name")
        node = producers.get(tensor)
    source = tensor
    if node is not None and node.op_type == "QLinearGlobalAveragePool":
        # uint8 features: dequantize with the node's own output scale and zero point
        graph.node.append(helper.make_node(
            "DequantizeLinear", [tensor, node.input[3], node.input[4]], [EMBEDDING_OUTPUT]
        ))
    else:
        graph.node.append(helper.make_node("Cast", [tensor], [EMBEDDING_OUTPUT], to=TensorProto.FLOAT))
    graph.output.append(helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, None))
    return model, EmbeddingSource(source)
