"""``wanwu jobs``: submit inputs to a queue, watch a job, fetch its records, cancel or delete it."""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path
from typing import TextIO

import click

from wanwu.cli.messages import t
from wanwu.cli.progress import RunProgress
from wanwu.errors import QueueUnavailableError, UsageError
from wanwu.jobs.base import (
    JobActivity,
    JobInput,
    JobQueue,
    JobSpec,
    JobStatus,
    open_queue,
    with_english,
)
from wanwu.jobs.inputs import job_inputs
from wanwu.jobs.retry import retrying
from wanwu.records import RecordOptions
from wanwu.sinks import SinkOptions, create_sink
from wanwu.sources import DEFAULT_MAX_BYTES

EXIT_TEMPFAIL = 75  # sysexits' EX_TEMPFAIL: the queue could not be reached for a while; try again later
SUBMIT_RETRY_S = 120.0  # a submission waits this long for a queue that cannot be reached
queue_option = click.option(
    "--queue", "queue_url", metavar="URL", envvar="WANWU_QUEUE", default=None,
    help="sqlite:///PATH (one machine) or redis://HOST:PORT/DB (many). "
    "Default: $WANWU_QUEUE, else SQLite in $WANWU_HOME/jobs.sqlite3.",
)


@click.group("jobs")
def command() -> None:
    """Asynchronous jobs for large catalogues: submit now, let workers run, collect later.

    Start workers with  wanwu worker --queue URL --model M  (as many as you like, on any machine).
    """


@command.command("submit")
@click.argument("inputs", nargs=-1, required=True)
@queue_option
@click.option("-k", "--top-k", type=int, default=5, show_default=True, help="Labels per image (1-50).")
@click.option("--score", type=click.Choice(["softmax", "logit"]), default="softmax", show_default=True,
              help="softmax probabilities, or the raw logits.")
@click.option("--threshold", type=float, default=None, help="Drop predictions scoring below this.")
@click.option("--by-reference", is_flag=True,
              help="Send local files as paths, not contents (workers need --allow-root over them).")
@click.option("--task-size", type=int, default=16, show_default=True, help="Inputs per unit of work.")
@click.option("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="Refuse local files above this size.")
def submit(inputs: tuple[str, ...], queue_url: str | None, top_k: int, score: str, threshold: float | None,
           by_reference: bool, task_size: int, max_bytes: int) -> int:
    """Queue INPUTS (files, folders, globs, URLs, or - for a list on stdin) as one job; print its id.

    Local files are uploaded into the queue unless --by-reference; URLs are fetched by the workers. An
    input that cannot be expanded or read (a missing path, a glob matching nothing, a file too large) is
    not queued: it is named on stderr, and the exit code is 3.
    """
    options = RecordOptions(top_k=top_k, score=score, threshold=threshold)  # type: ignore[arg-type]
    tally = _Tally()
    queued = tally.queued(job_inputs(inputs, by_reference=by_reference, max_bytes=max_bytes))
    first = next(queued, None)
    if first is None:
        raise UsageError(t("jobs.none"))
    opened = retrying(lambda: open_queue(queue_url), "opening the queue", deadline_s=SUBMIT_RETRY_S)
    with closing(opened) as queue:
        job_id = queue.submit(JobSpec(itertools.chain([first], queued), options, task_size))
    click.echo(job_id)
    click.echo(t("jobs.queued", n=tally.count, job=job_id), err=True)
    if tally.refused:
        click.echo(t("jobs.unexpanded_count", n=tally.refused), err=True)
    return 3 if tally.refused else 0


class _Tally:
    """Counts what is queued and names on stderr, as they come, the inputs that are not."""

    def __init__(self) -> None:
        self.count = 0
        self.refused = 0

    def queued(self, inputs: Iterator[JobInput]) -> Iterator[JobInput]:
        for item in inputs:
            if item.kind == "missing":
                self.refused += 1
                type_, message = item.failure()
                click.echo(t("jobs.unexpanded", input=item.name, reason=f"{type_}: {message}"), err=True)
                continue
            self.count += 1
            yield item


@command.command("status")
@click.argument("job_id", required=False)
@queue_option
def status(job_id: str | None, queue_url: str | None) -> None:
    """Print JOB_ID's status as JSON; without an id, list recent jobs (one JSON line each).

    Fields: state, total = succeeded + failed + pending (inputs), rate_per_s, eta_s, and who works on it:
    workers_active (workers holding its tasks under a live lease), tasks_leased, tasks_lapsed (waiting for
    another worker to take over from a silent one), tasks_waiting (not claimed yet; null on Redis).
    """
    with _queue(queue_url) as queue:
        if job_id is None:
            for job in queue.jobs():
                click.echo(json.dumps(job.to_dict(), ensure_ascii=False))
            return
        job = queue.status(job_id)
        activity = queue.activity(job_id)
        click.echo(json.dumps({**job.to_dict(), **activity.to_dict()}, ensure_ascii=False, indent=2))
        for note in _notes(job, activity):
            click.echo(f"wanwu: {note}", err=True)


def _notes(job: JobStatus, activity: JobActivity) -> list[str]:
    if job.state not in ("queued", "running"):
        return []
    notes = [t("jobs.lapsed", n=activity.lapsed)] if activity.lapsed else []
    if not activity.workers and not activity.lapsed:
        notes.append(t("jobs.no_workers"))
    return notes


@command.command("wait")
@click.argument("job_id")
@queue_option
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=1.0,
              help="Seconds between looks at the job.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@click.option("--retry", "retry_s", type=click.FloatRange(min=0), default=120.0, show_default=True,
              metavar="SECONDS", help="How long to keep retrying a queue that cannot be reached before giving "
              "up with exit code 75.")
