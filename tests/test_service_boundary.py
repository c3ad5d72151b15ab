"""The HTTP boundary: text no name may hold, absurd JSON, unexpected errors, security headers, the contract.

Every answer here is the API's JSON error body with a 4xx (or 500 for a bug), never a text/plain page: a
NUL byte or a lone surrogate in a URL, a file name, a form field, a JSON string or a job input is refused
with 400 before a worker, a queue or a response encoder can trip over it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import image_bytes, waiting_for_company
from tests.servers import uvicorn_in_thread
from wanwu.config import RecognizeOptions
from wanwu.service import ServeConfig, create_app

pytest.importorskip("fastapi")
Model = tuple[Path, Path]
JSON = {"content-type": "application/json"}


@contextmanager
def serve(model: Model, tmp_path: Path, **config: Any) -> Iterator[httpx.Client]:
    cfg = ServeConfig(model=str(model[0]), labels=model[1], options=RecognizeOptions(decoders=0, cache=False),
                      queue=f"sqlite:///{tmp_path / 'jobs.sqlite3'}", **config)
    with uvicorn_in_thread(create_app(cfg, cache=None)) as base, httpx.Client(base_url=base, timeout=60) as client:
        yield client


def _multipart(*parts: tuple[str, str | None, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart body written by hand, so that names hold exactly the bytes given."""
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += b"--XX\r\nContent-Disposition: " + disposition.encode("utf-8", "surrogatepass") + b"\r\n\r\n"
        body += data + b"\r\n"
    return body + b"--XX--\r\n", {"content-type": "multipart/form-data; boundary=XX"}


def _cases() -> list[tuple[str, str, str, bytes, dict[str, str]]]:
    """(what, method, path, body, headers) of requests that carry a NUL or a lone surrogate."""
    jpeg = image_bytes()
    cases: list[tuple[str, str, str, bytes, dict[str, str]]] = []
    for what, text in (("NUL", "\\u0000"), ("surrogate", "\\ud800"), ("low surrogate", "\\udc80")):
        cases += [
            (f"{what} in a URL to fetch", "POST", "/v1/recognize",
             f'{{"urls": ["http://example.com/a{text}b.jpg"]}}'.encode(), JSON),
            (f"{what} in an image name", "POST", "/v1/recognize",
             f'{{"images": [{{"name": "a{text}.jpg", "data": "AAAA"}}]}}'.encode(), JSON),
            (f"{what} in a job input", "POST", "/v1/jobs", f'{{"inputs": ["/allowed/a{text}b.jpg"]}}'.encode(), JSON),
            (f"{what} in a job option", "POST", "/v1/jobs",
             f'{{"inputs": ["https://example.com/a.jpg"], "score": "soft{text}max"}}'.encode(), JSON),
        ]
    for path in ("/v1/recognize", "/v1/jobs"):
        cases.append((f"NUL in a file name ({path})", "POST", path, *_multipart(("files", "a\x00b.jpg", jpeg))))
    cases.append(("NUL in a job input form field", "POST", "/v1/jobs",
                  *_multipart(("inputs", None, b"/allowed/a\x00b.jpg"), ("files", "ok.jpg", jpeg))))
    for path in ("/v1/jobs/%00", "/v1/jobs/a%00b/results", "/v1/jobs?limit=%00", "/healthz?x=%00"):
        cases.append((f"NUL in the URL {path}", "GET", path, b"", {}))
    return cases


def test_nul_and_lone_surrogates_answer_400_json(tiny_model: Model, tmp_path: Path) -> None:
    wrong: list[str] = []
    with serve(tiny_model, tmp_path) as client:
        for what, method, path, body, headers in _cases():
            response = client.request(method, path, content=body, headers=headers)
            code = response.json()["error"]["code"] if response.headers["content-type"] == "application/json" else ""
            if response.status_code != 400 or code != "invalid_text":
                wrong.append(f"{what}: {response.status_code} {response.headers['content-type']} {response.text[:120]}")
        jobs = client.get("/v1/jobs").json()
        alive = client.get("/healthz").status_code
    assert wrong == []
    assert jobs == []  # nothing poisoned reached the queue
    assert alive == 200


