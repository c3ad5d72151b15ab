"""Security headers: every response says nosniff and may not be framed; each HTML page has its own CSP.

The web page and /docs load only their own scripts, styles and images from this server (nothing from
outside: the service works offline); every other response gets ``default-src 'none'``, since none of them
is meant to run anything.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_COMMON = "base-uri 'none'; object-src 'none'; frame-ancestors 'none'; form-action 'self'"
# The page: its script and style files, previews of the chosen files (blob:), requests to this server.
PAGE_CSP = f"default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; {_COMMON}"
API_CSP = "default-src 'none'; frame-ancestors 'none'"


def docs_csp(html: str) -> str:
    """A CSP for Swagger UI's page: its assets from this server, and its one inline script by hash."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    )
    return (f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
            f"img-src 'self' data:; connect-src 'self'; {_COMMON}")


class SecurityHeadersMiddleware:
    """Adds ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``, ``Referrer-Policy`` and, where a
    route set none, the API's ``Content-Security-Policy``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("Content-Security-Policy", API_CSP)
            await send(message)

        await self.app(scope, receive, with_headers)
