"""Test helpers: tiny models and awkward images, made on the fly."""

from __future__ import annotations

import io
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # the annotation only: conftest imports these helpers, and needs no service module
    from wanwu.service.batcher import Batcher

TINY_LABELS = ("红", "绿", "蓝", "黑", "白", "黄", "青", "品红", "灰", "橙")


class WrappedBackend:
    """A real backend behind a test's own ``infer`` (slow, poisoned, out of memory, counting): the device and
    closing are the inner backend's, and so are its streams unless ``streams`` says otherwise."""

    def __init__(self, inner: Any, streams: int | None = None) -> None:
        self.inner, self._streams = inner, streams

    @property
    def device(self) -> str:
        return str(self.inner.device)

    @property
    def streams(self) -> int:
        return int(self.inner.streams if self._streams is None else self._streams)

    def infer(self, batch: Any) -> Any:
        return self.inner.infer(batch)

    def close(self) -> None:
        self.inner.close()


def save_onnx(path: Path, nodes: list[Any], initializers: list[Any], num_classes: int) -> Path:
    """An opset-13 graph from ``input`` (float, [batch, 3, 224, 224]) to ``output`` ([batch, num_classes]),
    saved at ``path``."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def make_tiny_onnx(folder: Path, num_classes: int = 10) -> tuple[Path, Path]:
    """An ONNX model: global average pool of the 3 input channels -> fixed linear layer -> logits.

    Deterministic, tiny and fast; its top class depends on the image's mean colour, so tests can check
    that each record carries its own image's answer.
    """
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3, num_classes)).astype(np.float32) * 4
    bias = rng.normal(size=(num_classes,)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["output"]),
    ]
    initializers = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")]
    path = save_onnx(folder / "tiny.onnx", nodes, initializers, num_classes)
    labels = folder / "tiny_labels.txt"
    labels.write_text("\n".join(TINY_LABELS[:num_classes]) + "\n", encoding="utf-8")
    return path, labels


def image_bytes(
    color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (320, 240), fmt: str = "JPEG",
    mode: str = "RGB", **save: object,
) -> bytes:
    """A small gradient image in ``color``, encoded as ``fmt``."""
    w, h = size
    ramp = np.linspace(0.6, 1.0, w, dtype=np.float32)[None, :, None]
    arr = (np.asarray(color, dtype=np.float32)[None, None, :] * ramp).repeat(h, axis=0)
    image = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def with_corrupt_exif(jpg: bytes) -> bytes:
    """``jpg`` with an EXIF block that claims 3 entries and holds 4 bytes: Pillow warns "Corrupt EXIF data"."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 3) + b"\x12\x01\x03\x00"
    payload = b"Exif\x00\x00" + tiff
    return jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpg[2:]


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds (a loaded machine's bound, not a race)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen[bytes], timeout: float = 60.0,
                   fail_if_exited: bool = False) -> None:
    """Wait until ``path`` holds ``n`` lines (records) written by ``proc``; return early if ``proc`` exits
    (or fail then, with ``fail_if_exited``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            if fail_if_exited:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before {n} records were written")
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {n} lines in {timeout:g} s")


def waiting_for_company(batcher: Batcher, timeout: float = 60.0) -> None:
    """Until a consumer waits on the batcher's condition with crops in hand (CPython's ``Condition._waiters``)."""
    ready = batcher._ready
    for _ in range(int(timeout / 0.01)):
        with ready:
            if batcher.depth and ready._waiters:  # type: ignore[attr-defined]
                return
        threading.Event().wait(0.01)
    raise AssertionError("no consumer waits for the queued crops")
