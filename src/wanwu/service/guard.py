"""Text that crosses the HTTP boundary: no NUL byte, no lone surrogate, no JSON nested without end.

A NUL byte or a lone UTF-16 surrogate (``"\\ud800"`` in JSON) in a URL, a file name, a form field or any
JSON string is refused with 400 ``invalid_text`` before anything else sees it: such a string cannot be a
path, cannot be encoded as UTF-8 in a record, and would fail somewhere deeper (a worker, a response) instead.
JSON nested deeper than :data:`MAX_JSON_DEPTH` is refused with 400 ``too_deep``; bodies above
:data:`INLINE_JSON_BYTES` are parsed on a thread, not on the event loop.

:class:`TextGuardMiddleware` checks every request's path and query string; :func:`read_json` and
:func:`check_form` check bodies, for every route that reads one.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from wanwu.service.contract import ApiError

MAX_JSON_DEPTH = 32  # the API's bodies nest three levels; anything near this is not a request of ours
INLINE_JSON_BYTES = 64 * 1024  # larger bodies are parsed on a thread
_BAD = re.compile("[\x00\ud800-\udfff]")
# In JSON text a NUL or a surrogate can only be written as a \u escape (raw NUL is not valid JSON, raw
# surrogate bytes are not valid UTF-8): a body without one needs no walk over its strings.
_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def bad_text(where: str) -> ApiError:
    return ApiError(400, "invalid_text", f"{where} holds a NUL byte or a lone surrogate, which no name, path "
                    "or URL may hold")


def check_text(value: str, where: str) -> None:
    if _BAD.search(value):
        raise bad_text(where)


def _walk(data: Any, strings: bool) -> None:
    """Depth bounded, and (``strings``) every string checked, keys too; without recursion."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            check_text(node, "a JSON string")
        elif isinstance(node, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, "too_deep", f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(node, dict):
                if strings:
                    stack.extend((key, depth) for key in node)
                node = node.values()
            stack.extend((child, depth + 1) for child in node if strings or isinstance(child, dict | list))


def parse_json(raw: bytes) -> Any:
    """The body parsed, every string checked; 400 for bad JSON, bad text or absurd nesting."""
    try:
        data = json.loads(raw)
    except RecursionError:  # nested about a thousand deep: the parser itself gave up
        raise ApiError(400, "too_deep", f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {e}") from None
    _walk(data, strings=_ESCAPE.search(raw) is not None)
    return data


async def read_json(request: Request) -> Any:
    """The request's JSON body, parsed and checked (on a thread when it is large)."""
    raw = await request.body()
    if len(raw) > INLINE_JSON_BYTES:
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)


def check_form(form: FormData) -> None:
    """Every field name, text value and file name of a parsed multipart form."""
    for key, value in form.multi_items():
        check_text(key, "a form field name")
        if isinstance(value, UploadFile):
            check_text(value.filename or "", f"the file name of '{key}'")
        else:
            check_text(value, f"the form field '{key}'")


class TextGuardMiddleware:
    """400 JSON for a request whose path or query string (percent-decoded) holds a NUL or a lone surrogate."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = scope.get("query_string", b"")
            where = "the URL path" if _BAD.search(scope["path"]) else None
            if where is None and b"%" in query and b"\x00" in unquote_to_bytes(query):
                where = "the query string"
            if where is not None:
                await bad_text(where).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
