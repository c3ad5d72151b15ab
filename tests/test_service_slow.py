"""Slow and heavy callers must not starve the others: a live server and a concurrent probe client.

* uploads that declare a big Content-Length and then trickle hold only what they sent, and are cut off
  (408) once they fall below the minimum rate;
* a large JSON body is parsed off the event loop: other requests keep being answered meanwhile;
* URL downloads count against --max-inflight-mb like request bodies.

Outcomes are asserted (the probe got 200, the trickler got 408), and the one timing is relative: a probe's
worst wait against what parsing the same body costs in this very process.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import image_bytes
from tests.servers import metric, static_server, uvicorn_in_thread
from wanwu.config import RecognizeOptions
from wanwu.service import ServeConfig, create_app

pytest.importorskip("fastapi")
Model = tuple[Path, Path]
IN_FLIGHT = "wanwu_request_body_bytes_in_flight"


@contextmanager
def serve(model: Model, options: RecognizeOptions | None = None, **config: Any) -> Iterator[str]:
    cfg = ServeConfig(model=str(model[0]), labels=model[1],
                      options=options or RecognizeOptions(decoders=0, cache=False), **config)
    with uvicorn_in_thread(create_app(cfg, cache=None)) as base:
        yield base


def _held(base: str) -> float:
    return metric(httpx.get(f"{base}/metrics", timeout=30).text, IN_FLIGHT)


def _wait_held(base: str, at_least: float) -> None:
    deadline = time.monotonic() + 60
    while _held(base) < at_least:
        assert time.monotonic() < deadline, f"{IN_FLIGHT} never reached {at_least}"
        time.sleep(0.05)


def _open_upload(base: str, declared: int, first: bytes) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"POST /v1/recognize HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {declared}\r\n\r\n".encode() + first)
    return sock


def test_trickling_uploads_do_not_starve_other_callers(tiny_model: Model) -> None:
    """Four uploads declare the whole upload limit each (together the whole in-flight budget) and send one
    byte: every probe request meanwhile is still answered 200 with its record."""
    photo = image_bytes()
    with serve(tiny_model, max_upload_mb=1.0, max_inflight_mb=4.0) as base:
        tricklers = [_open_upload(base, 1024 * 1024, b"{") for _ in range(4)]
        try:
            _wait_held(base, 4)  # every trickler's request is in the server, its first byte read
            with httpx.Client(base_url=base, timeout=60) as probe:
                answers = [probe.post("/v1/recognize", files=[("files", (f"p{i}.jpg", photo, "image/jpeg"))])
                           for i in range(20)]
            held = _held(base)
        finally:
            for sock in tricklers:
                sock.close()
    assert [a.status_code for a in answers] == [200] * 20, {a.status_code: a.text[:200] for a in answers}
    assert all(a.json()["results"][0]["status"] == "ok" for a in answers)
    assert held < 1024  # the tricklers hold the bytes they sent, not what they declared


def test_an_upload_below_the_minimum_rate_gets_408_and_lets_go(tiny_model: Model) -> None:
    """A body that keeps sending, a byte at a time, but far below --min-upload-rate is answered 408 once its
    time is up (--body-timeout, plus a second per KB received), and its bytes are released."""
    with serve(tiny_model, body_timeout_s=2.0, min_upload_kb_s=1.0) as base:
        sock = _open_upload(base, 100_000, b'{"images": ["')
        answer = b""
        with sock:
            started = time.monotonic()
            while time.monotonic() - started < 120:
                readable, _, _ = select.select([sock], [], [], 0.5)  # the answer, or half a second: a byte
                if readable:
                    chunk = sock.recv(65536)
                    answer += chunk
                    if not chunk:
                        break
                    continue
                try:
                    sock.sendall(b"A")
                except OSError:  # the server closed after answering: read what it said
                    continue
        held = _held(base)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert json.loads(body)["error"]["code"] == "body_timeout"
    assert held == 0


def test_a_large_json_job_does_not_stall_other_requests(
    tiny_model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/v1/jobs with 200,000 inputs: the body is parsed and checked on threads, never on the event loop (which
    would hold every other request that long), and /healthz keeps answering meanwhile."""
    import asyncio

    from wanwu.jobs import http as jobs_http
    from wanwu.service import guard

    on_loop: dict[str, bool] = {}

    def recorded(name: str, fn: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop[name] = True
            except RuntimeError:  # no loop running in this thread: a worker thread
                on_loop.setdefault(name, False)
            return fn(*args)

        return wrapper

    monkeypatch.setattr(guard, "parse_json", recorded("parse", guard.parse_json))
    monkeypatch.setattr(jobs_http, "_json_spec", recorded("check", jobs_http._json_spec))
    inputs = [f"https://example.com/photos/folder-{i:07d}/photo-{i:07d}.jpg" for i in range(200_000)]
    raw = json.dumps({"inputs": inputs}).encode()
    probes = 0
    done = threading.Event()
    result: dict[str, Any] = {}

    def submit(base: str) -> None:
        try:
            result["response"] = httpx.post(f"{base}/v1/jobs", content=raw, timeout=300,
                                            headers={"content-type": "application/json"})
        finally:
            done.set()

    with serve(tiny_model, queue=f"sqlite:///{tmp_path / 'jobs.sqlite3'}", max_upload_mb=100) as base:
        thread = threading.Thread(target=submit, args=(base,))
        with httpx.Client(base_url=base, timeout=60) as probe:
            thread.start()
            while not done.is_set():
                assert probe.get("/healthz").status_code == 200
                probes += 1
        thread.join()
    assert result["response"].status_code == 201, result["response"].text[:300]
    assert on_loop == {"parse": False, "check": False}  # both ran, each on a thread
    assert probes >= 1


def test_url_downloads_count_against_the_inflight_budget(tiny_model: Model, tmp_path: Path) -> None:
    """Under a 1 MB budget, two URLs of 0.6 MB each cannot both be held: one becomes an error record that says
    so; the budget is free again when the request ends, so the same URL alone then goes through."""
    big = image_bytes() + b"\0" * 600_000  # a JPEG with trailing bytes: still decodes
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(big)
    options = RecognizeOptions(decoders=0, cache=False, allow_private_urls=True)
    with static_server(tmp_path) as site, serve(tiny_model, options, max_upload_mb=1.0, max_inflight_mb=1.0) as base:
        both = httpx.post(f"{base}/v1/recognize", json={"urls": [f"{site}/a.jpg", f"{site}/b.jpg"]}, timeout=60)
        held = _held(base)
        alone = httpx.post(f"{base}/v1/recognize", json={"urls": [f"{site}/b.jpg"]}, timeout=60)
    records = both.json()["results"]
    refused = [r for r in records if r["status"] == "error" and "--max-inflight-mb" in r["error"]["message"]]
    assert refused, records
    assert all(r["error"]["type"] == "fetch_error" for r in refused)
    assert held == 0
    assert alone.json()["results"][0]["status"] == "ok", alone.text[:300]
