"""``POST /v1/search``: the index a server was started with (``wanwu serve --index DIR``), searched by Chinese
text (models with a text tower) or by uploaded photos; the answer is a list of the CLI's search lines.

Bodies: multipart ``files`` (photos) or ``text`` fields (repeatable), with ``k`` and ``threshold``; or JSON
``{"texts": [...]}`` / ``{"images": [base64 or {name, data}]}`` / ``{"urls": [...]}``. One kind of query per
request, as ``wanwu search`` takes TEXT or ``--image``. The same API keys, body limits, upload rate and in-flight
budget as every other route apply (they are the app's); a photo goes through the one orchestrator (cache by
content, decode processes, the shared batcher), and one that cannot be read gets an error line, not an error
response.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from wanwu.errors import ClosedError, UsageError
from wanwu.index import ImageIndex
from wanwu.service.batcher import QueueFullError
from wanwu.service.config import ServeConfig
from wanwu.service.contract import ApiError, errors, json_body_schema, request_body
from wanwu.service.guard import check_form, parse_json
from wanwu.service.requests import ImageIn, b64_item, describe, url_item
from wanwu.service.runtime import Runtime
from wanwu.sources import InputItem

MAX_K = 1000  # hits per query, as `wanwu search -k`
MAX_TEXT_CHARS = 200  # one text query


def _one_kind(schema: dict[str, Any]) -> None:
    schema["oneOf"] = [{"required": ["texts"]}, {"required": ["images"]}, {"required": ["urls"]}]
    for key in ("texts", "images", "urls"):
        schema["properties"][key].pop("default", None)


class SearchJson(BaseModel):
    """One of `texts`, `images` or `urls`. Answers come back in the order given."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_kind)
    texts: list[str] = Field(default_factory=list, min_length=1,
                             description="Chinese (or any) text queries: models with a text tower (Chinese-CLIP).")
    images: list[str | ImageIn] = Field(default_factory=list, min_length=1,
                                        description="Query photos: base64 strings or {name, data} objects.")
    urls: list[str] = Field(default_factory=list, min_length=1, description="Query photos by http(s) URL.")
    k: int = Field(10, ge=1, le=MAX_K, description="Hits per query.")
    threshold: float | None = Field(None, ge=-1, le=1, description="Only hits with at least this cosine.")


SEARCH_JSON_REF, SEARCH_JSON_COMPONENTS = json_body_schema(SearchJson)
_SEARCH_BODY = request_body({
    "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
              "description": "Query photos"},
    "text": {"type": "array", "minItems": 1, "items": {"type": "string", "maxLength": 200},
             "description": "Text queries (a model with a text tower)"},
    "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
    "threshold": {"type": "number", "minimum": -1, "maximum": 1},
}, SEARCH_JSON_REF)
_EXAMPLE = {"queries": [{"query": "红色连衣裙", "results": [
    {"input": "photos/dress-001.jpg", "score": 0.31245, "labels": ["连衣裙", "裙子", "红色"]}]}]}


@dataclass
class SearchRequest:
    texts: list[str] = field(default_factory=list)
    items: list[InputItem] = field(default_factory=list)
    k: int = 10
    threshold: float | None = None


def search_router(require: Callable[[], Runtime], config: ServeConfig, guard: list[Any]) -> APIRouter:
    """``require()``: the loaded :class:`Runtime`, or an :class:`ApiError` 503 while loading."""
    router = APIRouter()
    retry = {"Retry-After": str(config.retry_after_s)}

    def with_index() -> tuple[Runtime, ImageIndex]:
        runtime = require()
        if runtime.index is None:
            raise ApiError(404, "no_index", "this server has no index: start it with `wanwu serve --index DIR`")
        return runtime, runtime.index

    @router.post(
        "/v1/search", summary="Search the server's image index by text or by photo", openapi_extra=_SEARCH_BODY,
        dependencies=guard,
        responses={200: {"description": "One answer per query, in request order: the lines of `wanwu search`",
                         "content": {"application/json": {"example": _EXAMPLE}}},
                   **errors(400, *([401] if guard else []), 404, 413, 415, 422, 503)},
    )
    async def search(request: Request) -> Response:
        runtime, index = with_index()
        parsed = await parse_search(request, config)
        try:
            if parsed.texts:
                answers = await runtime.search_texts(parsed.texts, parsed.k, parsed.threshold)
            else:
                answers = await runtime.search_images(parsed.items, parsed.k, parsed.threshold)
        except UsageError as e:  # text queries for a model without a text tower
            raise ApiError(422, "no_text_tower", str(e)) from None
        except QueueFullError:
            raise ApiError(503, "queue_full", "the server is busy; retry shortly", retry) from None
        except ClosedError:
            raise ApiError(503, "shutting_down", "the server is shutting down", retry) from None
        return JSONResponse({"queries": [a.to_dict(index) for a in answers]})

    @router.get(
        "/v1/search/images/{sha256}", summary="An indexed photo, for a search result's thumbnail",
        dependencies=guard, response_class=Response,
        responses={200: {"description": "The file's bytes as indexed (JPEG, PNG, GIF, WebP or BMP)",
                         "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
                   **errors(*([401] if guard else []), 404, 503)},
    )
    async def image(sha256: str) -> Response:
        runtime, _ = with_index()
        data = await runtime.indexed_file(sha256) if SHA256.fullmatch(sha256) else None
        media = image_type(data) if data is not None else None
        if data is None or media is None:
            raise ApiError(404, "no_preview", "no local file of the index holds this content in a format a "
                           "browser shows")
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    return router


SHA256 = re.compile(r"[0-9a-f]{64}")
_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF8", "image/gif"),
          (b"BM", "image/bmp"))


