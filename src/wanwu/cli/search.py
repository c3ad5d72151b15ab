"""``wanwu index``, ``wanwu search`` and ``wanwu dedupe``: thin shells over :mod:`wanwu.search`."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import click

from wanwu.cli.options import io_options, model_options, recognize_options
from wanwu.index import ImageIndex
from wanwu.search import SearchResult, build_index, dedupe, open_recognizer, search_images, search_texts
from wanwu.sources import expand

exact_option = click.option(
    "--exact", is_flag=True, default=False,
    help="Score every row (no ANN index, whatever the index's size): slower on a large index, never misses.",
)
embedding_output_option = click.option(
    "--embedding-output", metavar="NAME", default=None,
    help="The model's tensor to take as the embedding (default: the global-pool output the graph's structure "
         "shows; a CLIP model's image embedding).",
)


@click.command("index")
@click.argument("index_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@model_options
@embedding_output_option
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@io_options
def index_command(index_dir: Path, inputs: tuple[str, ...], **kw: Any) -> int:
    """Embed INPUTS (files, folders, globs, URLs, - for a list on stdin) and add what is new to INDEX_DIR."""
    with open_recognizer(kw["model"], recognize_options(kw), kw["embedding_output"], kw["labels"]) as rec:
        report = build_index(rec, index_dir, expand(list(inputs)))
    for record in report.failed:
        click.echo(json.dumps(record.to_dict(), ensure_ascii=False), err=True)
    click.echo(f"{report.added} added, {report.present} already in the index, {len(report.failed)} failed",
               err=True)
    return 3 if report.failed else 0


@click.command("search")
@click.argument("index_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("texts", nargs=-1)
@click.option("--image", "images", multiple=True, metavar="PATH",
              help="Search by this photo (a file, folder, glob or URL; repeatable).")
@click.option("-k", "--top-k", "k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--threshold", type=float, default=None, help="Only hits with at least this cosine.")
@click.option("-f", "--format", "fmt", type=click.Choice(["jsonl", "csv", "table"]), default="jsonl",
              show_default=True)
@exact_option
@model_options
@embedding_output_option
@io_options
def search_command(index_dir: Path, texts: tuple[str, ...], images: tuple[str, ...], k: int,
                   threshold: float | None, fmt: str, exact: bool, **kw: Any) -> int:
    """Search INDEX_DIR by TEXT (models with a text tower) or by --image photos: one line per query."""
    if bool(texts) == bool(images):
        raise click.UsageError("give TEXT queries or --image PATH, one of the two")
    index = ImageIndex.open(index_dir, exact=exact)
    model = kw["model"] or index.header.get("model_source")
    with open_recognizer(model, recognize_options(kw), kw["embedding_output"], kw["labels"]) as rec:
        results = (search_texts(rec, index, list(texts), k, threshold) if texts
                   else search_images(rec, index, expand(list(images)), k, threshold))
        failed = _write(results, index, fmt, sys.stdout)
    return 3 if failed else 0


def _write(results: Any, index: ImageIndex, fmt: str, out: TextIO) -> int:
    failed = 0
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(["query", "rank", "input", "score", "labels", "error"])
    for result in results:
        assert isinstance(result, SearchResult)
        data = result.to_dict(index)
        failed += result.error is not None
        if writer is not None:
            _csv_rows(writer, data)
        elif fmt == "table":
            _table_rows(out, data)
        else:
            out.write(json.dumps(data, ensure_ascii=False) + "\n")
        out.flush()
    return failed


def _csv_rows(writer: Any, data: dict[str, Any]) -> None:
    if "error" in data:
        writer.writerow([data["query"], "", "", "", "", data["error"]["type"] + ": " + data["error"]["message"]])
    for rank, hit in enumerate(data.get("results", []), 1):
        writer.writerow([data["query"], rank, hit["input"], hit["score"], " ".join(hit.get("labels", [])), ""])


def _table_rows(out: TextIO, data: dict[str, Any]) -> None:
    out.write(f"{data['query']}\n")
    if "error" in data:
        out.write(f"  error: {data['error']['type']}: {data['error']['message']}\n")
    for rank, hit in enumerate(data.get("results", []), 1):
        out.write(f"  {rank:>3}  {hit['score']:.4f}  {hit['input']}  {' '.join(hit.get('labels', []))}\n")


@click.command("dedupe")
@click.argument("index_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--threshold", type=float, default=0.95, show_default=True,
              help="Rows whose cosine reaches this are near-duplicates.")
@exact_option
def dedupe_command(index_dir: Path, threshold: float, exact: bool) -> int:
    """Groups of near-duplicates in INDEX_DIR, one JSON line per group."""
    for group in dedupe(ImageIndex.open(index_dir, exact=exact), threshold):
        click.echo(json.dumps(group, ensure_ascii=False))
    return 0


commands = (index_command, search_command, dedupe_command)
