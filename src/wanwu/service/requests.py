"""Request-level concerns: parsing /v1/recognize bodies, API keys, the upload size limit, error bodies.

Every request-level problem is an :class:`ApiError`, answered as JSON
``{"error": {"code": ..., "message": ...}}`` with its HTTP status. Problems with one input (not an image,
bad base64, a dead URL) are not request errors: they become error records.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from wanwu.records import TOP_N_STORED
from wanwu.service.config import ServeConfig
from wanwu.service.contract import ApiError
from wanwu.service.guard import check_form, parse_json
from wanwu.sources import InputItem, is_url

# --- bodies ---------------------------------------------------------------------------------------------


class ImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="What the record's `input` says (default `images[i]`).")
    data: str = Field(description="The file's bytes, base64 (a `data:...;base64,` prefix is allowed).")


MAX_LABELS = 200  # labels in one request's own list: each new list costs len x prompts text-tower passes
MAX_LABEL_CHARS = 64


def _one_of_urls_or_images(schema: dict[str, Any]) -> None:
    schema["oneOf"] = [{"required": ["urls"]}, {"required": ["images"]}]
    for key in ("urls", "images"):
        schema["properties"][key].pop("default", None)


class RecognizeJson(BaseModel):
    """Either `urls` or `images` (not both, not empty). Records come back in the order given."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_of_urls_or_images)
    urls: list[str] = Field(default_factory=list, min_length=1, description="http(s) URLs for the server to download.")
    images: list[str | ImageIn] = Field(default_factory=list, min_length=1,
                                        description="base64 strings or {name, data} objects.")
    top_k: int | None = Field(None, ge=1, le=TOP_N_STORED, description="Labels per image.")
    labels: list[str] | None = Field(
        None, max_length=MAX_LABELS,
        description="Your own label list, for a zero-shot (CLIP) model: the images are scored against these.",
    )


@dataclass
class Parsed:
    items: list[InputItem]
    top_k: int | None = None
    labels: tuple[str, ...] | None = None  # the request's own label list (zero-shot models)


def _labels(values: list[str] | None) -> tuple[str, ...] | None:
    """Stripped, non-empty, unique labels (``None`` when none were given)."""
    if values is None:
        return None
    labels = tuple(dict.fromkeys(v.strip() for v in values if v.strip()))
    if not labels:
        return None
    if len(labels) > MAX_LABELS or any(len(v) > MAX_LABEL_CHARS for v in labels):
        raise ApiError(422, "invalid_labels", f"at most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters")
    return labels


async def parse_recognize(request: Request, config: ServeConfig) -> Parsed:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        parsed = await _parse_multipart(request, config)
    elif media == "application/json" or media.endswith("+json"):
        parsed = await _parse_json(request, config.allow_urls)
    else:
        raise ApiError(
            415, "unsupported_media_type",
            "send multipart/form-data with one or more 'files' parts, "
            "or application/json with 'urls' or 'images'",
        )
    if not parsed.items:
        raise ApiError(422, "no_inputs", "the request names no images: send 'files', 'urls' or 'images'")
    if len(parsed.items) > config.max_files:
        raise ApiError(413, "too_many_files", f"{len(parsed.items)} images in one request; the limit is "
                       f"{config.max_files}")
    if len(parsed.items) > config.max_queue:
        raise ApiError(413, "too_many_files", f"{len(parsed.items)} images in one request; this server "
                       f"queues at most {config.max_queue} at a time")
    return parsed


async def _parse_multipart(request: Request, config: ServeConfig) -> Parsed:
    boundary = _boundary(request.headers.get("content-type", ""))
    if boundary is not None:
        one = _one_file(await request.body(), boundary)  # (the form parser below reads the body kept here)
        if one is not None:
            return Parsed([InputItem.from_bytes(*one)])
    try:
        form = await request.form(max_files=config.max_files, max_fields=32)
    except HTTPException as e:  # python-multipart's complaints, already worded
        if "too many files" in str(e.detail).lower():
            raise ApiError(413, "too_many_files", f"at most {config.max_files} files per request") from None
        raise ApiError(400, "malformed_multipart", str(e.detail)) from None
    try:
        check_form(form)  # 400 for a NUL or lone surrogate in a field or a file name
        items = []
        for i, part in enumerate(form.getlist("files")):
            if not isinstance(part, UploadFile):
                raise ApiError(422, "invalid_files", "'files' parts must be files (with a filename)")
            items.append(InputItem.from_bytes(part.filename or f"files[{i}]", await part.read()))
        top_k_field = form.get("top_k")
        top_k = _top_k(top_k_field if isinstance(top_k_field, str) else None)
        labels_field = form.get("labels")  # one label per line
        labels = _labels(labels_field.splitlines() if isinstance(labels_field, str) else None)
    finally:
        await form.close()
    return Parsed(items, top_k, labels)