def test_a_valid_surrogate_pair_is_just_a_character(tiny_model: Model, tmp_path: Path) -> None:
    """An emoji written as a JSON surrogate pair (\\ud83d\\udc31) is text like any other."""
    import base64

    data = base64.b64encode(image_bytes()).decode()
    with serve(tiny_model, tmp_path) as client:
        response = client.post("/v1/recognize", headers=JSON,
                               content=f'{{"images": [{{"name": "\\ud83d\\udc31.jpg", "data": "{data}"}}]}}')
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["input"] == "\U0001f431.jpg"


@pytest.mark.parametrize("depth", [40, 1000, 100_000])
def test_json_nested_deep_answers_400_json(tiny_model: Model, tmp_path: Path, depth: int) -> None:
    bodies = {
        "/v1/recognize": '{"urls": ' + "[" * depth + "]" * depth + "}",
        "/v1/jobs": '{"inputs": ["https://example.com/a.jpg"], "top_k": ' + "[" * depth + "]" * depth + "}",
    }
    with serve(tiny_model, tmp_path) as client:
        answers = {path: client.post(path, content=body, headers=JSON) for path, body in bodies.items()}
        bare = client.post("/v1/recognize", content="{" * depth, headers=JSON)  # not even closed
    for path, response in answers.items():
        assert response.status_code == 400, (path, response.status_code, response.text[:200])
        assert response.json()["error"]["code"] == "too_deep", path
    assert bare.status_code == 400 and bare.headers["content-type"] == "application/json", bare.text[:200]


def test_an_unexpected_error_answers_500_json(tiny_model: Model, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug behind a route still answers the API's JSON error body (and is logged), not a text/plain page."""
    from wanwu.service import app as app_module

    async def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module, "parse_recognize", broken)
    with serve(tiny_model, tmp_path) as client:
        response = client.post("/v1/recognize", files=[("files", ("a.jpg", image_bytes(), "image/jpeg"))])
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "internal"


def test_security_headers_and_no_redoc(tiny_model: Model, tmp_path: Path) -> None:
    with serve(tiny_model, tmp_path) as client:
        page, docs, api, static = (client.get(p) for p in ("/", "/docs", "/v1/models", "/static/app.js"))
        redoc = client.get("/redoc")
    for response in (page, docs, api, static):
        assert response.status_code == 200
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    page_csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in page_csp and "unsafe" not in page_csp and "http" not in page_csp
    docs_csp = docs.headers["content-security-policy"]
    assert "script-src 'self' 'sha256-" in docs_csp and "unsafe-eval" not in docs_csp and "http" not in docs_csp
    assert api.headers["content-security-policy"].startswith("default-src 'none'")
    assert redoc.status_code == 404  # it loaded its script from a CDN: gone


