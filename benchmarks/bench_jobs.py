"""Throughput of queue workers against the plain CLI, on the same photos, in one run.

    python benchmarks/bench_jobs.py            # 1,000 photos of ../shared/data, SQLite (+ Redis if present)
    python benchmarks/bench_jobs.py --quick    # 48 photos: a smoke run

Measured, each as the wall time of separate processes started from scratch (model load included, result
cache off everywhere):

* ``cli``        — ``wanwu recognize PHOTOS --no-cache``;
* ``1 worker``   — ``wanwu jobs submit --by-reference`` then one ``wanwu worker --exit-when-idle``;
* ``2 workers``  — the same job with two workers started together (each decodes with half the cores).

The queue's overhead per image is (1-worker wall - cli wall) / images, submission reported separately.
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


def _start_redis(work: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    exe = shutil.which("redis-server")
    if exe is None:
        print("redis-server not found: Redis queue skipped", file=sys.stderr)
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
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