def image_type(data: bytes) -> str | None:
    """The media type of a file a browser shows as an image, from its first bytes; None for anything else
    (an indexed TIFF, HEIC, … gets no thumbnail rather than a guessed type)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((media for magic, media in _MAGIC if data.startswith(magic)), None)


async def parse_search(request: Request, config: ServeConfig) -> SearchRequest:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        parsed = await _multipart(request, config)
    elif media == "application/json" or media.endswith("+json"):
        parsed = await asyncio.to_thread(_json_body, await request.body(), config.allow_urls)
    else:
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with 'files' or 'text' parts, "
                       "or application/json with 'texts', 'images' or 'urls'")
    queries = len(parsed.texts) + len(parsed.items)
    if not queries:
        raise ApiError(422, "no_queries", "the request has no query: send 'text' or 'files' (JSON: 'texts', "
                       "'images' or 'urls')")
    if parsed.texts and parsed.items:
        raise ApiError(422, "invalid_body", "search by text or by photo, not both in one request")
    if queries > min(config.max_files, config.max_queue):
        raise ApiError(413, "too_many_files", f"{queries} queries in one request; the limit is "
                       f"{min(config.max_files, config.max_queue)}")
    for text in parsed.texts:
        if not text.strip() or len(text) > MAX_TEXT_CHARS:
            raise ApiError(422, "invalid_text", f"a text query has 1 to {MAX_TEXT_CHARS} characters")
    return parsed


async def _multipart(request: Request, config: ServeConfig) -> SearchRequest:
    try:
        form = await request.form(max_files=config.max_files, max_fields=max(32, config.max_files + 8))
    except HTTPException as e:
        if "too many" in str(e.detail).lower():
            raise ApiError(413, "too_many_files", f"at most {config.max_files} queries per request") from None
        raise ApiError(400, "malformed_multipart", str(e.detail)) from None
    try:
        check_form(form)
        parsed = SearchRequest()
        for i, part in enumerate(form.getlist("files")):
            if not isinstance(part, UploadFile):
                raise ApiError(422, "invalid_files", "'files' parts must be files (with a filename)")
            parsed.items.append(InputItem.from_bytes(part.filename or f"files[{i}]", await part.read()))
        parsed.texts = [t for t in form.getlist("text") if isinstance(t, str)]
        k, threshold = form.get("k"), form.get("threshold")
        parsed.k = _number("k", k if isinstance(k, str) else None, int, 10, 1, MAX_K)
        found = _number("threshold", threshold if isinstance(threshold, str) else None, float, None, -1, 1)
        parsed.threshold = None if found is None else float(found)
    finally:
        await form.close()
    return parsed


def _number(name: str, text: str | None, kind: type, default: Any, low: float, high: float) -> Any:
    if text is None or text == "":
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ApiError(422, f"invalid_{name}", f"{name} must be a number, got {text!r}") from None
    if not low <= value <= high:  # NaN fails this too
        raise ApiError(422, f"invalid_{name}", f"{name} must be between {low} and {high}, got {text}")
    return value


def _json_body(raw: bytes, allow_urls: bool) -> SearchRequest:
    data = parse_json(raw)
    try:
        body = SearchJson.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, "invalid_body", describe(e)) from None
    if sum(bool(x) for x in (body.texts, body.images, body.urls)) > 1:
        raise ApiError(422, "invalid_body", "give one of 'texts', 'images' or 'urls'")
    items = [url_item(url, allow_urls) for url in body.urls]
    for i, image in enumerate(body.images):
        name, text = (image.name or f"images[{i}]", image.data) if isinstance(image, ImageIn) else (
            f"images[{i}]", image)
        items.append(b64_item(name, text))
    return SearchRequest(list(body.texts), items, body.k, body.threshold)
