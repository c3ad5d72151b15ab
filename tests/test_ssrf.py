"""URL inputs reach only public addresses (wanwu.netguard), within a total deadline, and say nothing else."""

from __future__ import annotations

import http.server
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import image_bytes
from wanwu import netguard
from wanwu.cli.serve import check_exposure
from wanwu.errors import FetchError, InputError, UsageError
from wanwu.fetch import Fetcher
from wanwu.netguard import REFUSED_MESSAGE, is_public
from wanwu.sources import InputItem


class _Site(http.server.BaseHTTPRequestHandler):
    hits: list[str]
    routes: dict[str, tuple[int, dict[str, str], bytes]]
    trickle: int = 0  # send the body one byte at a time, this many bytes

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", str(self.trickle))
            self.end_headers()
            try:
                for _ in range(self.trickle):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            return
        status, headers, body = self.routes.get(self.path, (404, {}, b"no"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def site(host: str = "127.0.0.1", **routes: tuple[int, dict[str, str], bytes]) -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []
    handler = type("H", (_Site,), {"hits": hits, "routes": {f"/{k}": v for k, v in routes.items()},
                                   "trickle": 200})
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _fetch_error(fetcher: Fetcher, url: str) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetcher.fetch(InputItem(url, "url", url))
    return info.value


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.5.5.5", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1",
    "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "2001:db8::1",
])
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


def test_loopback_urls_are_refused_without_a_request_and_without_detail() -> None:
    with site(**{"a.jpg": (200, {}, image_bytes())}) as (base, hits):
        closed_port = _closed_port()
        fetcher = Fetcher(timeout=5)
        try:
            errors = [_fetch_error(fetcher, url) for url in (
                f"{base}/a.jpg", f"http://localhost:{base.rsplit(':', 1)[1]}/a.jpg",
                f"http://127.0.0.1:{closed_port}/", f"http://[::1]:{closed_port}/", "http://169.254.169.254/x",
            )]
        finally:
            fetcher.close()
    assert hits == []  # nothing reached the server
    # A live port, a closed port and the metadata address all answer the same words: nothing to scan with.
    assert {str(e) for e in errors} == {REFUSED_MESSAGE}
    assert all(e.type == "fetch_error" for e in errors)


def test_allow_private_opts_in() -> None:
    jpeg = image_bytes()
    with site(**{"a.jpg": (200, {}, jpeg)}) as (base, hits):
        fetcher = Fetcher(timeout=5, allow_private=True)
        try:
            assert fetcher.fetch(InputItem("a", "url", f"{base}/a.jpg")).data == jpeg
        finally:
            fetcher.close()
    assert hits == ["/a.jpg"]


@pytest.fixture
def loopback_2_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend 127.0.0.2 is a public internet host, so tests can stand one up on this machine."""
    real = netguard.is_public
    monkeypatch.setattr(netguard, "is_public", lambda ip: str(ip) == "127.0.0.2" or real(ip))


@pytest.mark.usefixtures("loopback_2_is_public")
def test_a_redirect_to_a_private_address_is_refused() -> None:
    with site(**{"secret": (200, {}, b"internal")}) as (inner, inner_hits):
        redirect = (302, {"Location": f"{inner}/secret"}, b"")
        with site("127.0.0.2", go=redirect, **{"a.jpg": (200, {}, image_bytes())}) as (outer, outer_hits):
            fetcher = Fetcher(timeout=5)
            try:
                assert fetcher.fetch(InputItem("a", "url", f"{outer}/a.jpg")).data  # the "public" host works
                error = _fetch_error(fetcher, f"{outer}/go")
            finally:
                fetcher.close()
    assert outer_hits == ["/a.jpg", "/go"] and inner_hits == []
    assert str(error) == REFUSED_MESSAGE


@pytest.mark.usefixtures("loopback_2_is_public")
def test_dns_is_resolved_once_and_the_vetted_address_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the first answer is public, any later one private. Only the first may be used."""
    jpeg = image_bytes()
    with site("127.0.0.2", **{"a.jpg": (200, {}, jpeg)}) as (public, public_hits), \
            site(**{"a.jpg": (200, {}, b"internal")}) as (_, private_hits):
        port = int(public.rsplit(":", 1)[1])
        answers = iter(["127.0.0.2"])
        real = socket.getaddrinfo

        def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host == "rebind.example":
                return real(next(answers, "127.0.0.1"), *args, **kwargs)
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        fetcher = Fetcher(timeout=5)
        try:
            assert fetcher.fetch(InputItem("a", "url", f"http://rebind.example:{port}/a.jpg")).data == jpeg
        finally:
            fetcher.close()
    assert public_hits == ["/a.jpg"] and private_hits == []


