"""/docs in a real headless Chromium: Swagger UI 5 reads the OpenAPI 3.1 document and lists every operation,
with nothing loaded from outside the server (every other request is blocked)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.servers import uvicorn_in_thread
from tests.test_web import CHROMIUM, CHROMIUM_ARGS, _require_browser
from wanwu.config import RecognizeOptions
from wanwu.service import ServeConfig, create_app

pytestmark = [pytest.mark.slow]

_OPERATIONS_JS = """
() => Array.from(document.querySelectorAll('.opblock')).map((op) => [
  op.querySelector('.opblock-summary-method').innerText.trim().toLowerCase(),
  op.querySelector('.opblock-summary-path').innerText.replace(/\\u200b/g, '').trim(),
])
"""


def test_docs_lists_every_operation_offline(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    _require_browser()
    from playwright.sync_api import sync_playwright

    config = ServeConfig(
        model=str(tiny_model[0]), labels=tiny_model[1], options=RecognizeOptions(decoders=0, cache=False),
        queue=f"sqlite:///{tmp_path / 'jobs.sqlite3'}", api_keys=("k",),
    )
    with uvicorn_in_thread(create_app(config, cache=None)) as base:
        document = httpx.get(f"{base}/openapi.json").json()
        expected = sorted([m, p] for p, ops in document["paths"].items() for m in ops)
        outside: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()

                def only_local(route: object) -> None:
                    url = route.request.url  # type: ignore[attr-defined]
                    if url.startswith(base):
                        route.continue_()  # type: ignore[attr-defined]
                    else:
                        outside.append(url)
                        route.abort()  # type: ignore[attr-defined]

                page.route("**/*", only_local)
                refused: list[str] = []  # what the page's Content-Security-Policy blocked
                page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
                page.goto(f"{base}/docs")
                page.wait_for_selector(".opblock", timeout=30_000)
                listed = sorted(page.evaluate(_OPERATIONS_JS))
                text = page.inner_text("body")
                authorize = page.locator(".btn.authorize").count()
            finally:
                browser.close()
    assert document["openapi"].startswith("3.1")
    assert listed == expected and len(listed) >= 20, listed  # /v1, jobs and the /v2 protocol
    assert "valid version field" not in text and "Unable to render" not in text
    assert authorize == 1  # the API-key schemes are shown
    assert outside == []
    assert refused == []
