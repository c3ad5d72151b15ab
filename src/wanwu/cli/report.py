"""``wanwu report``: an offline HTML page about a run's records."""

from __future__ import annotations

from pathlib import Path

import click

from wanwu.cli.messages import h
from wanwu.report import render, summarize


@click.command("report", help=h("report"))
@click.argument("results", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
              show_default=True, help=h("report.output"))
@click.option("--top-labels", type=click.IntRange(1, 500), default=24, show_default=True,
              help=h("report.top_labels"))
@click.option("--per-label", type=click.IntRange(1, 100), default=8, show_default=True,
              help=h("report.per_label"))
@click.option("--max-failures", type=click.IntRange(0, 100_000), default=500, show_default=True,
              help=h("report.max_failures"))
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help=h("report.seconds"))
@click.option("--title", default="万物识别报告", show_default=True, help=h("report.title"))
def command(results: tuple[Path, ...], output: Path, top_labels: int, per_label: int, max_failures: int,
            seconds: float | None, title: str) -> int:
    """``wanwu report`` (its help text is ``h("report")``, in the locale's language)."""
    summary = summarize(results, per_label=per_label, max_failures=max_failures)
    page = render(summary, title=title, top_labels=top_labels, elapsed=seconds)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(output)
    click.echo(f"wanwu: {output}: {summary.ok + summary.failed:,} record(s), {len(summary.labels):,} label(s), "
               f"{len(page.encode()) / 1024:,.0f} KiB", err=True)
    return 0
