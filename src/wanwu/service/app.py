"""The FastAPI app: a thin HTTP shell over :class:`~wanwu.service.runtime.Runtime`.

``create_app(config)`` returns an app whose lifespan loads the model in a worker thread (``/readyz`` says
503 until it is loaded, then 200) and shuts everything down on exit. Routes:

* ``POST /v1/recognize`` — multipart ``files`` (+ ``top_k``, ``labels``), or JSON ``{"urls": [...]}`` /
  ``{"images": [base64, ...]}``; answers ``{"results": [record, ...]}`` in request order;
* ``POST /v1/search`` — the index of ``--index DIR`` searched by text or photo (:mod:`~wanwu.service.search`);
* ``GET /v1/models``, ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), ``/openapi.json``,
  ``/docs`` (Swagger UI served locally);
* ``GET /`` — the 万物识别 web page (``wanwu/web``, no CDN). No ``/redoc`` (it needs a CDN).

Before any route: security headers (``headers.py``), NUL/surrogate checks of the URL (``guard.py``), and the
body limits, minimum upload rate and in-flight byte budget (``bodies.py``); any unexpected exception still
answers the JSON error body (500 ``internal``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from wanwu import __version__
from wanwu.cache import ResultCache
from wanwu.errors import ClosedError, UsageError
from wanwu.pipeline import FROM_OPTIONS
from wanwu.service.batcher import QueueFullError
from wanwu.service.bodies import MB, BodyLimitMiddleware, ByteBudget
from wanwu.service.config import ServeConfig
from wanwu.service.contract import (
    ApiError,
    allowed_methods,
    error_response,
    errors,
    install_openapi,
    json_body_schema,
    request_body,
)
from wanwu.service.guard import TextGuardMiddleware
from wanwu.service.headers import PAGE_CSP, SecurityHeadersMiddleware, docs_csp
from wanwu.service.metrics import MetricsMiddleware, ServiceMetrics
from wanwu.service.oip import PREFIX, OpenInferenceProtocol, oip_router, protocol_error
from wanwu.service.requests import RecognizeJson, api_key_dependency, json_error_body, parse_recognize
from wanwu.service.runtime import EngineFactory, Runtime, default_engine_factory
from wanwu.service.search import SEARCH_JSON_COMPONENTS, search_router
from wanwu.service.tensors import TensorError

log = logging.getLogger("wanwu")


@dataclass
class ServiceState:
    config: ServeConfig
    metrics: ServiceMetrics
    runtime: Runtime | None = None
    load_error: str | None = None
    loaded_at: float | None = None

    def require(self) -> Runtime:
        if self.runtime is None:
            message = (
                f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            )
            raise ApiError(503, "not_ready", message, {"Retry-After": str(self.config.retry_after_s)})
        return self.runtime


def create_app(
    config: ServeConfig,
    *,
    engine_factory: EngineFactory | None = None,
    cache: ResultCache | None = FROM_OPTIONS,
    on_load_failed: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """``cache``: a ResultCache to use, ``None`` for none; by default the one ``config.options`` names."""
    metrics = ServiceMetrics()
    state = ServiceState(config, metrics)
    budget = ByteBudget(int(config.inflight_mb * MB), observe=metrics.body_bytes.set)  # bodies and downloads
    factory = engine_factory or default_engine_factory(config)

    async def load() -> None:
        try:
            engine = await asyncio.to_thread(factory)
            runtime = await asyncio.to_thread(
                Runtime, config, engine, cache, metrics, metrics.cache_hits.inc, budget
            )
        except Exception as e:
            state.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot start: %s", e)
            if on_load_failed is not None:
                on_load_failed(e)
            return
        runtime.start()
        state.runtime, state.loaded_at = runtime, time.time()
        metrics.ready.set(1)
        log.info("model %s loaded; ready", engine.spec.name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(load(), name="wanwu-load")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if state.runtime is not None:
                await state.runtime.close()
                state.runtime = None
            metrics.ready.set(0)

    app = FastAPI(
        title="万物识别 wanwu",
        version=__version__,
        description="Recognize what is in images and name it in Chinese. Records have the same schema as "
        "`wanwu recognize --format jsonl`.",
        lifespan=lifespan,
        docs_url=None,  # served below from local assets
        redoc_url=None,  # ReDoc would load its script from a CDN: /docs is the one documentation page
    )
    app.state.wanwu = state
    app.add_middleware(BodyLimitMiddleware, limit_mb=config.max_upload_mb, budget=budget,
                       retry_after_s=config.retry_after_s, body_timeout_s=config.body_timeout_s,
                       min_rate=config.min_upload_kb_s * 1024)
    app.add_middleware(TextGuardMiddleware)  # 400 for a NUL in the path or query, before any route sees it
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(SecurityHeadersMiddleware)
    _add_error_handlers(app)
    guard = [Depends(api_key_dependency(config.api_keys))] if config.api_keys else []
    if config.queue:
        from wanwu.jobs.http import router as jobs_router

        app.include_router(jobs_router(config.queue, max_upload_bytes=config.max_upload_bytes), dependencies=guard,
                           responses=errors(401) if guard else None)
    _add_routes(app, state, guard)
    app.include_router(search_router(state.require, config, guard))
    protocol = OpenInferenceProtocol(config, state.require, lambda: state.runtime is not None)
    app.include_router(oip_router(protocol, guard))
    components = {**_JSON_COMPONENTS, **SEARCH_JSON_COMPONENTS}
    install_openapi(app, components, lambda: None if state.runtime is None else state.runtime.zero_shot)
    app.mount("/static", StaticFiles(packages=[("wanwu", "web")]), name="static")
    _add_docs(app)
    return app


def _add_docs(app: FastAPI) -> None:
    """Swagger UI 5 (it reads OpenAPI 3.1) at /docs from the fastapi-offline package's assets: no CDN."""
    from fastapi.openapi.docs import get_swagger_ui_html

    openapi_url, title = app.openapi_url or "/openapi.json", f"{app.title} — API"
    assets = resources.files("fastapi_offline").joinpath("static")
    app.mount("/docs-assets", StaticFiles(directory=str(assets)), name="docs-assets")

    page = bytes(get_swagger_ui_html(
        openapi_url=openapi_url, title=title, swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/docs-assets/favicon.png",
    ).body).decode()
    headers = {"Content-Security-Policy": docs_csp(page)}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    def v2(request: Request) -> bool:  # the Open Inference Protocol has its own error body: {"error": "…"}
        return request.url.path == PREFIX or request.url.path.startswith(PREFIX + "/")

    async def api_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, ApiError):
            raise exc
        return protocol_error(exc.status, exc.message, exc.headers) if v2(request) else exc.response()

    async def tensor_error(request: Request, exc: Exception) -> Response:
        return protocol_error(400, str(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, HTTPException):
            raise exc
        code, message = json_error_body(exc.status_code, exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # name every method this path serves, not only the first route's
            headers["Allow"] = ", ".join(allowed_methods(app, dict(request.scope)))
        if v2(request):
            return protocol_error(exc.status_code, message, headers)
        return error_response(exc.status_code, code, message, headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        if v2(request):
            return protocol_error(400, message or str(exc))
        return error_response(422, "invalid_request", message or str(exc))

    async def unexpected(request: Request, exc: Exception) -> Response:
        # Starlette logs the exception after this; the caller gets the API's JSON error, not a text/plain page.
        message = f"an internal error: {type(exc).__name__}"
        return protocol_error(500, message) if v2(request) else error_response(500, "internal", message)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(TensorError, tensor_error)
    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


_JSON_REF, _JSON_COMPONENTS = json_body_schema(RecognizeJson)
_RECOGNIZE_BODY = request_body({
    "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}},
    "top_k": {"type": "integer", "minimum": 1, "maximum": 50},
    "labels": {"type": "string", "description": "zero-shot models: own labels, one per line"},
}, _JSON_REF, required=("files",))

_RECORD_EXAMPLE = {
    "results": [
        {"input": "cat.jpg", "status": "ok",
         "predictions": [{"index": 281, "label": "虎斑猫", "score": 0.91}],
         "sha256": "…", "width": 640, "height": 480},
        {"input": "notes.txt", "status": "error", "sha256": "…",
         "error": {"type": "decode_error", "message": "cannot decode image: …"}},
    ]
}


def _add_routes(app: FastAPI, state: ServiceState, guard: list[Any]) -> None:
    config = state.config
    retry = {"Retry-After": str(config.retry_after_s)}

    @app.post(
        "/v1/recognize",
        summary="Recognize images (uploads, base64 or URLs)",
        openapi_extra=_RECOGNIZE_BODY,
        dependencies=guard,
        responses={
            200: {"description": "One record per input, in request order",
                  "content": {"application/json": {"example": _RECORD_EXAMPLE}}},
            **errors(400, *([401] if guard else []), 413, 415, 422, 503),
        },
    )
    async def recognize(request: Request) -> Response:
        runtime = state.require()
        if runtime.batcher.room() <= 0:
            state.metrics.rejected.inc()
            raise ApiError(503, "queue_full", "the server is busy; retry shortly", retry)
        parsed = await parse_recognize(request, config)
        params = runtime.defaults
        if parsed.top_k is not None:
            params = replace(params, top_k=parsed.top_k)
        try:
            records = await runtime.recognize(parsed.items, params, parsed.labels)
        except UsageError as e:  # a label list for a model with fixed classes
            raise ApiError(422, "invalid_labels", str(e)) from None
        except QueueFullError:
            state.metrics.rejected.inc()
            raise ApiError(503, "queue_full", "the server is busy; retry shortly", retry) from None
        except ClosedError:
            raise ApiError(503, "shutting_down", "the server is shutting down", retry) from None
        state.metrics.records(records)
        return JSONResponse({"results": [r.to_dict() for r in records]})

    @app.get("/v1/models", summary="The loaded model", dependencies=guard,
             responses=errors(*([401] if guard else []), 503))
    async def models() -> dict[str, Any]:
        runtime = state.require()
        spec = runtime.engine.spec
        return {
            "models": [
                {
                    **spec.describe(),
                    "device": runtime.engine.backend.device,
                    "default_top_k": config.options.record.top_k,
                    "score": config.options.record.score,
                    "max_batch_size": config.max_batch_size,
                    "labels_sample": list(spec.labels[:5]),
                    "zero_shot": runtime.zero_shot,
                    "index": runtime.index_info(),
                }
            ]
        }

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="200 once the model is loaded, else 503",
             responses={503: {"description": "Loading, or failed to load (see message)",
                              "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def readyz() -> Response:
        if state.runtime is None:
            status = "failed" if state.load_error else "loading"
            body: dict[str, Any] = {"status": status}
            if state.load_error:
                body["message"] = state.load_error
            return JSONResponse(body, status_code=503, headers=retry)
        return JSONResponse({"status": "ready", "model": state.runtime.engine.spec.name})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    page = resources.files("wanwu").joinpath("web", "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    icon = resources.files("wanwu").joinpath("web", "favicon.svg").read_bytes()

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:  # what browsers ask for by default; the page links the same SVG
        return Response(icon, media_type="image/svg+xml")
