"""Concurrent first-time downloads of one model file on one machine take turns (filelock), not one .part."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from wanwu.seed.download import ModelScopeClient, RemoteFile, progress

DATA = os.urandom(300_000)


class _Slow(http.server.BaseHTTPRequestHandler):
    gets: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.gets.append(self.path)
        start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(DATA) - start))
        self.end_headers()
        for i in range(start, len(DATA), 20_000):  # slow enough for the two downloads to overlap
            self.wfile.write(DATA[i : i + 20_000])
            time.sleep(0.01)

    def log_message(self, *args: object) -> None:
        pass


def test_two_downloads_of_one_file_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANWU_OFFLINE", raising=False)
    _Slow.gets = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    remote = RemoteFile("pytorch_model.pt", len(DATA), hashlib.sha256(DATA).hexdigest())
    dest = tmp_path / "model" / "pytorch_model.pt"
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def fetch() -> None:
        try:
            with ModelScopeClient("a/b", base=base) as client:
                start.wait()
                client.download(remote, "master", dest, progress("test"))
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.shutdown()
        server.server_close()
    assert failures == []
    assert dest.read_bytes() == DATA
    assert len(_Slow.gets) == 1  # the second found the verified file in place
    assert not dest.with_name(dest.name + ".part").exists()
