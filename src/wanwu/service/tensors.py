"""The Open Inference Protocol's wire format for what wanwu takes and answers: pure functions, no server.

* A request is JSON, or (binary tensor extension) a JSON header of ``Inference-Header-Content-Length`` bytes
  followed by the raw tensors in the order of the inputs that say ``"parameters": {"binary_data_size": n}``.
* A ``BYTES`` tensor's raw form is, per element, a 4-byte little-endian length and then the bytes; in JSON an
  element is a string (here: the image's bytes in base64, since JSON strings cannot hold arbitrary bytes).
* A response uses the binary form when the request asked (``binary_data_output`` for all outputs, or
  ``binary_data`` on one requested output); with no ``outputs`` listed, every output is returned.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from wanwu.errors import WanwuError

HEADER_LENGTH = "Inference-Header-Content-Length"


class TensorError(WanwuError):
    """A request the protocol cannot take (the caller's fault: 400)."""


@dataclass
class InferRequest:
    images: list[bytes]
    id: str | None = None
    classification: int | None = None  # top-k as "score:index:label" strings instead of the scores
    binary_output: bool = False


@dataclass
class OutputTensor:
    name: str
    datatype: str  # "FP32" (data: an ndarray) or "BYTES" (data: rows of bytes)
    shape: list[int]
    data: npt.NDArray[np.float32] | list[list[bytes]]

    def raw(self) -> bytes:
        if isinstance(self.data, np.ndarray):
            return np.ascontiguousarray(self.data, dtype="<f4").tobytes()
        return b"".join(struct.pack("<I", len(v)) + v for row in self.data for v in row)

    def json_data(self) -> list[Any]:
        if isinstance(self.data, np.ndarray):
            return [float(v) for v in self.data.reshape(-1)]
        return [v.decode("utf-8", "replace") for row in self.data for v in row]


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        head, rest = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise TensorError(f"{HEADER_LENGTH} must be a byte count within the body, got {header_length!r}")
        n = int(header_length)
        head, rest = body[:n], body[n:]
    try:
        document = json.loads(head)
    except RecursionError:
        raise TensorError("the request header is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise TensorError(f"the request header is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise TensorError("the request header must be a JSON object")
    return document, rest


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TensorError(f"{where} must be an object")
    return value


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
    out: list[bytes] = []
    at = 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise TensorError("a BYTES element's 4-byte length is cut short")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise TensorError(f"BYTES element {len(out)} says {size} bytes; fewer follow")
        out.append(raw[at : at + size])
        at += size
    if len(out) != count:
        raise TensorError(f"the shape says {count} elements; the binary data holds {len(out)}")
    return out


def _json_elements(data: Any, count: int) -> list[bytes]:
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
        data = data[0]  # a [[…]] nesting, as some clients write a [N, 1] tensor
    if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
        raise TensorError("a BYTES tensor's JSON data must be a list of base64 strings")
    if len(data) != count:
        raise TensorError(f"the shape says {count} elements; data holds {len(data)}")
    out = []
    for i, text in enumerate(data):
        try:
            out.append(base64.b64decode("".join(text.split()), validate=True))
        except (binascii.Error, ValueError):
            raise TensorError(f"element {i} is not valid base64 (JSON BYTES elements are base64 images)") from None
    return out


def _count(shape: Any) -> int:
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or (len(shape) == 2 and shape[1] != 1)):
        raise TensorError(f"the image input's shape must be [N] or [N, 1], got {shape!r}")
    return int(shape[0])


def parse_infer_request(body: bytes, header_length: str | None, input_name: str, output_name: str) -> InferRequest:
    """The images and options of an infer request; TensorError says what is wrong with it."""
    document, raw = _split(body, header_length)
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise TensorError(f"the request needs exactly one input, {input_name!r} (BYTES, shape [N])")
    tensor = inputs[0]
    if tensor.get("name") != input_name:
        raise TensorError(f"unknown input {tensor.get('name')!r}; the model takes {input_name!r}")
    if tensor.get("datatype") != "BYTES":
        raise TensorError(f"input {input_name!r} must be BYTES (encoded images), got {tensor.get('datatype')!r}")
    count = _count(tensor.get("shape"))
    size = _object(tensor.get("parameters"), "input parameters").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size != len(raw):
            raise TensorError(f"binary_data_size {size!r} does not match the {len(raw)} bytes after the header")
        images = _bytes_elements(raw, count)
    else:
        if raw:
            raise TensorError("binary data follows the header, but no input says binary_data_size")
        images = _json_elements(tensor.get("data"), count)
    parameters = _object(document.get("parameters"), "parameters")
    request_id = document.get("id")
    request = InferRequest(images, request_id if isinstance(request_id, str) else None,
                           binary_output=parameters.get("binary_data_output") is True)
    _requested_outputs(document.get("outputs"), output_name, request)
    return request


def _requested_outputs(outputs: Any, output_name: str, request: InferRequest) -> None:
    if outputs is None:
        return
    if not isinstance(outputs, list) or len(outputs) > 1 or not all(isinstance(o, dict) for o in outputs):
        raise TensorError(f"'outputs' may name one output, {output_name!r}")
    for output in outputs:
        if output.get("name") != output_name:
            raise TensorError(f"unknown output {output.get('name')!r}; the model answers {output_name!r}")
        parameters = _object(output.get("parameters"), "output parameters")
        k = parameters.get("classification")
        if k is not None:
            if not isinstance(k, int) or isinstance(k, bool):
                raise TensorError(f"classification must be an integer, got {k!r}")
            request.classification = k or None  # Triton's class_count=0 means the plain tensor
        if "binary_data" in parameters:
            request.binary_output = parameters["binary_data"] is True


def encode_response(head: dict[str, Any], outputs: list[OutputTensor], binary: bool) -> tuple[bytes, dict[str, str]]:
    """The response body and the headers it needs."""
    described, blobs = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if binary:
            blob = out.raw()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = out.json_data()
        described.append(entry)
    header = json.dumps({**head, "outputs": described}, ensure_ascii=False, separators=(",", ":")).encode()
    if not binary:
        return header, {}
    return header + b"".join(blobs), {HEADER_LENGTH: str(len(header))}