def wait(job_id: str, queue_url: str | None, interval: float, quiet: bool, retry_s: float) -> int:
    """Block until JOB_ID is over, with a progress bar; exit like recognize.

    Exit 0: every input ok · 3: some failed (or tasks were given up) · 1: the job was cancelled ·
    75: the queue stayed unreachable for --retry seconds (the job goes on) · 130: Ctrl-C (the job goes on).
    """
    try:
        job = _wait(job_id, queue_url, interval, quiet, retry_s)
    except QueueUnavailableError as e:
        click.echo(f"wanwu: error: {e}", err=True)
        click.echo("wanwu: " + t("jobs.wait_unreachable", job=job_id, s=retry_s), err=True)
        return EXIT_TEMPFAIL
    if not quiet:
        click.echo("wanwu: " + t("jobs.wait_done", job=job_id, state=job.state, ok=job.done, failed=job.failed,
                                 total=job.total), err=True)
    if job.state == "cancelled":
        return 1
    return 3 if job.failed or job.state == "failed" else 0


def _wait(job_id: str, queue_url: str | None, interval: float, quiet: bool, retry_s: float) -> JobStatus:
    with closing(retrying(lambda: open_queue(queue_url), "opening the queue", deadline_s=retry_s)) as queue:
        def look() -> JobStatus:
            return retrying(lambda: queue.status(job_id), f"reading job {job_id}", deadline_s=retry_s)

        job = look()
        progress = RunProgress(t("progress.job", job=job_id), not quiet and sys.stderr.isatty())
        try:
            while True:
                if job.sealed:
                    progress.set_total(job.total)
                progress.show(job.finished, job.failed)
                if job.state not in ("queued", "running"):
                    return job
                time.sleep(interval)
                job = look()
        finally:
            progress.stop()


@command.command("results")
@click.argument("job_id")
@queue_option
@click.option("-f", "--format", "fmt", type=click.Choice(["jsonl", "csv", "json"]), default="jsonl",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write records here instead of stdout.")
@click.option("--bom", is_flag=True, help="csv: begin with a UTF-8 BOM (for Excel).")
def results(job_id: str, queue_url: str | None, fmt: str, output: Path | None, bom: bool) -> None:
    """Write JOB_ID's records so far, in input order (all of them once its state is done)."""
    with _queue(queue_url) as queue, ExitStack() as stack:
        status = queue.status(job_id)
        if status.state in ("queued", "running"):
            click.echo(f"wanwu: job {job_id} is {status.state}: {status.finished} of {status.total} "
                       "records so far", err=True)
        stream: TextIO = (stack.enter_context(output.open("w", encoding="utf-8", newline=""))
                           if output is not None else sys.stdout)
        english, records = with_english(queue.results(job_id))
        sink = create_sink(fmt, stream, SinkOptions(top_k=status.options.top_k, bom=bom, english=english))
        try:
            for record in records:
                sink.write(record)
        finally:
            sink.close()


@command.command("cancel")
@click.argument("job_id")
@queue_option
def cancel(job_id: str, queue_url: str | None) -> None:
    """Stop JOB_ID: no worker starts any more of its tasks; records already written stay."""
    with _queue(queue_url) as queue:
        click.echo(json.dumps(queue.cancel(job_id).to_dict(), ensure_ascii=False, indent=2))


@command.command("retry")
@click.argument("job_id")
@queue_option
def retry(job_id: str, queue_url: str | None) -> None:
    """Run JOB_ID's failed inputs again (a job that is over): their error records are removed and running
    workers recognize only those. Uploaded files that failed cannot be retried (their bytes are not kept
    once the job is over): submit them again."""
    with _queue(queue_url) as queue:
        plan = queue.retry(job_id)
        click.echo(json.dumps(queue.status(job_id).to_dict(), ensure_ascii=False, indent=2))
    click.echo("wanwu: " + t("jobs.retried", job=job_id, n=len(plan.inputs)), err=True)
    if plan.kept_out:
        click.echo("wanwu: " + t("jobs.not_retried", n=plan.kept_out), err=True)


@command.command("delete")
@click.argument("job_ids", nargs=-1)
@queue_option
@click.option("--finished-before", type=float, default=None, metavar="HOURS",
              help="Also delete every finished (done, failed or cancelled) job last updated this many hours ago.")
def delete(job_ids: tuple[str, ...], queue_url: str | None, finished_before: float | None) -> None:
    """Cancel JOB_IDS and forget them: status, records and uploads. Prints the ids deleted."""
    if not job_ids and finished_before is None:
        raise click.UsageError("name job ids, or --finished-before HOURS")
    with _queue(queue_url) as queue:
        doomed = list(job_ids)
        if finished_before is not None:
            cutoff = time.time() - finished_before * 3600
            doomed += [s.id for s in queue.jobs(limit=1_000_000)
                       if s.state in ("done", "failed", "cancelled") and s.updated <= cutoff]
        for job_id in dict.fromkeys(doomed):
            queue.delete(job_id)
            click.echo(job_id)


def _queue(url: str | None) -> closing[JobQueue]:
    return closing(open_queue(url))
