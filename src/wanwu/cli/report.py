"""``wanwu report``: an offline HTML page about a run's records."""

from __future__ import annotations

from pathlib import Path

import click

from wanwu.report import render, summarize


@click.command("report")
@click.argument("results", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
              show_default=True, help="The HTML file to write.")
@click.option("--top-labels", type=click.IntRange(1, 500), default=24, show_default=True,
              help="Labels that get a grid of samples.")
@click.option("--per-label", type=click.IntRange(1, 100), default=8, show_default=True,
              help="Best-scoring samples shown per label.")
@click.option("--max-failures", type=click.IntRange(0, 100_000), default=500, show_default=True,
              help="Failed inputs listed (all are counted).")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="How long the run took, to show its throughput (records do not carry time).")
@click.option("--title", default="万物识别报告", show_default=True)
def command(results: tuple[Path, ...], output: Path, top_labels: int, per_label: int, max_failures: int,
            seconds: float | None, title: str) -> int:
    """Write one self-contained HTML report (no network needed) about RESULTS (jsonl or parquet files)."""
    summary = summarize(results, per_label=per_label, max_failures=max_failures)
    page = render(summary, title=title, top_labels=top_labels, elapsed=seconds)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(output)
    click.echo(f"wanwu: {output}: {summary.ok + summary.failed:,} record(s), {len(summary.labels):,} label(s), "
               f"{len(page.encode()) / 1024:,.0f} KiB", err=True)
    return 0
