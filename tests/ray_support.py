"""A real Ray cluster of this machine's own processes, for the Ray runner's tests.

Each node is ``ray start --block`` in a session of its own (start_new_session), with free ports and a private
temp dir, so a node is killed exactly (SIGKILL to its whole session) and stopping the cluster touches only the
processes these tests started, never another user's Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.helpers import WrappedBackend
from tests.servers import free_port

RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]


def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid`` (a node's ray start and all it spawned)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(entry))
    return pids


def kill_session(sid: int, timeout: float = 10.0) -> None:
    """SIGKILL every process of the session, until none is left."""
    deadline = time.monotonic() + timeout
    while (pids := session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


_TAKEN: set[int] = set()  # ports already handed to a node of these tests: never hand one out twice


def _unused_port() -> int:
    """A free port no other component of these tests' nodes was given (two calls of ``free_port`` can return
    the same port while neither is bound yet, and Ray then refuses to start)."""
    while (port := free_port()) in _TAKEN:
        pass
    _TAKEN.add(port)
    return port


class Node:
    def __init__(self, args: list[str], env: dict[str, str], temp: Path) -> None:
        ports = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--runtime-env-agent-port"]
        port_args = [x for flag in ports for x in (flag, str(_unused_port()))]
        log = open(temp / f"node-{len(os.listdir(temp))}.log", "wb")  # noqa: SIM115 (closed with the node)
        self.proc = subprocess.Popen(
            [*RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp}", *port_args, *args],
            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.sid = self.proc.pid

    def kill(self) -> None:
        kill_session(self.sid)
        self.proc.wait(timeout=10)


class Cluster:
    """``ray start --head`` plus worker nodes, each ``num_cpus`` CPUs and a resource named after it."""

    def __init__(self, env: dict[str, str]) -> None:
        # Token authentication (Ray's default for `ray start`) with a token of this cluster's own.
        self.env = {**env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.temp = Path(tempfile.mkdtemp(prefix="wr", dir="/tmp"))  # short: unix socket paths
        self.port = _unused_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []

    def start_head(self, num_cpus: int) -> Node:
        node = Node(["--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                     "--include-dashboard=false",
                     "--resources", json.dumps({"head": 1})], self.env, self.temp)
        self.nodes.append(node)
        return node

    def add_node(self, name: str, num_cpus: int) -> Node:
        node = Node([f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                     "--resources", json.dumps({name: 1})], self.env, self.temp)
        self.nodes.append(node)
        return node

    def wait_nodes(self, count: int, timeout: float = 60.0) -> None:
        script = (
            "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n in self.nodes if n.proc.poll() is not None]
            if dead:
                logs = "".join(p.read_text(errors="replace")[-2000:] for p in self.temp.glob("node-*.log"))
                raise RuntimeError(f"a Ray node exited while starting:\n{logs}")
            out = subprocess.run([sys.executable, "-c", script, self.address], env=self.env,
                                 capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the Ray cluster did not reach {count} nodes")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


def hostile_decode(data: bytes, spec: Any, options: Any) -> Any:
    """wanwu's decode, except that a file starting with CRASH kills its process outright, one starting with
    HANG never returns (a decoder stuck in a loop), and one starting with SLOW takes two seconds more."""
    from wanwu.imaging import decode_job

    if data.startswith(b"CRASH"):
        os._exit(1)
    if data.startswith(b"HANG"):
        time.sleep(3600)
    if data.startswith(b"SLOW"):
        time.sleep(2.0)
        data = data[4:]
    return decode_job(data, spec, options)


def hostile_decode_jobs(datas: list[bytes], spec: Any, options: Any) -> list[Any]:
    """:func:`hostile_decode` for the local runner's decode tasks (``wanwu.pipeline._Run.decode``)."""
    return [hostile_decode(data, spec, options) for data in datas]


def pixel_key(image: Any) -> str:
    """What names one preprocessed image in a batch, whichever batch it is in."""
    import hashlib

    import numpy as np

    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


class PoisonBackend(WrappedBackend):
    """Wraps a real backend: an image whose key (:func:`pixel_key`) is in ``nan`` scores NaN; a batch holding
    one in ``oom`` runs out of memory, as a GPU would (so alone, that image always does)."""

    def __init__(self, inner: Any, nan: frozenset[str], oom: frozenset[str]) -> None:
        super().__init__(inner)
        self.nan, self.oom = nan, oom

    def infer(self, batch: Any) -> Any:
        from wanwu.errors import OutOfMemoryError

        keys = [pixel_key(image) for image in batch]
        if any(k in self.oom for k in keys):
            raise OutOfMemoryError(f"poisoned batch of {len(batch)}")
        out = self.inner.infer(batch).copy()
        for i, key in enumerate(keys):
            if key in self.nan:
                out[i] = float("nan")
        return out


def poison_infer() -> Any:
    """The Ray inference stage with its model behind a :class:`PoisonBackend` (a class Ray can pickle)."""
    from wanwu.ray import Infer

    class PoisonInfer(Infer):
        def __init__(self, spec: Any, options: Any, record: Any = None, *, nan: frozenset[str] = frozenset(),
                     oom: frozenset[str] = frozenset()) -> None:
            super().__init__(spec, options, record)
            self.engine.backend = PoisonBackend(self.engine.backend, nan, oom)

    return PoisonInfer
