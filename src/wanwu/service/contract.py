"""The API contract: the error body, the documented responses, and an OpenAPI document that is complete.

* every error is ``{"error": {"code", "message"}}`` (:class:`ErrorBody`), and each route documents the
  statuses it can answer (:func:`errors`);
* the JSON body of ``/v1/recognize`` is a real component (``RecognizeJson`` and the ``ImageIn`` it refers
  to), so the document has no dangling ``$ref``;
* a method a path does not serve answers 405 with an ``Allow`` header naming every method that path serves
  (Starlette's own names only the first route that matched the path).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse
from starlette.routing import Match, Route

DESCRIPTIONS = {
    400: "Malformed body (not JSON, broken multipart), JSON nested too deep, or a NUL byte or lone surrogate in "
         "the URL, a file name, a form field or a JSON string",
    408: "The body arrived too slowly (--body-timeout, --min-upload-rate)",
    401: "Missing or wrong API key",
    404: "No such job, or (/v1/search) no index on this server",
    413: "Body above --max-upload-mb, or too many files",
    415: "Neither multipart/form-data nor JSON",
    422: "The body or a parameter does not validate",
    503: "Busy (queue full, too many bytes in flight) or the model is not loaded yet: see Retry-After",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.headers)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable machine-readable code, e.g. `queue_full`.")
    message: str = Field(description="What went wrong, for a person.")


class ErrorBody(BaseModel):
    error: ErrorDetail


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entries for these error statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": DESCRIPTIONS[status]}
        if status == 503:
            entry["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
        out[status] = entry
    return out


def json_body_schema(model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A reference to ``model`` and the components it needs (itself and its ``$defs``)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.pop("$defs", {})
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}, components


def request_body(form: dict[str, Any], json_ref: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An endpoint's ``openapi_extra``: a required body, either a multipart form with the fields ``form``
    (``required`` among them) or JSON as ``json_ref`` says."""
    schema: dict[str, Any] = {"type": "object", "properties": form}
    if required:
        schema["required"] = list(required)
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": schema}, "application/json": {"schema": json_ref}}}}


def install_openapi(
    app: FastAPI, extra_components: dict[str, Any], zero_shot: Callable[[], bool | None] = lambda: True
) -> None:
    """Build the document with ``extra_components`` merged into ``components.schemas``.

    It describes the loaded model: a model with fixed classes takes no per-request ``labels``, so the field is
    left out of the request bodies (``zero_shot()`` False). It is kept once the model is loaded (``zero_shot()``
    not None); until then it is built afresh on each request."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes,
        )
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in extra_components.items():
            schemas.setdefault(name, copy.deepcopy(schema))
        _boundary_errors(document)
        loaded = zero_shot()
        if loaded is False:
            _drop_labels(document)
        if loaded is not None:
            app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _boundary_errors(document: dict[str, Any]) -> None:
    """What the middleware answers before any route runs, on every operation it can happen to: 400 (a NUL in
    the URL), and for those with a body 408 (too slow), 413 (too large) and 503 (too many bytes held)."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in json_body_schema(ErrorBody)[1].items():
        schemas.setdefault(name, schema)
    for path in document.get("paths", {}).values():
        for operation in path.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            statuses = (400, 408, 413, 503) if "requestBody" in operation else (400,)
            for status in statuses:
                if str(status) not in operation["responses"]:
                    operation["responses"][str(status)] = _error_response(status)


def _error_response(status: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "description": DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    if status == 503:
        entry["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
    return entry


def _drop_labels(document: dict[str, Any]) -> None:
    """Remove the per-request ``labels`` field wherever a request body schema declares it."""

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            properties = node.get("properties")
            if isinstance(properties, dict) and "labels" in properties:
                del properties["labels"]
                if isinstance(node.get("required"), list) and "labels" in node["required"]:
                    node["required"].remove("labels")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document.get("components", {}).get("schemas", {}))
    for path in document.get("paths", {}).values():
        for operation in path.values():
            if isinstance(operation, dict):
                walk(operation.get("requestBody", {}))


def allowed_methods(app: FastAPI, scope: dict[str, Any]) -> list[str]:
    """Every method some route serves for this path."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**scope, "method": next(iter(route.methods))})
            if match is Match.FULL:
                methods |= route.methods
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)
