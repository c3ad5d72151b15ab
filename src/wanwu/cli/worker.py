"""``wanwu worker``: load a model once, then recognize queued tasks until stopped."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from types import FrameType
from typing import Any

import click

from wanwu.cli.collector import collecting_less
from wanwu.cli.jobs import queue_option
from wanwu.cli.messages import t
from wanwu.cli.options import io_options, model_options, recognize_options
from wanwu.config import RecognizeOptions
from wanwu.errors import QueueError
from wanwu.jobs.base import open_queue
from wanwu.jobs.retry import retrying
from wanwu.jobs.worker import WorkerConfig, WorkerStats, default_worker_id, run_worker
from wanwu.pipeline import Recognizer

log = logging.getLogger("wanwu")


@click.command("worker")
@queue_option
@model_options
@click.option("--allow-root", "allow_roots", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder whose files jobs may name by path (repeatable). Default: none, so only URLs "
              "and uploaded files are read.")
@click.option("-b", "--batch-size", type=int, default=32, show_default=True, help="Images per batch.")
@io_options
@click.option("--lease", type=float, default=None,
              help="Seconds before a silent worker's task is taken over (default: the queue URL's, 60).")
@click.option("--tasks-per-claim", type=int, default=None,
              help="Tasks taken at once (default: enough for about two batches).")
@click.option("--poll", type=float, default=1.0, show_default=True, help="Seconds between looks at an "
              "empty queue.")
@click.option("--max-tasks", type=int, default=None, help="Stop after this many tasks.")
@click.option("--exit-when-idle", is_flag=True, help="Stop once the queue holds no unfinished task.")
@click.option("--log-every", type=float, default=10.0, show_default=True, metavar="SECONDS",
              help="Log progress (tasks, records, failures, rate) at most this often; 0 = after every claim.")
@click.option("-q", "--quiet", is_flag=True, help="Log only warnings and errors.")
def command(queue_url: str | None, allow_roots: tuple[Path, ...], lease: float | None,
            tasks_per_claim: int | None, poll: float, max_tasks: int | None, exit_when_idle: bool,
            log_every: float, quiet: bool, **kw: Any) -> int:
    """Recognize queued tasks with one loaded model; run as many as you like, on any machine.

    SIGTERM or Ctrl-C stops after the tasks in hand (a second one gives them back at once).
    """
    options = _options(kw)
    if not quiet and log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)  # a worker runs unattended: its log is how you follow it
    worker_id = default_worker_id()
    config = WorkerConfig(
        allow_roots=allow_roots, lease_s=lease, poll_s=poll, max_tasks=max_tasks,
        exit_when_idle=exit_when_idle,
        tasks_per_claim=tasks_per_claim or max(1, -(-2 * options.batch_size // 16)),
        worker_id=worker_id, on_progress=_progress_logger(worker_id, log_every),
    )
    stop = threading.Event()
    _on_signals(stop)
    # A queue that is down when the worker starts is waited for, as one that goes down later is.
    with closing(retrying(lambda: open_queue(queue_url), "opening the queue", stop=stop)) as queue, \
            Recognizer(kw["model"], labels=kw["labels"], label_column=kw["label_column"],
                       options=options, start_decoders=True) as recognizer:
        log.info("%s", t("worker.start", worker=worker_id, model=recognizer.spec.name, queue=queue.url))
        try:
            for warning in queue.health():
                log.warning("%s", warning)
        except QueueError as e:  # a check, not a reason to stop: the worker waits for its queue anyway
            log.warning("could not check the queue's settings: %s", e)
        with collecting_less():
            stats = run_worker(queue, recognizer, config, stop)
    log.info("%s", t("worker.stop", worker=worker_id, tasks=stats.tasks, records=stats.records))
    return 0


def _progress_logger(worker_id: str, every_s: float) -> Callable[[WorkerStats], None]:
    last = [0.0]

    def report(stats: WorkerStats) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            log.info("%s", t("worker.progress", worker=worker_id, tasks=stats.tasks, records=stats.records,
                             failed=stats.failed, rate=stats.rate))

    return report


def _options(kw: dict[str, Any]) -> RecognizeOptions:
    return recognize_options(kw)


def _on_signals(stop: threading.Event) -> None:
    """First SIGTERM/SIGINT: finish the tasks in hand, then exit. Second: stop now (tasks are released)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("stopping after the tasks in hand (signal again to stop now)")
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
