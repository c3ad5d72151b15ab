"""The HTTP service: records like the CLI's, request errors, the shared batcher, readiness, metrics."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from tests.helpers import WrappedBackend, image_bytes, wait_for
from tests.servers import free_port, metric, static_server, uvicorn_in_thread, wait_ready
from wanwu.cache import MemoryCache, ResultCache
from wanwu.config import RecognizeOptions
from wanwu.engine import Engine
from wanwu.imaging import decode_jobs
from wanwu.netguard import REFUSED_MESSAGE
from wanwu.pipeline import Recognizer
from wanwu.records import RecordOptions
from wanwu.service import ServeConfig, create_app
from wanwu.sources import InputItem

pytest.importorskip("fastapi")
Model = tuple[Path, Path]
_UNSET: Any = object()
RED, GREEN, BLUE = (220, 20, 20), (20, 200, 40), (20, 30, 220)


@contextmanager
def serve(
    model: Model, *, cache: ResultCache | None = None, engine_factory: Callable[[], Engine] | None = None,
    ready: bool = True, options: RecognizeOptions | None = None, **config: Any,
) -> Iterator[tuple[str, Any]]:
    cfg = ServeConfig(
        model=str(model[0]), labels=model[1], options=options or RecognizeOptions(decoders=0, cache=False),
        **config,
    )
    extra = {} if cache is _UNSET else {"cache": cache}  # _UNSET: the cache the options name
    app = create_app(cfg, engine_factory=engine_factory, **extra)
    with uvicorn_in_thread(app, ready=ready) as base:
        yield base, app


def cli_records(model: Model, named: list[tuple[str, bytes]], **shape: Any) -> list[dict[str, Any]]:
    """What the library (and so the CLI) says for the same bytes."""
    opts = RecognizeOptions(decoders=0, cache=False)
    with Recognizer(str(model[0]), labels=model[1], options=opts, cache=None) as rec:
        items = [InputItem.from_bytes(n, d) for n, d in named]
        return [r.to_dict() for r in rec.recognize(items, RecordOptions(**shape))]


def files(*named: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


class SlowBackend(WrappedBackend):
    def __init__(self, inner: Any, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        time.sleep(self.delay)
        result: npt.NDArray[np.float32] = self.inner.infer(batch)
        return result


def slow_engine(model: Model, delay: float) -> Callable[[], Engine]:
    def load() -> Engine:
        engine = Engine.load(str(model[0]), model[1])
        engine.backend = SlowBackend(engine.backend, delay)
        return engine

    return load


# --- records -----------------------------------------------------------------------------------------------


def test_multipart_records_match_the_cli_in_request_order(tiny_model: Model) -> None:
    named = [
        ("red.jpg", image_bytes(RED)),
        ("notes.txt", "这不是图片".encode()),
        ("blue.png", image_bytes(BLUE, fmt="PNG")),
        ("empty.jpg", b""),
        ("cut.jpg", image_bytes(GREEN)[:300]),
        ("green.webp", image_bytes(GREEN, fmt="WEBP")),
    ]
    with serve(tiny_model) as (base, _):
        response = httpx.post(f"{base}/v1/recognize", files=files(*named), timeout=30)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["input"] for r in results] == [n for n, _ in named]
    assert [r["status"] for r in results] == ["ok", "error", "ok", "error", "error", "ok"]
    assert results == cli_records(tiny_model, named)
    assert [r["predictions"][0]["label"] for r in results if r["status"] == "ok"] != ["红"] * 3


def test_top_k_field_and_its_validation(tiny_model: Model) -> None:
    with serve(tiny_model) as (base, _):
        post = lambda top_k: httpx.post(  # noqa: E731
            f"{base}/v1/recognize", files=files(("a.jpg", image_bytes())), data={"top_k": top_k}, timeout=30
        )
        ok = post("3")
        bad = [post(v) for v in ("0", "51", "many")]
    assert ok.status_code == 200
    assert len(ok.json()["results"][0]["predictions"]) == 3
    for response in bad:
        assert response.status_code == 422
        assert "top_k" in response.json()["error"]["message"]


def test_base64_images_in_a_json_body(tiny_model: Model) -> None:
    red, blue = image_bytes(RED), image_bytes(BLUE, fmt="PNG")
    body = {
        "images": [
            base64.b64encode(red).decode(),
            {"name": "blue.png", "data": "data:image/png;base64," + base64.b64encode(blue).decode()},
            "%%% not base64 %%%",
        ],
        "top_k": 2,
    }
    with serve(tiny_model) as (base, _):
        response = httpx.post(f"{base}/v1/recognize", json=body, timeout=30)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["input"] for r in results] == ["images[0]", "blue.png", "images[2]"]
    assert results[:2] == cli_records(tiny_model, [("images[0]", red), ("blue.png", blue)], top_k=2)
    assert results[2]["status"] == "error" and results[2]["error"]["type"] == "decode_error"


def test_urls_are_downloaded_by_the_server(tiny_model: Model, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    green = image_bytes(GREEN)
    (site / "green.jpg").write_bytes(green)
    opts = RecognizeOptions(decoders=0, cache=False, allow_private_urls=True)
    with static_server(site) as web, serve(tiny_model, options=opts) as (base, _):
        urls = [f"{web}/green.jpg", f"{web}/missing.jpg", "file:///etc/passwd", f"{web}/green.jpg"]
        response = httpx.post(f"{base}/v1/recognize", json={"urls": urls}, timeout=30)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["input"] for r in results] == urls
    assert [r["status"] for r in results] == ["ok", "error", "error", "ok"]
    assert results[0] == cli_records(tiny_model, [(urls[0], green)])[0] == results[3]
    assert results[1]["error"]["type"] == "not_found"
    assert results[2]["error"]["type"] == "unsupported"


def test_urls_on_this_machine_are_refused_by_default(tiny_model: Model, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "green.jpg").write_bytes(image_bytes(GREEN))
    with static_server(site) as web, serve(tiny_model) as (base, _):
        urls = [f"{web}/green.jpg", f"{web}/missing.jpg", f"{base}/healthz", "http://169.254.169.254/latest"]
        results = httpx.post(f"{base}/v1/recognize", json={"urls": urls}, timeout=30).json()["results"]
    assert [r["status"] for r in results] == ["error"] * 4
    # Present or absent, live or not: the same words, so a caller learns nothing about the network.
    assert {r["error"]["message"] for r in results} == {REFUSED_MESSAGE}


def test_a_hanging_url_does_not_stall_uploads(tiny_model: Model) -> None:
    """URL downloads have a pool of their own: with every download thread waiting on a slow server, an
    upload in another request is still read, hashed and answered."""
    from tests.jobs_support import image_server

    opts = RecognizeOptions(decoders=0, cache=False, fetch_threads=1, allow_private_urls=True)
    with image_server() as slow, serve(tiny_model, options=opts) as (base, _), ThreadPoolExecutor(1) as pool:
        hanging = pool.submit(httpx.post, f"{base}/v1/recognize", json={"urls": [f"{slow.url}/slow.jpg"]},
                              timeout=90)
        assert slow.slow_hit.wait(30)
        upload = httpx.post(f"{base}/v1/recognize", files=files(("a.jpg", image_bytes())), timeout=90)
        still_waiting = not hanging.done()
        slow.release()
        assert hanging.result().status_code == 200
    assert upload.status_code == 200 and upload.json()["results"][0]["status"] == "ok"
    assert still_waiting


def test_no_urls_turns_url_inputs_off(tiny_model: Model) -> None:
    with serve(tiny_model, allow_urls=False) as (base, _):
        results = httpx.post(f"{base}/v1/recognize", json={"urls": ["https://example.org/a.jpg"]},
                             timeout=30).json()["results"]
    assert results[0]["error"] == {"type": "unsupported", "message": "this server does not fetch URLs (--no-urls)"}


# --- request-level errors ----------------------------------------------------------------------------------


def test_malformed_requests_are_4xx_json(tiny_model: Model) -> None:
    with serve(tiny_model) as (base, _):
        url = f"{base}/v1/recognize"
        cases = {
            "bad json": httpx.post(url, content=b"{nope", headers={"content-type": "application/json"}),
            "unknown field": httpx.post(url, json={"pictures": []}),
            "both": httpx.post(url, json={"urls": ["http://x/a.jpg"], "images": ["AAAA"]}),
            "nothing": httpx.post(url, json={}),
            "wrong type": httpx.post(url, json={"urls": "http://x/a.jpg"}),
            "no files": httpx.post(url, data={"top_k": "3"}, files=[("other", ("a.jpg", b"x"))]),
            "text body": httpx.post(url, content=b"hello", headers={"content-type": "text/plain"}),
            "no route": httpx.get(f"{base}/v9/nothing"),  # (/v2 is the Open Inference Protocol's)
        }
    expected = {"bad json": 400, "text body": 415, "no route": 404}
    for name, response in cases.items():
        assert response.status_code == expected.get(name, 422), (name, response.text)
        error = response.json()["error"]
        assert error["message"] and error["code"], name


def test_uploads_over_the_limit_get_413(tiny_model: Model) -> None:
    big = np.random.default_rng(0).integers(0, 255, 60_000, dtype=np.uint8).tobytes()

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    with serve(tiny_model, max_upload_mb=0.03) as (base, _):
        url = f"{base}/v1/recognize"
        declared = httpx.post(url, files=files(("big.jpg", big)), timeout=30)
        json_type = {"content-type": "application/json"}
        streamed = httpx.post(url, content=chunked(), headers=json_type, timeout=30)
        small = httpx.post(url, files=files(("small.jpg", image_bytes(size=(64, 48)))), timeout=30)
        too_many = httpx.post(url, files=files(*[(f"{i}.jpg", b"x") for i in range(70)]), timeout=30)
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert "0.03 MB" in response.json()["error"]["message"]
    assert small.status_code == 200
    assert too_many.status_code == 413
    assert too_many.json()["error"]["code"] == "too_many_files"


def test_bytes_in_flight_are_bounded(tiny_model: Model) -> None:
    """Two bodies of 0.6 MB may not be held at once under a 1 MB budget: the second gets 503 + Retry-After
    while the first is still arriving (all but its last KB received), and goes through once the first is done."""
    import socket

    photo = image_bytes(size=(64, 48))
    padded = base64.b64encode(photo).decode() + " " * 600_000  # white space in base64 is skipped
    payload = json.dumps({"images": [padded]}).encode()
    with serve(tiny_model, max_upload_mb=0.9, max_inflight_mb=1.0) as (base, _):
        host, port = base.removeprefix("http://").split(":")
        head = (f"POST /v1/recognize HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
        with socket.create_connection((host, int(port)), timeout=30) as slow:
            slow.sendall(head + payload[:-1000])  # the first request holds what it sent, body unfinished
            wait_for_metric(base, "wanwu_request_body_bytes_in_flight", len(payload) - 1000)
            second = httpx.post(f"{base}/v1/recognize", content=payload,
                                headers={"content-type": "application/json"}, timeout=30)
            slow.sendall(payload[-1000:])
            first = b""
            while chunk := slow.recv(65536):
                first += chunk
        again = httpx.post(f"{base}/v1/recognize", content=payload, headers={"content-type": "application/json"},
                           timeout=30)
    assert second.status_code == 503, second.text
    assert second.headers["retry-after"] == "1" and second.json()["error"]["code"] == "busy"
    assert first.startswith(b"HTTP/1.1 200"), first[:200]
    assert again.status_code == 200 and again.json()["results"][0]["status"] == "ok"


def wait_for_metric(base: str, name: str, value: float) -> None:
    deadline = time.monotonic() + 30
    while metric(httpx.get(f"{base}/metrics").text, name) < value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


def test_api_keys(tiny_model: Model) -> None:
    with serve(tiny_model, api_keys=("s3cret", "other-key")) as (base, _):
        url = f"{base}/v1/recognize"
        body = files(("a.jpg", image_bytes()))
        none = httpx.post(url, files=body)
        wrong = httpx.post(url, files=body, headers={"Authorization": "Bearer nope"})
        bearer = httpx.post(url, files=body, headers={"Authorization": "Bearer s3cret"})
        header = httpx.post(url, files=body, headers={"X-API-Key": "other-key"})
        models = httpx.get(f"{base}/v1/models")
        health = httpx.get(f"{base}/healthz")
    for response in (none, wrong, models):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["error"]["message"]
    assert bearer.status_code == header.status_code == health.status_code == 200


def test_a_full_queue_answers_503_with_retry_after(tiny_model: Model) -> None:
    limits: dict[str, Any] = {"max_queue": 1, "max_batch_size": 1, "max_delay_ms": 0}
    with serve(tiny_model, engine_factory=slow_engine(tiny_model, 0.6), **limits) as (base, _):
        def post(i: int) -> httpx.Response:
            return httpx.post(f"{base}/v1/recognize", files=files((f"{i}.jpg", image_bytes())), timeout=60)

        with ThreadPoolExecutor(5) as pool:
            responses = list(pool.map(post, range(5)))
        text = httpx.get(f"{base}/metrics").text
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    assert set(codes) == {200, 503}
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "queue_full"
    assert metric(text, "wanwu_queue_rejections_total") == codes.count(503)


# --- batching, cache, readiness, metrics -------------------------------------------------------------------


def test_concurrent_requests_share_batches(tiny_model: Model) -> None:
    colors = [(i * 15 % 255, 255 - i * 15, (i * 40) % 255) for i in range(16)]
    named = [(f"{i}.png", image_bytes(c, fmt="PNG")) for i, c in enumerate(colors)]
    # A slightly slow model makes requests arrive while a batch runs, as under real load.
    factory = slow_engine(tiny_model, 0.05)
    with serve(tiny_model, engine_factory=factory, max_delay_ms=50, max_batch_size=32) as (base, app):
        barrier = threading.Barrier(16)

        def post(item: tuple[str, bytes]) -> httpx.Response:
            barrier.wait()
            return httpx.post(f"{base}/v1/recognize", files=files(item), timeout=60)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(post, named))
        text = httpx.get(f"{base}/metrics").text
        batches = app.state.wanwu.runtime.batcher.batches
    assert [r.status_code for r in responses] == [200] * 16
    expected = cli_records(tiny_model, named)
    assert [r.json()["results"][0] for r in responses] == expected  # each got its own answer
    assert metric(text, "wanwu_batch_size_sum") == 16
    assert metric(text, "wanwu_batch_size_count") == batches
    assert batches < 16, f"16 concurrent requests ran as {batches} batches"


def test_the_result_cache_is_consulted(tiny_model: Model) -> None:
    cache = MemoryCache()
    with serve(tiny_model, cache=cache) as (base, app):
        body = files(("a.jpg", image_bytes(RED)))
        first = httpx.post(f"{base}/v1/recognize", files=body).json()
        second = httpx.post(f"{base}/v1/recognize", files=files(("again.jpg", image_bytes(RED)))).json()
        text = httpx.get(f"{base}/metrics").text
        batches = app.state.wanwu.runtime.batcher.batches
    assert metric(text, "wanwu_cache_hits_total") == 1
    assert batches == 1
    assert {**second["results"][0], "input": "a.jpg"} == first["results"][0]
    with Recognizer(engine=slow_engine(tiny_model, 0.0)(), options=RecognizeOptions(cache=False)) as rec:
        assert rec.cache is None  # --no-cache: no cache at all


class ThreadBoundCache(MemoryCache):
    """Like a sqlite connection: usable only on the thread that opened it."""

    opened: ClassVar[list[ThreadBoundCache]] = []

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.calls = 0
        ThreadBoundCache.opened.append(self)

    def _check(self) -> None:
        if threading.get_ident() != self.thread:
            raise RuntimeError("used from another thread")
        self.calls += 1

    def get_many(self, namespace: str, keys: list[str]) -> dict[str, Any]:
        self._check()
        return super().get_many(namespace, keys)

    def put_many(self, namespace: str, items: Any) -> None:
        self._check()
        super().put_many(namespace, items)


def test_the_configured_cache_is_opened_and_used_on_one_thread(
    tiny_model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("wanwu.pipeline.open_cache", lambda options: ThreadBoundCache())
    ThreadBoundCache.opened.clear()
    options = RecognizeOptions(decoders=0, cache=True)
    with serve(tiny_model, cache=_UNSET, options=options) as (base, _):
        body = files(("a.jpg", image_bytes(GREEN)))
        responses = [httpx.post(f"{base}/v1/recognize", files=body) for _ in range(3)]
        text = httpx.get(f"{base}/metrics").text
    assert [r.status_code for r in responses] == [200] * 3
    (cache,) = ThreadBoundCache.opened
    assert cache.calls == 4  # three lookups, one store
    assert metric(text, "wanwu_cache_hits_total") == 2


def test_a_missing_cache_backend_says_use_no_cache(
    tiny_model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wanwu.cache import CACHES

    monkeypatch.setitem(sys.modules, "wanwu.cache.sqlite", None)  # importing it raises ImportError
    # as on a Python without sqlite3: the registry has not loaded its opener (an earlier test may have)
    monkeypatch.delitem(CACHES._entries, "sqlite")  # (put back after the test)
    CACHES.lazy("sqlite", "wanwu.cache.sqlite:open_location")
    with serve(tiny_model, cache=_UNSET, options=RecognizeOptions(decoders=0), ready=False) as (base, _):
        deadline = time.monotonic() + 120
        while (ready := httpx.get(f"{base}/readyz")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert ready.json()["status"] == "failed" and "--no-cache" in ready.json()["message"]


def test_readyz_is_503_until_the_model_is_loaded(tiny_model: Model) -> None:
    release = threading.Event()
    real = slow_engine(tiny_model, 0.0)

    def blocked() -> Engine:
        release.wait(30)
        return real()

    with serve(tiny_model, engine_factory=blocked, ready=False) as (base, _):
        before = httpx.get(f"{base}/readyz")
        early = httpx.post(f"{base}/v1/recognize", files=files(("a.jpg", image_bytes())))
        health = httpx.get(f"{base}/healthz")
        release.set()
        wait_ready(base, timeout=30)
        after = httpx.get(f"{base}/readyz")
        models = httpx.get(f"{base}/v1/models")
    assert before.status_code == 503 and before.json()["status"] == "loading"
    assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
    assert health.status_code == 200
    assert after.status_code == 200 and after.json()["status"] == "ready"
    info = models.json()["models"][0]
    assert info["num_classes"] == 10 and info["labels_sample"][0] == "红"


def test_a_model_that_fails_to_load_is_reported(tiny_model: Model, tmp_path: Path) -> None:
    def broken() -> Engine:
        raise OSError("disk on fire")

    with serve(tiny_model, engine_factory=broken, ready=False) as (base, _):
        wait_for(lambda: httpx.get(f"{base}/readyz").json()["status"] != "loading", 60, "the load to end")
        ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "failed" and "disk on fire" in ready.json()["message"]


def test_metrics_openapi_docs_and_page(tiny_model: Model) -> None:
    with serve(tiny_model) as (base, _):
        httpx.post(f"{base}/v1/recognize", files=files(("a.jpg", image_bytes()), ("b.txt", b"text")))
        httpx.post(f"{base}/v1/recognize", json={})
        text = httpx.get(f"{base}/metrics").text
        openapi = httpx.get(f"{base}/openapi.json").json()
        docs = httpx.get(f"{base}/docs")
        docs_js = httpx.get(f"{base}/docs-assets/swagger-ui-bundle.js")
        page = httpx.get(f"{base}/")
        script = httpx.get(f"{base}/static/app.js")
        style = httpx.get(f"{base}/static/app.css")
    assert metric(text, "wanwu_http_requests_total", 'method="POST",path="/v1/recognize",status="200"') == 1
    assert metric(text, "wanwu_http_request_errors_total", 'path="/v1/recognize",status="422"') == 1
    assert metric(text, "wanwu_http_request_duration_seconds_count", 'path="/v1/recognize"') == 2
    assert metric(text, "wanwu_images_total", 'status="ok"') == 1
    assert metric(text, "wanwu_images_total", 'status="error"') == 1
    assert metric(text, "wanwu_image_errors_total", 'type="unsupported"') == 1
    assert metric(text, "wanwu_batch_size_count") == 1
    for name in ("wanwu_queue_depth", "wanwu_batch_duration_seconds_bucket", "wanwu_ready 1.0"):
        assert name in text
    body = openapi["paths"]["/v1/recognize"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert {"/v1/models", "/healthz", "/readyz", "/metrics"} <= set(openapi["paths"])
    assert docs.status_code == 200 and "openapi.json" in docs.text
    assert "/docs-assets/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text  # offline docs
    assert docs_js.status_code == 200 and "SwaggerUIBundle" in docs_js.text
    assert page.status_code == 200 and "万物识别" in page.text and "选择图片" in page.text
    for asset in (page, script, style):  # works offline: nothing loaded from elsewhere
        assert "//cdn" not in asset.text and "https://" not in asset.text and "http://" not in asset.text
    assert script.status_code == style.status_code == 200


def test_decoding_in_worker_processes(tiny_model: Model) -> None:
    named = [("a.jpg", image_bytes(RED)), ("b.bin", b"\x00" * 100), ("c.png", image_bytes(BLUE, fmt="PNG"))]
    with serve(tiny_model, options=RecognizeOptions(decoders=1, cache=False)) as (base, _):
        response = httpx.post(f"{base}/v1/recognize", files=files(*named), timeout=60)
    assert response.json()["results"] == cli_records(tiny_model, named)


def crashing_decode(datas: list[bytes], spec: Any, max_pixels: int) -> Any:
    """Decodes like wanwu, except that a file starting with CRASH kills the worker process outright."""
    if any(data.startswith(b"CRASH") for data in datas):
        os._exit(1)
    return decode_jobs(datas, spec, max_pixels)


@pytest.mark.slow
def test_a_decoder_crash_costs_only_its_own_file(tiny_model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    good = [(f"{i}.png", image_bytes((RED, GREEN, BLUE)[i % 3], size=(60 + i, 50), fmt="PNG")) for i in range(10)]
    named = [*good[:3], ("bad1.jpg", b"CRASH" + image_bytes()), *good[3:8], ("bad2.jpg", b"CRASH"), *good[8:]]
    monkeypatch.setattr("wanwu.pipeline._Run.decode", staticmethod(crashing_decode))
    with serve(tiny_model, options=RecognizeOptions(decoders=2, cache=False)) as (base, _):
        response = httpx.post(f"{base}/v1/recognize", files=files(*named), timeout=60)
        again = httpx.post(f"{base}/v1/recognize", files=files(*good[:2]), timeout=60)  # the service lives on
    results = response.json()["results"]
    assert [r["input"] for r in results] == [name for name, _ in named]
    expected = {r["input"]: r for r in cli_records(tiny_model, good)}
    for r in results:
        if r["input"].startswith("bad"):
            assert r["error"]["type"] == "decode_error" and "crashed" in r["error"]["message"]
        else:
            assert r == expected[r["input"]]
    assert again.json()["results"] == cli_records(tiny_model, good[:2])


@pytest.mark.shared
def test_real_photos_with_mobilenet(mobilenet: Model, photos: Path) -> None:
    chosen = sorted(photos.iterdir())[:3]
    named = [(p.name, p.read_bytes()) for p in chosen]
    with serve(mobilenet, max_batch_size=8) as (base, _):
        response = httpx.post(f"{base}/v1/recognize", files=files(*named), data={"top_k": "5"}, timeout=60)
    results = response.json()["results"]
    assert results == cli_records(mobilenet, named)
    for record in results:
        assert record["status"] == "ok" and len(record["predictions"]) == 5
        assert all(any("\u4e00" <= ch <= "\u9fff" for ch in p["label"]) for p in record["predictions"])


# --- the command -------------------------------------------------------------------------------------------


def _wanwu(*args: str) -> list[str]:
    return [sys.executable, "-c", "from wanwu.cli.main import run; run()", *args]


def test_serve_command_help() -> None:
    out = subprocess.run(_wanwu("serve", "--help"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    flags = ("--max-batch-size", "--max-delay-ms", "--max-queue", "--max-upload-mb", "--api-key", "--port")
    for flag in flags:
        assert flag in out.stdout


def test_serve_command_runs_and_stops(tiny_model: Model) -> None:
    port = free_port()
    model = ("-m", str(tiny_model[0]), "-l", str(tiny_model[1]))
    args = ("serve", *model, "--port", str(port), "--no-cache", "-j", "0")
    proc = subprocess.Popen(_wanwu(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=60, proc=proc)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/recognize", files=files(("a.jpg", image_bytes())))
        assert response.json()["results"][0]["status"] == "ok"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says how it ended.
    assert proc.returncode in (0, -15), err
    assert "shutdown complete" in err


def test_serve_command_serves_with_a_short_thread_switch_interval(
    tiny_model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interpreter lock passes every millisecond while the server runs (its threads wait less for it), and the
    process's own setting is back once it stops."""
    import uvicorn
    from click.testing import CliRunner

    from wanwu.cli.main import cli
    from wanwu.service.config import SWITCH_INTERVAL_S

    seen: list[float] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: seen.append(sys.getswitchinterval()))
    before = sys.getswitchinterval()
    logger = logging.getLogger("wanwu")
    level = logger.level
    try:
        result = CliRunner().invoke(cli, ["serve", "-m", str(tiny_model[0]), "-l", str(tiny_model[1]), "--no-cache",
                                          "--port", str(free_port())])
    finally:
        logger.setLevel(level)  # the command sets the wanwu log to INFO for its own process
    assert result.exit_code == 0, result.output
    assert seen == [SWITCH_INTERVAL_S] and before > SWITCH_INTERVAL_S
    assert sys.getswitchinterval() == before


