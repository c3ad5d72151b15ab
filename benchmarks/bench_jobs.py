"""Throughput of queue workers against the plain CLI, on the same photos, in one run.

    python benchmarks/bench_jobs.py            # 1,000 photos of ../shared/data, SQLite (+ Redis if present)
    python benchmarks/bench_jobs.py --quick    # 48 photos: a smoke run
    python benchmarks/bench_jobs.py --recovery # how fast two workers recover from a queue outage

Measured, each as the wall time of separate processes started from scratch (model load included, result
cache off everywhere):

* ``cli``        — ``wanwu recognize PHOTOS --no-cache``;
* ``1 worker``   — ``wanwu jobs submit --by-reference`` then one ``wanwu worker --exit-when-idle``;
* ``2 workers``  — the same job with two workers started together (each decodes with half the cores).

The queue's overhead per image is (1-worker wall - cli wall) / images, submission reported separately.

``--recovery``: two workers on a by-reference job; a third of the way in, the queue goes away for
``--outage`` seconds (Redis with its append-only file: stopped with SIGTERM and started again; SQLite: another
process holds the write lock). Reported per store: ``stall_s``, from the store's return to the first new
record, and ``done_after_s``, from the store's return to the job's end; both workers must still be running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WANWU = [sys.executable, "-c", "from wanwu.cli.main import run; run()"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, default=SHARED / "images" / "imagenet-sample-images")
    ap.add_argument("--model", default=str(SHARED / "models" / "mobilenetv2-12-int8.onnx"))
    ap.add_argument("--labels", default=str(SHARED / "labels" / "imagenet_zh.txt"))
    ap.add_argument("--quick", action="store_true", help="48 photos only")
    ap.add_argument("--limit", type=int, default=None, help="use the first N photos")
    ap.add_argument("--no-redis", action="store_true", help="skip Redis even if redis-server exists")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--recovery", action="store_true", help="measure recovery from a queue outage instead")
    ap.add_argument("--outage", type=float, default=5.0, help="--recovery: seconds the queue is away")
    args = ap.parse_args()

    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    photos = photos[: 48 if args.quick else args.limit or len(photos)]
    if not photos:
        sys.exit(f"no photos in {args.photos}")
    n = len(photos)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="wanwu-bench-jobs-") as tmp:
        work = Path(tmp)
        folder = work / "photos"
        folder.mkdir()
        for p in photos:
            os.symlink(p.resolve(), folder / p.name)
        env = {**os.environ, "WANWU_HOME": str(work / "home"), "PYTHONPATH": str(ROOT / "src")}
        model = ["--model", args.model, "--labels", args.labels]
        figures: dict[str, float | int | str] = {"images": n, "cores": cores}
        if args.recovery:
            _recoveries(work, folder, model, args, env, figures)
            _report(figures)
            return

        t_cli = _run([*WANWU, "recognize", str(folder), *model, "--no-cache", "-q", "-f", "jsonl",
                      "-o", str(work / "cli.jsonl")], env)
        _check_lines(work / "cli.jsonl", n)
        figures["cli_images_per_s"] = n / t_cli

        queues = {"sqlite": f"sqlite:///{work / 'jobs.sqlite3'}"}
        redis = None if args.no_redis else _start_redis(work)
        if redis is not None:
            queues["redis"] = f"redis://127.0.0.1:{redis[1]}/0"
        try:
            for name, url in queues.items():
                for workers in (1, 2):
                    queue = url
                    t_submit, job = _submit(queue, folder, env)
                    decode = str(max(1, cores // workers))
                    cmd = [*WANWU, "worker", "--queue", queue, *model, "--no-cache", "--allow-root",
                           str(folder.resolve()), "--allow-root", str(args.photos.resolve()), "-j", decode,
                           "--exit-when-idle", "--poll", "0.2"]
                    t_work = _run_many([cmd] * workers, env)
                    _check_done(queue, job, n, env)
                    key = f"{name}_{workers}w"
                    figures[f"{key}_images_per_s"] = n / t_work
                    figures[f"{key}_submit_ms_per_image"] = 1000 * t_submit / n
                    if workers == 1:
                        figures[f"{name}_overhead_ms_per_image"] = 1000 * (t_work - t_cli) / n
        finally:
            if redis is not None:
                redis[0].terminate()
                redis[0].wait(timeout=20)
    _report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def _recoveries(work: Path, folder: Path, model: list[str], args: argparse.Namespace, env: dict[str, str],
                figures: dict[str, float | int | str]) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import sqlite3

    path = work / "jobs.sqlite3"
    holder: list[sqlite3.Connection] = []

    def lock() -> None:
        holder.append(sqlite3.connect(path, isolation_level=None))
        holder[0].execute("BEGIN IMMEDIATE")

    def unlock() -> None:
        holder.pop().execute("ROLLBACK")

    _recovery("sqlite", f"sqlite:///{path}?timeout=5", lock, unlock, work, folder, model, args, env, figures)
    if args.no_redis:
        return
    redis = _start_redis(work, durable=True)
    if redis is None:
        return
    proc, port = redis
    box = [proc]

    def down() -> None:
        box[0].terminate()
        box[0].wait(timeout=60)

    def up() -> None:
        started = _start_redis(work, durable=True, port=port)
        assert started is not None
        box[0] = started[0]

    try:
        _recovery("redis", f"redis://127.0.0.1:{port}/0", down, up, work, folder, model, args, env, figures)
    finally:
        box[0].terminate()
        box[0].wait(timeout=60)


def _recovery(name: str, queue: str, go_down: Any, come_back: Any, work: Path, folder: Path, model: list[str],
              args: argparse.Namespace, env: dict[str, str], figures: dict[str, float | int | str]) -> None:
    from wanwu.jobs.base import open_queue

    _, job = _submit(queue, folder, env)
    q = open_queue(queue)
    total = q.status(job).total
    cmd = [*WANWU, "worker", "--queue", queue, *model, "--no-cache", "--allow-root", str(folder.resolve()),
           "--allow-root", str(args.photos.resolve()), "-j", str(max(1, (os.cpu_count() or 1) // 2)), "-q"]
    workers = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(2)]
    try:
        _poll(lambda: q.status(job).finished >= total // 3, 600)
        go_down()
        time.sleep(args.outage)  # the outage itself: what is measured is what follows it
        come_back()
        back = time.perf_counter()
        at_back = _retry_status(q, job).finished
        _poll(lambda: _retry_status(q, job).finished > at_back, 600)
        figures[f"{name}_stall_s"] = time.perf_counter() - back
        _poll(lambda: q.status(job).state == "done", 1200)
        figures[f"{name}_done_after_s"] = time.perf_counter() - back
        figures[f"{name}_workers_alive"] = sum(w.poll() is None for w in workers)
        figures[f"{name}_records"] = q.status(job).finished
    finally:
        for w in workers:
            w.terminate()
            w.wait(timeout=60)
        q.close()


def _retry_status(q: Any, job: str) -> Any:
    from wanwu.jobs.retry import retrying

    return retrying(lambda: q.status(job), "reading the job", deadline_s=60)


def _poll(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            sys.exit("timed out")
        time.sleep(0.05)


def _run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _run_many(cmds: list[list[str]], env: dict[str, str]) -> float:
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL) for cmd in cmds]
    for proc in procs:
        if proc.wait() != 0:
            sys.exit(f"worker failed with exit code {proc.returncode}")
    return time.perf_counter() - start


def _submit(queue: str, folder: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([*WANWU, "jobs", "submit", "--queue", queue, "--by-reference", str(folder)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, out.strip()


def _check_done(queue: str, job: str, n: int, env: dict[str, str]) -> None:
    out = subprocess.run([*WANWU, "jobs", "status", "--queue", queue, job], env=env, check=True,
                         capture_output=True, text=True).stdout
    status = json.loads(out)
    if status["state"] != "done" or status["succeeded"] + status["failed"] != n:
        sys.exit(f"job did not finish cleanly: {status}")
    if status["failed"]:
        print(f"note: {status['failed']} input(s) failed in job {job}", file=sys.stderr)


def _check_lines(path: Path, n: int) -> None:
    lines = path.read_text(encoding="utf-8").count("\n")
    if lines != n:
        sys.exit(f"{path}: {lines} records for {n} photos")


def _start_redis(work: Path, durable: bool = False, port: int = 0) -> tuple[subprocess.Popen[bytes], int] | None:
    exe = shutil.which("redis-server")
    if exe is None:
        print("redis-server not found: Redis queue skipped", file=sys.stderr)
        return None
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
    aof = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *aof,
                             "--dir", str(work)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    sys.exit("redis-server did not start")


def _report(figures: dict[str, float | int | str]) -> None:
    print(f"{figures['images']} photos, {figures['cores']} cores, result cache off")
    for key, value in figures.items():
        if key in ("images", "cores"):
            continue
        print(f"  {key:<34} {value:10.2f}" if isinstance(value, float) else f"  {key:<34} {value}")


if __name__ == "__main__":
    main()
