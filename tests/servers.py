"""Test helpers for the HTTP service: free ports, uvicorn in a thread, a static file server, metrics."""

from __future__ import annotations

import functools
import http.server
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(base_url: str, timeout: float = 60.0, path: str = "/readyz",
               proc: subprocess.Popen[Any] | None = None) -> None:
    """Poll ``path`` (/readyz: the model is loaded) until it says 200; give up at once if ``proc`` (the server)
    has exited, with what it said on stderr."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            said = proc.stderr.read() if proc.stderr else ""
            said = said.decode(errors="replace") if isinstance(said, bytes) else said
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready: {said[-3000:]}")
        try:
            response = httpx.get(f"{base_url}{path}", timeout=5)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text}"
        except httpx.TransportError as e:
            last = repr(e)
        time.sleep(0.05)
    raise TimeoutError(f"{base_url} not ready after {timeout}s: {last}")


@contextmanager
def uvicorn_in_thread(app: Any, ready: bool = True) -> Iterator[str]:
    """Run ``app`` on 127.0.0.1:<free port> in a thread; yields the base URL once it is ready
    (``ready=False``: once it answers /healthz)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, path="/readyz" if ready else "/healthz")
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=15)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def static_server(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in a Prometheus text exposition (0 if absent)."""
    selector = r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{[^}]*\})?"
    pattern = re.escape(name) + selector + r" (\S+)"
    total = 0.0
    for match in re.finditer(r"^" + pattern + r"$", text, re.MULTILINE):
        total += float(match.group(1))
    return total


def stop(proc: subprocess.Popen[Any]) -> None:
    """Stop a server subprocess: SIGTERM, then SIGKILL if it has not exited within 30 s."""
    proc.terminate()
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children, …), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A ``redis-server`` of its own on a free loopback port (no persistence): its ``redis://`` URL. Skips when
    redis-server is not installed, except in CI (CI=true), where it fails: .ci/run installs it."""
    import os
    import shutil

    import pytest

    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs redis-server (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)