def test_an_unresolvable_host_answers_like_a_private_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller must not tell an internal DNS name (it resolves, to a private address) from a name that does
    not exist: both answer the same words. With private URLs allowed (the operator's own network), the
    message says what happened."""
    real = socket.getaddrinfo

    def internal_dns(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "intranet.corp.example":
            return real("10.1.2.3", *args, **kwargs)
        if host in ("nothing.corp.example", "empty.corp.example"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", internal_dns)
    fetcher, opted_in = Fetcher(timeout=5), Fetcher(timeout=5, allow_private=True)
    try:
        internal = _fetch_error(fetcher, "http://intranet.corp.example/a.jpg")
        missing = _fetch_error(fetcher, "http://nothing.corp.example/a.jpg")
        told = _fetch_error(opted_in, "http://nothing.corp.example/a.jpg")
    finally:
        fetcher.close()
        opted_in.close()
    assert str(internal) == str(missing) == REFUSED_MESSAGE
    assert internal.type == missing.type == "fetch_error"
    assert "cannot resolve" in str(told)


def test_the_fetch_deadline_is_total_not_per_read() -> None:
    """The server sends a byte every 0.2 s (200 bytes, 40 s): no single read waits 1 s, the whole does."""
    with site() as (base, hits):
        fetcher = Fetcher(timeout=1.0, allow_private=True)
        try:
            error = _fetch_error(fetcher, f"{base}/trickle")
        finally:
            fetcher.close()
    assert hits == ["/trickle"]
    assert "timed out" in str(error)


def test_the_byte_bound_holds_for_urls() -> None:
    with site(**{"big": (200, {}, bytes(5000))}) as (base, _):
        fetcher = Fetcher(max_bytes=1000, timeout=5, allow_private=True)
        try:
            with pytest.raises(Exception, match="above the limit"):
                fetcher.fetch(InputItem("big", "url", f"{base}/big"))
        finally:
            fetcher.close()


def test_serving_beyond_loopback_needs_a_key_or_insecure(capsys: pytest.CaptureFixture[str]) -> None:
    check_exposure("127.0.0.1", (), insecure=False)
    check_exposure("::1", (), insecure=False)
    check_exposure("0.0.0.0", ("k",), insecure=False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        with pytest.raises(UsageError, match="--api-key"):
            check_exposure(host, (), insecure=False)
    check_exposure("0.0.0.0", (), insecure=True)
    assert "WARNING" in capsys.readouterr().err


def test_serve_cli_refuses_to_expose_without_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from wanwu.cli.main import main

    monkeypatch.delenv("WANWU_API_KEYS", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2  # exits before loading anything
    assert "refusing to serve on 0.0.0.0" in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_fifo_path_is_refused_without_blocking(tmp_path: Path) -> None:
    """A worker reading a path must not wait for ever for a writer to open a FIFO."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(outcome, str(fifo)), daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():  # unblock it, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("opening the FIFO blocked")
    assert len(outcome) == 1 and isinstance(outcome[0], FetchError) and "regular file" in str(outcome[0])
    folder = _fetch_error_file(str(tmp_path))
    assert folder.type == "not_found" and "folder" in str(folder)


def _capture(outcome: list[BaseException], path: str) -> None:
    try:
        Fetcher().fetch(InputItem(path, "file", path))
    except Exception as e:
        outcome.append(e)


def _fetch_error_file(path: str) -> InputError:
    with pytest.raises(InputError) as info:
        Fetcher().fetch(InputItem(path, "file", path))
    return info.value
