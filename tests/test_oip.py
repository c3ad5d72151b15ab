"""The Open Inference Protocol (KServe v2) on ``wanwu serve``, spoken by the real Triton client.

The records of ``/v2/.../infer`` must be the records of ``/v1/recognize`` for the same bytes: same top class,
same top-k and scores, in the same order, whether tensors travel as JSON or in the binary extension.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (the dev extra) is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.servers import uvicorn_in_thread  # noqa: E402
from wanwu.config import RecognizeOptions  # noqa: E402
from wanwu.service import ServeConfig, create_app  # noqa: E402
from wanwu.service.tensors import TensorError, parse_infer_request  # noqa: E402

MODEL = "mobilenetv2-12-int8"
KEY = "k-0123456789"


def _photos(photos: Path, n: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted(photos.glob("*.JPEG"))[:n]]


@pytest.fixture(scope="module")
def server(mobilenet: tuple[Path, Path]) -> Iterator[str]:
    config = ServeConfig(model=str(mobilenet[0]), labels=mobilenet[1], max_files=8, api_keys=(KEY,),
                         options=RecognizeOptions(decoders=0, cache=False))
    with uvicorn_in_thread(create_app(config, cache=None)) as base:
        yield base


@pytest.fixture
def client(server: str) -> Iterator[Any]:
    triton = httpclient.InferenceServerClient(server.removeprefix("http://"), network_timeout=120.0)
    try:
        yield triton
    finally:
        triton.close()


def _v1(server: str, images: list[bytes], top_k: int = 5) -> list[dict[str, Any]]:
    files = [("files", (f"images[{i}]", data, "image/jpeg")) for i, data in enumerate(images)]
    response = httpx.post(f"{server}/v1/recognize", files=files, data={"top_k": str(top_k)},
                          headers={"X-API-Key": KEY}, timeout=120)
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def _input(images: list[bytes], binary: bool) -> Any:
    tensor = httpclient.InferInput("images", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    else:
        encoded = [base64.b64encode(data).decode() for data in images]
        tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=False)
    return tensor


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_scores_tensor_has_every_class_and_v1s_top_class(
    server: str, client: Any, photos: Path, binary: bool
) -> None:
    images = _photos(photos, 4)
    result = client.infer(MODEL, [_input(images, binary)], headers={"X-API-Key": KEY},
                          outputs=[httpclient.InferRequestedOutput("scores", binary_data=binary)])
    scores = result.as_numpy("scores")
    assert scores.shape == (4, 1000) and scores.dtype == np.float32
    v1 = _v1(server, images)
    assert [int(i) for i in scores.argmax(axis=1)] == [r["predictions"][0]["index"] for r in v1]
    # /v1's softmax scores follow from the raw row: the row is the model's own output, not a top-k stand-in
    for row, record in zip(scores.astype(np.float64), v1, strict=True):
        softmax = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        for p in record["predictions"]:
            assert softmax[p["index"]] == pytest.approx(p["score"], abs=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension_gives_v1s_top_k(server: str, client: Any, photos: Path, binary: bool) -> None:
    images = _photos(photos, 3)[::-1]  # another order: each element keeps its own answer
    output = httpclient.InferRequestedOutput("scores", binary_data=binary, class_count=3)
    result = client.infer(MODEL, [_input(images, binary)], outputs=[output], headers={"X-API-Key": KEY})
    got = result.as_numpy("scores")
    assert got.shape == (3, 3)
    expected = [[f"{p['score']:f}:{p['index']}:{p['label']}" for p in r["predictions"]]
                for r in _v1(server, images, top_k=3)]
    as_text = [[(v.decode() if isinstance(v, bytes) else str(v)) for v in row] for row in got]
    assert as_text == expected


def test_server_and_model_routes_answer_the_client(client: Any) -> None:
    headers = {"X-API-Key": KEY}
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL, headers=headers)
    assert client.is_model_ready(MODEL, "1", headers=headers)
    meta = client.get_model_metadata(MODEL, headers=headers)
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 1000]}]
    config = client.get_model_config(MODEL, headers=headers)
    assert config["max_batch_size"] == 32 and "dynamic_batching" in config
    assert client.get_model_repository_index(headers=headers) == [{"name": MODEL, "version": "1", "state": "READY"}]
    assert client.get_server_metadata(headers=headers)["extensions"]
    before = client.get_inference_statistics(MODEL, headers=headers)["model_stats"][0]["inference_count"]
    client.infer(MODEL, [_input([base64.b64decode(_PNG)], True)], headers=headers)
    after = client.get_inference_statistics(MODEL, headers=headers)["model_stats"][0]["inference_count"]
    assert after == before + 1


_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP4z8DAwMDAwMDAwMDAwAAAHgAC3tHR"
        "TwAAAABJRU5ErkJggg==")


def test_a_non_image_element_is_named_in_a_400(client: Any, photos: Path) -> None:
    images = [*_photos(photos, 1), b"this is not an image"]
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [_input(images, True)], headers={"X-API-Key": KEY})
    assert caught.value.status() == "400"
    assert "element 1: unsupported" in caught.value.message()


def test_errors_have_the_protocols_form(server: str, client: Any, photos: Path) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("no-such-model", [_input(_photos(photos, 1), True)], headers={"X-API-Key": KEY})
    assert caught.value.status() == "404" and "no-such-model" in caught.value.message()
    unauthorised = httpx.get(f"{server}/v2/models/{MODEL}", timeout=30)
    assert unauthorised.status_code == 401 and isinstance(unauthorised.json()["error"], str)
    nine = [base64.b64decode(_PNG)] * 9  # max_files is 8
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [_input(nine, True)], headers={"X-API-Key": KEY})
    assert caught.value.status() == "413"
    body = {"inputs": [{"name": "images", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    response = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=body, headers={"X-API-Key": KEY}, timeout=30)
    assert response.status_code == 400 and "BYTES" in response.json()["error"]
    nested = "[" * 5000 + "]" * 5000
    response = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=nested, timeout=30,
                          headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    assert response.status_code == 400 and isinstance(response.json()["error"], str)


# --- the wire format alone ---------------------------------------------------------------------------------


def _binary_body(elements: list[bytes], declared: int | None = None) -> tuple[bytes, str]:
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    head = json.dumps({"inputs": [{"name": "images", "shape": [len(elements)], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw) if declared is None else declared}}],
                       "outputs": [{"name": "scores", "parameters": {"classification": 2, "binary_data": True}}]})
    return head.encode() + raw, str(len(head.encode()))


def test_binary_requests_are_read_exactly() -> None:
    body, length = _binary_body([b"\xff\xd8one", b"", b"three"])
    request = parse_infer_request(body, length, "images", "scores")
    assert request.images == [b"\xff\xd8one", b"", b"three"]
    assert request.classification == 2 and request.binary_output


@pytest.mark.parametrize("case", ["cut", "size", "count", "header"])
def test_broken_binary_requests_are_refused(case: str) -> None:
    body, length = _binary_body([b"abc", b"defg"], declared=None if case != "size" else 3)
    if case == "cut":
        body = body[:-2]
    if case == "count":
        body = body.replace(b'"shape": [2]', b'"shape": [3]')
        length = str(int(length))
    if case == "header":
        length = str(len(body) + 1)
    with pytest.raises(TensorError):
        parse_infer_request(body, length, "images", "scores")


def test_the_api_document_describes_the_v2_routes(server: str) -> None:
    paths = httpx.get(f"{server}/openapi.json", timeout=30).json()["paths"]
    for route in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/repository/index", "/v2/models/{name}",
                  "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer",
                  "/v2/models/{name}/config", "/v2/models/{name}/stats", "/v2/models/{name}/ready"):
        assert route in paths, route
