"""The API contract: the error body, the documented responses, and an OpenAPI document that is complete.

* every error is ``{"error": {"code", "message"}}`` (:class:`ErrorBody`), and each route documents the
  statuses it can answer (:func:`errors`);
* the JSON body of ``/v1/recognize`` is a real component (``RecognizeJson`` and the ``ImageIn`` it refers
  to), so the document has no dangling ``$ref``;
* a method a path does not serve answers 405 with an ``Allow`` header naming every method that path serves
  (Starlette's own names only the first route that matched the path).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from starlette.routing import Match, Route

DESCRIPTIONS = {
    400: "Malformed body (not JSON, broken multipart)",
    401: "Missing or wrong API key",
    404: "No such job",
    413: "Body above --max-upload-mb, or too many files",
    415: "Neither multipart/form-data nor JSON",
    422: "The body or a parameter does not validate",
    503: "Busy (queue full, too many bytes in flight) or the model is not loaded yet: see Retry-After",
}


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


def install_openapi(app: FastAPI, extra_components: dict[str, Any]) -> None:
    """Build the document once, with ``extra_components`` merged into ``components.schemas``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes,
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in extra_components.items():
                schemas.setdefault(name, schema)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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