def test_serve_command_exits_when_the_model_cannot_load(tmp_path: Path) -> None:
    port = str(free_port())
    out = subprocess.run(
        _wanwu("serve", "-m", str(tmp_path / "none.onnx"), "--port", port, "--no-cache"),
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert "none.onnx" in out.stderr


def test_jobs_api_mounted_with_queue(tiny_model: Model, tmp_path: Path) -> None:
    """`wanwu serve --queue URL` serves /v1/jobs; without it the route does not exist."""
    queue = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    with serve(tiny_model, queue=queue) as (base, _):
        created = httpx.post(f"{base}/v1/jobs", json={"inputs": ["https://127.0.0.1:9/a.jpg"]}, timeout=30)
        assert created.status_code in (200, 201), created.text
        job_id = created.json()["id"]
        status = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()
        assert status["total"] == 1 and status["state"] in ("queued", "running")
    with serve(tiny_model) as (base, _):
        assert httpx.get(f"{base}/v1/jobs/x", timeout=30).status_code == 404
    with serve(tiny_model, queue=queue, api_keys=("s3cret",)) as (base, _):  # keys guard the jobs API too
        assert httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).status_code == 401
        assert httpx.post(f"{base}/v1/jobs", json={"inputs": ["https://127.0.0.1:9/b.jpg"]}, timeout=30
                          ).status_code == 401
        keyed = httpx.get(f"{base}/v1/jobs/{job_id}", headers={"X-API-Key": "s3cret"}, timeout=30)
        assert keyed.status_code == 200 and keyed.json()["id"] == job_id
