"""A real ``redis-server`` for tests, on a free loopback port, that a test may stop and start again.

Skips when redis-server is not installed, except in CI (CI=true), where it fails: .ci/run installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import jobs_support as js


@dataclass
class RedisServer:
    """``durable``: the append-only file on, fsynced on every write (a restart keeps everything);
    otherwise no persistence at all (a restart empties the store)."""

    folder: Path
    port: int
    durable: bool
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            if os.environ.get("CI"):
                pytest.fail("CI needs redis-server (apt-get install redis-server) for the Redis queue tests")
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else \
            ["--appendonly", "no"]
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.folder),
             "--protected-mode", "no", *persistence, *auth],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, password=self.password)
        js.wait_for(lambda: _pings(client), 20, "redis-server to start")
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: redis flushes its append-only file and exits
            self.proc.wait(timeout=20)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, **params: str) -> str:
        auth = f":{self.password}@" if self.password else ""
        return js.add_query(f"redis://{auth}127.0.0.1:{self.port}/0", prefix=f"t{uuid.uuid4().hex[:8]}",
                            **params)


def _pings(client: object) -> bool:
    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except Exception:
        return False