# The common upload, one file part and nothing else, is taken from the body with a few byte searches: the general
# multipart parser costs about 190 us of CPU for a 100 kB photo, a tenth of that here. Anything else (more parts,
# other fields, unusual headers or file names) goes to the general parser, so both always agree.
_SIMPLE_TOKEN = re.compile(rb"[A-Za-z0-9'()+_,./:=?-]{1,70}")
_DISPOSITION = rb'Content-Disposition: form-data; name="files"; filename="([\x20-\x21\x23-\x5b\x5d-\x7e]{1,255})"'
_TYPE = rb"Content-Type: [\x21-\x7e]{1,100}"
# the file's type after its disposition (browsers, httpx, requests) or before it (aiohttp); never two types
_ONE_FILE_HEAD = re.compile(rb"(?:" + _DISPOSITION + rb"(?:\r\n" + _TYPE + rb")?|" + _TYPE + rb"\r\n" + _DISPOSITION
                            + rb")\r\n\r\n")


def _boundary(content_type: str) -> bytes | None:
    """The multipart boundary when it is a plain token (``boundary=XYZ``, unquoted); else None."""
    _, _, rest = content_type.partition(";")
    name, _, value = rest.strip().partition("=")
    token = value.encode("latin-1", "replace")
    return token if name.strip().lower() == "boundary" and _SIMPLE_TOKEN.fullmatch(token) else None


def _one_file(body: bytes, boundary: bytes) -> tuple[str, bytes] | None:
    """(file name, bytes) of a body that is exactly one ``files`` part with an ASCII file name; else None."""
    opening, closing = b"--" + boundary + b"\r\n", b"\r\n--" + boundary + b"--\r\n"
    if not body.startswith(opening) or not body.endswith(closing):
        return None
    head = _ONE_FILE_HEAD.match(body, len(opening))
    if head is None:
        return None
    end = len(body) - len(closing)
    if body.find(b"\r\n--" + boundary, head.end()) != end:
        return None  # another part, or a boundary inside what would be the file
    return (head.group(1) or head.group(2)).decode("ascii"), body[head.end():end]


def _top_k(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ApiError(422, "invalid_top_k", f"top_k must be an integer, got {text!r}") from None
    if not 1 <= value <= TOP_N_STORED:
        raise ApiError(422, "invalid_top_k", f"top_k must be between 1 and {TOP_N_STORED}, got {value}")
    return value


async def _parse_json(request: Request, allow_urls: bool = True) -> Parsed:
    # Parsing, validating and base64-decoding a body of many megabytes takes a while: off the event loop.
    return await asyncio.to_thread(_parse_json_body, await request.body(), allow_urls)


def _parse_json_body(raw: bytes, allow_urls: bool = True) -> Parsed:
    data = parse_json(raw)  # 400 for bad JSON, a NUL or lone surrogate in a string, absurd nesting
    try:
        body = RecognizeJson.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, "invalid_body", describe(e)) from None
    if body.urls and body.images:
        raise ApiError(422, "invalid_body", "give either 'urls' or 'images', not both")
    items = [url_item(url, allow_urls) for url in body.urls or []]
    for i, image in enumerate(body.images or []):
        name, text = (image.name or f"images[{i}]", image.data) if isinstance(image, ImageIn) else (
            f"images[{i}]", image)
        items.append(b64_item(name, text))
    return Parsed(items, body.top_k, _labels(body.labels))


def url_item(url: str, allow_urls: bool = True) -> InputItem:
    if not allow_urls:
        return InputItem.failed(url, "this server does not fetch URLs (--no-urls)", "unsupported")
    if not is_url(url):
        reason = "only http:// and https:// URLs are accepted"
        return InputItem.failed(url, reason, "unsupported")
    return InputItem(url, "url", url)


def b64_item(name: str, text: str) -> InputItem:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return InputItem.failed(name, "not valid base64", "decode_error")
    return InputItem.from_bytes(name, data)


def describe(error: ValidationError) -> str:
    parts = []
    for issue in error.errors(include_url=False):
        where = ".".join(str(p) for p in issue["loc"]) or "body"
        parts.append(f"{where}: {issue['msg']}")
    return "; ".join(parts)


# --- API keys -------------------------------------------------------------------------------------------


def api_key_dependency(keys: tuple[str, ...]) -> Callable[..., Awaitable[None]]:
    """A FastAPI security dependency (so /docs shows the schemes): ``Authorization: Bearer KEY`` or
    ``X-API-Key: KEY``, compared in constant time.

    The model is single-tenant: every key opens the same service and the same job queue (a key holder sees
    and can delete every job). Give different tenants different servers and queues.
    """

    def valid(given: str) -> bool:
        return any(hmac.compare_digest(given.encode(), key.encode()) for key in keys)

    async def require_key(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
        header: Annotated[str | None, Security(_KEY_HEADER)],
    ) -> None:
        # Every credential presented must be valid: a bad Authorization is not rescued by a good X-API-Key.
        presented = [request.headers["authorization"]] if "authorization" in request.headers else []
        if bearer is not None:
            presented = [bearer.credentials]
        if header is not None:
            presented.append(header)
        if not presented or not all(valid(given) for given in presented):
            raise ApiError(
                401, "unauthorized",
                "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)",
                {"WWW-Authenticate": "Bearer"},
            )

    return require_key


_BEARER = HTTPBearer(auto_error=False, scheme_name="bearerKey", description="Authorization: Bearer KEY")
_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey", description="X-API-Key: KEY")


def json_error_body(status: int, detail: Any) -> tuple[str, str]:
    """Code and message for Starlette's own HTTP errors (404, 405, ...)."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, f"http_{status}")
    return code, detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False)
