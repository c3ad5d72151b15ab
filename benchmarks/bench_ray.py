"""The Ray Data runner against the local runner (``wanwu recognize``), side by side in one run.

    python benchmarks/bench_ray.py            # 1,000 photos of ../shared/data
    python benchmarks/bench_ray.py --quick    # 100 photos: a smoke run
    python benchmarks/bench_ray.py --private  # the local runner and a private Ray only (no clusters)

Each runner runs in a fresh process on the same photos with the result cache off, and reports:

* ``start-up``   — creating the runner (model load; for Ray also starting or joining Ray);
* ``first s``    — from the runner's creation to its first record (for Ray: the actor starting and loading
  the model, the first decode tasks);
* ``to 1st s``   — from the driver process's start (interpreter, imports, start-up) to its first record: what
  ``wanwu recognize`` takes to write one;
* ``img/s``      — photos / (time from the first record to the last);
* ``2nd half``   — the second half of the photos / (time from the record half-way to the last): the steady
  throughput, past any start-up (on a private Ray the first records come from the driver while Ray starts,
  so ``img/s`` there spans Ray's start);
* ``wall``       — the whole run, start-up included;
* ``peak RSS``   — the largest sum of resident memory over every process of the run (the driver, its
  children, and the Ray nodes' processes), sampled every 0.1 s.

Ray layouts: ``ray local`` (``--runner ray``: a private Ray on this machine, all cores; each image decoded in
a decode process of its own Ray worker, under a deadline, as the local runner does), ``ray local, -j 0`` (the
same, decoding in the Ray worker itself: no crash or hang guard, no inter-process copy), ``ray 1 node``
(``ray start --head`` with all cores, the driver joins it) and ``ray 2 nodes`` (the same cores split over two
nodes, so work and blocks cross nodes; with one inference actor, then with two, one per node's share). On one
machine two nodes cannot add cores: those rows measure what crossing nodes costs, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import LABELS, MODEL, PHOTOS, require_shared  # noqa: E402
from tests.ray_support import Cluster, session_pids  # noqa: E402

DRIVER = r"""
import json, sys, time
from pathlib import Path
from wanwu.config import RecognizeOptions
from wanwu.runners import RunnerConfig, create_runner
from wanwu.sources import expand
runner, address, folder, model, labels, actors, workers, half_at = sys.argv[1:9]
t0 = time.perf_counter()
options = RecognizeOptions(cache=False) if workers == "default" else RecognizeOptions(cache=False,
                                                                                    decoders=int(workers))
config = RunnerConfig(model, Path(labels), options, address or None, actors=int(actors))
with create_runner(runner, config) as run:
    t1 = time.perf_counter()
    n, seen, first, first_wall, half = 0, 0, None, None, None
    for record in run.recognize(expand([folder])):
        if first is None:
            first, first_wall = time.perf_counter(), time.time()
        seen += 1
        if seen == int(half_at):
            half = time.perf_counter()
        n += record.ok
    t2 = time.perf_counter()
print(json.dumps({"startup": t1 - t0, "first": first - t1, "run": t2 - t1, "ok": n, "first_wall": first_wall,
                  "half": half - t1}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 photos only")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--private", action="store_true", help="the local runner and a private Ray only")
    args = ap.parse_args()
    require_shared()
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))[: 100 if args.quick else None]
    n = len(photos)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="wanwu-bench-ray-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for p in photos:
            os.symlink(p, folder / p.name)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANWU_HOME": str(Path(tmp) / "home"),
               "RAY_USAGE_STATS_ENABLED": "0"}
        rows = {"local (wanwu recognize)": _drive("local", "", folder, env, [])}
        rows["ray local"] = _drive("ray", "", folder, env, [])
        rows["ray local, -j 0"] = _drive("ray", "", folder, env, [], workers="0")
        layouts = () if args.private else (
            ("ray 1 node", [cores], 1), ("ray 2 nodes", [max(1, cores // 2)] * 2, 1),
            ("ray 2 nodes, 2 actors", [max(1, cores // 2)] * 2, 2))
        for label, split, actors in layouts:
            cluster = Cluster(env)
            try:
                cluster.start_head(split[0])
                for i, cpus in enumerate(split[1:], 2):
                    cluster.add_node(f"node{i}", cpus)
                cluster.wait_nodes(len(split))
                rows[label] = _drive("ray", cluster.address, folder, cluster.env, [x.sid for x in cluster.nodes],
                                     actors)
            finally:
                cluster.stop()
    base = rows["local (wanwu recognize)"]
    print(f"{n} photos, {cores} cores, result cache off")
    print("img/s: steady throughput, from the first record to the last; first s: runner created -> first record;"
          " to 1st s: process start -> first record")
    print("2nd half: img/s over the second half of the records (past any start-up; with --runner ray on a private"
          " Ray the first records come from the driver while Ray starts)")
    print(f"{'runner':<26}{'start-up s':>11}{'first s':>9}{'to 1st s':>10}{'img/s':>9}{'vs local':>10}"
          f"{'2nd half':>9}{'vs local':>10}{'wall s':>9}{'peak RSS MiB':>14}")
    base_rate = n / (base["run"] - base["first"])
    base_half = (n - n // 2) / (base["run"] - base["half"])
    for label, r in rows.items():
        rate = n / (r["run"] - r["first"])
        half = (n - n // 2) / (r["run"] - r["half"])
        print(f"{label:<26}{r['startup']:>11.2f}{r['first']:>9.2f}{r['to_first']:>10.2f}{rate:>9.1f}"
              f"{rate / base_rate:>9.2f}x{half:>9.1f}{half / base_half:>9.2f}x"
              f"{r['startup'] + r['run']:>9.2f}{r['peak_rss'] / 2**20:>14.0f}")
        if r["ok"] != n:
            sys.exit(f"{label}: {r['ok']} ok records of {n}")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"images": n, "cores": cores, "runs": rows}, indent=2))


def _drive(
    runner: str, address: str, folder: Path, env: dict[str, str], sessions: list[int], actors: int = 1,
    workers: str = "default",
) -> dict[str, float]:
    started = time.time()
    half_at = str(max(1, sum(1 for _ in folder.iterdir()) // 2))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, runner, address, str(folder), str(MODEL), str(LABELS),
                             str(actors), workers, half_at],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pids = set(_descendants(proc.pid)) | {p for s in sessions for p in session_pids(s)}
            peak[0] = max(peak[0], sum(_rss(p) for p in pids))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{runner} run failed with exit code {proc.returncode}")
    figures = json.loads(out.strip().splitlines()[-1])
    return {**figures, "to_first": figures.pop("first_wall") - started, "peak_rss": peak[0]}


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    main()