def test_the_contract_documents_the_boundary_answers(tiny_model: Model, tmp_path: Path) -> None:
    with serve(tiny_model, tmp_path) as client:
        document = client.get("/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            assert "400" in statuses, (method, path)
            if "requestBody" in operation:
                assert {"408", "413", "503"} <= statuses, (method, path)
    error = document["paths"]["/v1/recognize"]["post"]["responses"]["408"]["content"]["application/json"]
    assert json.dumps(error["schema"]).count("ErrorBody") == 1 and "ErrorBody" in document["components"]["schemas"]


def test_the_upload_rate_settings_are_checked() -> None:
    from wanwu.errors import UsageError

    for field, option in (("body_timeout_s", "--body-timeout"), ("min_upload_kb_s", "--min-upload-rate")):
        with pytest.raises(UsageError, match=option):
            ServeConfig(**{field: 0})


def test_serve_runs_more_decode_processes_than_cores_unless_told() -> None:
    from wanwu.config import CPUS
    from wanwu.service.config import EXTRA_DECODERS

    assert ServeConfig().options.decoders == CPUS + EXTRA_DECODERS  # -j -1: a request's images go one a task
    assert ServeConfig(options=RecognizeOptions(decoders=1)).options.decoders == 1


def test_a_lone_request_is_answered_without_waiting_out_the_batch_delay(
    tiny_model: Model, tmp_path: Path
) -> None:
    """Nothing else is being decoded, so its crop's batch starts at once: with an hour's --max-delay-ms it would
    otherwise wait an hour (the client gives up after a minute)."""
    with serve(tiny_model, tmp_path, max_delay_ms=3_600_000.0) as client:
        for name in ("a.jpg", "b.jpg"):  # one after the other, each alone
            response = client.post("/v1/recognize", files=[("files", (name, image_bytes(), "image/jpeg"))])
            assert response.status_code == 200 and response.json()["results"][0]["status"] == "ok"


def test_a_crop_waiting_for_company_goes_when_the_last_decode_in_flight_fails(
    tiny_model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests at once: the good photo's crop waits in the batcher for the other request's image, whose
    decode then fails, so no crop comes to start the batch. The decode pool's nudge starts it: with an hour's
    --max-delay-ms it would otherwise wait an hour (the client gives up after a minute)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from wanwu.imaging import decode_jobs
    from wanwu.run import _Run

    bad = b"\xff\xd8\xff\xe0" + b"not a JPEG after all" * 50
    cfg = ServeConfig(model=str(tiny_model[0]), labels=tiny_model[1], max_delay_ms=3_600_000.0,
                      options=RecognizeOptions(decoders=0, cache=False),
                      queue=f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    app = create_app(cfg, cache=None)
    bad_decoding, waited = threading.Event(), threading.Event()

    def decode(datas: list[bytes], *args: Any) -> list[Any]:
        if datas != [bad]:  # the good photo is decoded while the bad one is in flight
            bad_decoding.wait(60)
            return decode_jobs(datas, *args)
        bad_decoding.set()
        with contextlib.suppress(AssertionError):  # held until the good crop waits in the batcher for this one
            waiting_for_company(app.state.wanwu.runtime.batcher)
            waited.set()
        return decode_jobs(datas, *args)

    monkeypatch.setattr(_Run, "decode", staticmethod(decode))
    with uvicorn_in_thread(app) as base, httpx.Client(base_url=base, timeout=60) as client, \
            ThreadPoolExecutor(2) as pool:
        def post(name: str, data: bytes) -> httpx.Response:
            return client.post("/v1/recognize", files=[("files", (name, data, "image/jpeg"))])

        failing = pool.submit(post, "bad.jpg", bad)
        good = post("good.jpg", image_bytes())
        assert good.status_code == 200 and good.json()["results"][0]["status"] == "ok"
        result = failing.result(60).json()["results"][0]
        assert result["status"] == "error" and result["error"]["type"] == "decode_error"
    assert waited.is_set()  # the order this test is about did happen


def test_serve_runs_with_the_collector_tuned_for_a_long_run_and_puts_it_back(
    tiny_model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request allocates objects that their reference counts free; with Python's defaults the collector
    also scanned the whole web framework now and then (2-4% of a loaded server's images per second)."""
    import gc

    import uvicorn

    from wanwu.cli.collector import YOUNG_COLLECTION
    from wanwu.cli.main import main

    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: seen.append((gc.get_threshold()[0], gc.get_freeze_count())))
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert main(["serve", "-m", str(tiny_model[0]), "-l", str(tiny_model[1]), "--no-cache", "--port", "0"]) == 0
    assert seen and seen[0][0] >= YOUNG_COLLECTION and seen[0][1] > 0  # frozen; young objects collected less
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen
