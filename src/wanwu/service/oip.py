"""The Open Inference Protocol (KServe v2, as Triton serves it) beside ``/v1``: same batcher, keys and limits.

Routes (``{m}`` is the name ``/v1/models`` reports; every model route also has a ``/versions/{v}/`` form):
``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{m}``, ``/v2/models/{m}/ready``,
``/v2/models/{m}/config``, ``/v2/models/{m}/stats``, ``POST /v2/repository/index`` and
``POST /v2/models/{m}/infer``.

The model takes one ``BYTES`` input of shape ``[N]`` (``[N, 1]`` too), one encoded image per element, and
answers ``scores`` (``FP32 [N, classes]``: the model's raw outputs). Asked with ``"parameters":
{"classification": k}``, ``scores`` comes back as ``BYTES [N, k]``, each ``"score:index:label"``: the top-k of
``/v1/recognize``, scored as it scores them. Tensors travel as JSON (a ``BYTES`` element as base64 text) or in
the binary tensor extension (``Inference-Header-Content-Length``), both ways. Errors are ``{"error": "…"}``.
The wire format is in :mod:`wanwu.service.tensors`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from wanwu import __version__
from wanwu.records import TOP_N_STORED, Record, RecordOptions
from wanwu.service.batcher import QueueFullError
from wanwu.service.config import ServeConfig
from wanwu.service.contract import ApiError
from wanwu.service.runtime import Runtime
from wanwu.service.tensors import (
    HEADER_LENGTH,
    InferRequest,
    OutputTensor,
    TensorError,
    encode_response,
    parse_infer_request,
)
from wanwu.sources import InputItem

PREFIX = "/v2"
INPUT = "images"
OUTPUT = "scores"
VERSION = "1"


def protocol_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The protocol's error body: ``{"error": "…"}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@dataclass
class _Stats:
    """Triton's per-model statistics, the parts wanwu can say truly."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    requests: int = 0
    last_ms: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: bool, images: int, ns: int) -> None:
        with self.lock:
            self.requests += 1
            self.last_ms = int(time.time() * 1000)
            if ok:
                self.success += images
                self.success_ns += ns
            else:
                self.fail += 1
                self.fail_ns += ns


_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object", "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["name", "shape", "datatype"],
                        "properties": {
                            "name": {"type": "string"},
                            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "datatype": {"type": "string", "enum": ["BYTES"]},
                            "parameters": {"type": "object"},
                            "data": {"type": "array", "items": {"type": "string", "description": "base64"}},
                        }}},
                    "outputs": {"type": "array", "items": {
                        "type": "object", "required": ["name"],
                        "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}}},
                },
            }},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                    "description": "binary tensor extension: JSON header "
                                                    f"({HEADER_LENGTH} bytes) then raw tensors"}},
        },
    }
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    schema = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    return {s: {"description": "An error in the protocol's form", "content": {"application/json": {"schema": schema}}}
            for s in statuses}


class OpenInferenceProtocol:
    """The ``/v2`` routes over a service's :class:`Runtime` (``runtime()`` raises ApiError 503 until loaded)."""

    def __init__(self, config: ServeConfig, runtime: Callable[[], Runtime], loaded: Callable[[], bool]) -> None:
        self.config = config
        self.runtime = runtime
        self.loaded = loaded
        self.stats = _Stats()

    # -- model description ----------------------------------------------------------------------------

    def _model(self, name: str, version: str | None = None) -> Runtime:
        runtime = self.runtime()
        spec = runtime.engine.spec
        if name != spec.name:
            raise ApiError(404, "not_found", f"unknown model {name!r}; this server serves {spec.name!r}")
        if version not in (None, "", VERSION):
            raise ApiError(404, "not_found", f"model {name!r} has only version {VERSION}")
        return runtime

    def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        runtime = self._model(name, version)
        spec = runtime.engine.spec
        return {
            "name": spec.name, "versions": [VERSION], "platform": f"wanwu_{spec.backend}",
            "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, spec.num_classes]}],
        }

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        runtime = self._model(name, version)
        spec = runtime.engine.spec
        return {
            "name": spec.name, "platform": f"wanwu_{spec.backend}", "backend": spec.backend,
            "max_batch_size": self.config.max_batch_size,
            # Triton's idiom for a [N] input of a batching model: one element per image, reshaped to a scalar
            "input": [{"name": INPUT, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}],
            "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [spec.num_classes]}],
            "dynamic_batching": {
                "preferred_batch_size": [self.config.max_batch_size],
                "max_queue_delay_microseconds": int(self.config.max_delay_ms * 1000),
            },
            "parameters": {"top_n_stored": {"string_value": str(TOP_N_STORED)}},
        }

    def model_stats(self, name: str, version: str | None = None) -> dict[str, Any]:
        spec = self._model(name, version).engine.spec
        s = self.stats
        with s.lock:
            stats = {
                "name": spec.name, "version": VERSION, "last_inference": s.last_ms,
                "inference_count": s.success, "execution_count": s.requests,
                "inference_stats": {"success": {"count": s.success, "ns": s.success_ns},
                                    "fail": {"count": s.fail, "ns": s.fail_ns}},
            }
        return {"model_stats": [stats]}

    # -- inference ------------------------------------------------------------------------------------

    async def infer(self, request: Request, name: str, version: str | None = None) -> Response:
        started = time.perf_counter_ns()
        runtime = self._model(name, version)
        if runtime.batcher.room() <= 0:
            raise ApiError(503, "queue_full", "the server is busy; retry shortly",
                           {"Retry-After": str(self.config.retry_after_s)})
        body = await request.body()
        try:
            parsed = await asyncio.to_thread(
                parse_infer_request, body, request.headers.get(HEADER_LENGTH), INPUT, OUTPUT
            )
            self._check_size(parsed)
            outputs = await self._run(runtime, parsed)
        except (TensorError, ApiError):
            self.stats.add(False, 0, time.perf_counter_ns() - started)
            raise
        self.stats.add(True, len(parsed.images), time.perf_counter_ns() - started)
        payload, headers = encode_response(
            {"model_name": runtime.engine.spec.name, "model_version": VERSION, **({"id": parsed.id} if parsed.id
                                                                                   else {})},
            outputs, parsed.binary_output,
        )
        media = "application/octet-stream" if HEADER_LENGTH in headers else "application/json"
        return Response(payload, media_type=media, headers=headers)

    def _check_size(self, parsed: InferRequest) -> None:
        n = len(parsed.images)
        if n == 0:
            raise TensorError(f"input {INPUT!r} holds no images")
        limit = min(self.config.max_files, self.config.max_queue)
        if n > limit:
            raise ApiError(413, "too_many_files", f"{n} images in one request; the limit is {limit}")
        if parsed.classification is not None and not 1 <= parsed.classification <= TOP_N_STORED:
            raise TensorError(f"classification must be between 1 and {TOP_N_STORED}, got {parsed.classification}")

    async def _run(self, runtime: Runtime, parsed: InferRequest) -> list[OutputTensor]:
        items = [InputItem.from_bytes(f"{INPUT}[{i}]", data) for i, data in enumerate(parsed.images)]
        k = parsed.classification
        options = RecordOptions(top_k=k or runtime.defaults.top_k, score=runtime.defaults.score,
                                scores=k is None)
        try:
            records = await runtime.recognize(items, options)
        except QueueFullError:
            raise ApiError(503, "queue_full", "the server is busy; retry shortly",
                           {"Retry-After": str(self.config.retry_after_s)}) from None
        for i, record in enumerate(records):
            if not record.ok:
                error = record.error
                reason = f"{error.type}: {error.message}" if error else "unknown"
                raise TensorError(f"input {INPUT!r} element {i}: {reason}")
        spec = runtime.engine.spec
        if k is not None:
            return [_classification(records, k)]
        rows = [r.scores for r in records]
        if any(row is None for row in rows):  # cannot happen: RecordOptions.scores bypasses the caches
            raise ApiError(500, "internal", "the model's scores were not kept")
        scores = np.stack([np.asarray(row, dtype=np.float32) for row in rows]).reshape(len(rows), spec.num_classes)
        return [OutputTensor(OUTPUT, "FP32", list(scores.shape), scores)]


def _classification(records: list[Record], k: int) -> OutputTensor:
    """``BYTES [N, k]`` of ``"score:index:label"``, best first (fewer than k only under a threshold: padded
    with empty strings so the tensor stays rectangular)."""
    rows = []
    for record in records:
        row = [f"{p.score:f}:{p.index}:{p.label}".encode() for p in record.predictions[:k]]
        rows.append(row + [b""] * (k - len(row)))
    return OutputTensor(OUTPUT, "BYTES", [len(records), k], rows)


def oip_router(protocol: OpenInferenceProtocol, guard: list[Any]) -> APIRouter:
    """The ``/v2`` routes. Health routes need no key (like /healthz); the rest take the service's keys."""
    router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol (KServe v2)"])
    not_ready = {"Retry-After": str(protocol.config.retry_after_s)}

    @router.get("/health/live", summary="200: the server is alive")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready", summary="200 once the model is loaded, else 400 (the protocol's false)",
                responses=_errors(400))
    async def ready() -> Response:
        if protocol.loaded():
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False}, status_code=400, headers=not_ready)

    @router.get("", summary="Server metadata", dependencies=guard, responses=_errors(401))
    async def server() -> dict[str, Any]:
        return {"name": "wanwu", "version": __version__,
                "extensions": ["classification", "binary_tensor_data", "model_repository", "statistics"]}

    @router.post("/repository/index", summary="The models this server serves", dependencies=guard,
                 responses=_errors(401))
    async def index() -> list[dict[str, str]]:
        try:
            name = protocol.runtime().engine.spec.name
        except ApiError:
            return []  # still loading: the protocol lists what is ready or loading; the name is not known yet
        return [{"name": name, "version": VERSION, "state": "READY"}]

    for versioned in (True, False):
        # {name:path}: a ModelScope id holds a slash. Routes with a suffix come before the bare metadata route.
        base = "/models/{name:path}/versions/{version}" if versioned else "/models/{name:path}"
        _model_routes(router, protocol, base, guard)
    return router


def _version(request: Request) -> str | None:
    return request.path_params.get("version")


_VERSION_PARAM = {"parameters": [{"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}]}


def _model_routes(router: APIRouter, protocol: OpenInferenceProtocol, base: str, guard: list[Any]) -> None:
    """The model routes under ``base``; the version, where ``base`` has one, is read from the path (one handler
    serves both forms)."""
    common = _errors(401, 404, 503)
    extra = _VERSION_PARAM if "{version}" in base else {}

    @router.get(f"{base}/ready", summary="200 once the model is loaded, else 400", dependencies=guard,
                responses=_errors(400, 401, 404), openapi_extra=extra)
    async def model_ready(request: Request, name: str) -> Response:
        if not protocol.loaded():
            return JSONResponse({"name": name, "ready": False}, status_code=400)
        protocol.metadata(name, _version(request))  # 404 for another name
        return JSONResponse({"name": name, "ready": True})

    @router.get(f"{base}/config", summary="Model configuration (Triton's form)", dependencies=guard,
                responses=common, openapi_extra=extra)
    async def config(request: Request, name: str) -> dict[str, Any]:
        return protocol.model_config(name, _version(request))

    @router.get(f"{base}/stats", summary="Inference statistics", dependencies=guard, responses=common,
                openapi_extra=extra)
    async def stats(request: Request, name: str) -> dict[str, Any]:
        return protocol.model_stats(name, _version(request))

    @router.post(f"{base}/infer", summary="Recognize a BYTES tensor of encoded images", dependencies=guard,
                 openapi_extra={**_INFER_BODY, **extra}, responses={
                     200: {"description": "Outputs as JSON, or JSON header + binary tensors"},
                     **_errors(400, 401, 404, 413, 503)})
    async def infer(request: Request, name: str) -> Response:
        return await protocol.infer(request, name, _version(request))

    @router.get(base, summary="Model metadata", dependencies=guard, responses=common, openapi_extra=extra)
    async def metadata(request: Request, name: str) -> dict[str, Any]:
        return protocol.metadata(name, _version(request))
