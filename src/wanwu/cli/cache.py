"""``wanwu cache stats|clear|prune``: look after the result cache (a thin shell over the SQLite or Redis cache)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

import click

from wanwu.cache import open_cache
from wanwu.cache.memo import MemoStats, machine_id
from wanwu.cache.sqlite import CacheStats
from wanwu.config import RecognizeOptions
from wanwu.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


def cache_path_option(fn: F) -> F:
    return click.option(
        "--cache", "cache_path", metavar="PATH|URL", default=None,
        help="Result cache: a file, or redis://HOST:PORT/DB (default $WANWU_CACHE, else "
             "$WANWU_HOME/cache.sqlite3).",
    )(fn)


def _open(cache_path: str | None) -> Any:
    """The cache with its maintenance calls (stats, clear, prune): SQLite or Redis."""
    return open_cache(RecognizeOptions(cache_path=cache_path).cache_location())


def _memo(cache_path: str | None) -> Any:
    """The stat memo beside the cache (which inputs are unchanged since they were read), with its maintenance
    calls (stats, prune); None for a cache that keeps none (a plug-in's)."""
    from wanwu.unchanged import open_memo

    return open_memo(RecognizeOptions(cache_path=cache_path))


@click.group("cache")
def command() -> None:
    """Inspect and trim the result cache (model outputs keyed by file content)."""


@command.command("stats")
@cache_path_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def stats(cache_path: str | None, as_json: bool) -> None:
    """Entries, size on disk, age, per model/preprocessing namespace; the stat memo's size."""
    with _open(cache_path) as cache:
        result = cache.stats()
    memo = _memo(cache_path)
    memo_stats = None
    if memo is not None:
        with memo:
            memo_stats = memo.stats()
    if as_json:
        memo_dict = asdict(memo_stats) if memo_stats is not None else None
        click.echo(json.dumps({**result.to_dict(), "memo": memo_dict}, ensure_ascii=False, indent=2))
    else:
        click.echo(format_stats(result))
        if memo_stats is not None:
            click.echo(format_memo_stats(memo_stats))


@command.command("clear")
@cache_path_option
@click.option("--namespace", default=None, metavar="ID",
              help="Only this model/preprocessing namespace (a unique prefix from `wanwu cache stats`).")
def clear(cache_path: str | None, namespace: str | None) -> None:
    """Remove cached results (all of them, or one namespace's)."""
    with _open(cache_path) as cache:
        removed = cache.clear(namespace)
        click.echo(f"removed {removed:,} cached result(s) from {cache.path}")


@command.command("prune")
@cache_path_option
@click.option("--older-than", default=None, metavar="AGE",
              help="Drop results not used for this long: 90d, 12h, 2w, 3600s.")
@click.option("--max-size", default=None, metavar="SIZE",
              help="Then drop the least recently used until the file is at most this big: 500MB, 2GiB.")
def prune(cache_path: str | None, older_than: str | None, max_size: str | None) -> None:
    """Drop the stat memo's entries of files that no longer exist; with --older-than / --max-size, also old or
    least recently used results."""
    age = parse_duration(older_than) if older_than is not None else None
    size = parse_size(max_size) if max_size is not None else None
    memo = _memo(cache_path)
    if memo is not None:
        with memo:
            gone = memo.prune(machine_id())
            click.echo(f"removed {gone:,} memo {'entry' if gone == 1 else 'entries'} of files that no longer "
                       f"exist ({memo.stats().path})")
    if age is None and size is None:
        return
    with _open(cache_path) as cache:
        result = cache.prune(older_than=age, max_size=size)
        click.echo(
            f"removed {result.removed:,} cached result(s); {_bytes(result.bytes_before)} -> "
            f"{_bytes(result.bytes_after)} ({cache.path})"
        )


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not m:
        raise UsageError(f"not a duration: {text!r} (try 30d, 12h, 90m, 3600s)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise UsageError(f"not a size: {text!r} (try 500MB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def format_stats(stats: CacheStats) -> str:
    if not stats.exists:
        return f"cache {stats.path}: empty (not created yet)"
    lines = [
        f"cache      {stats.path}",
        f"entries    {stats.entries:,} in {len(stats.namespaces)} namespace(s)",
        f"on disk    {_bytes(stats.bytes_on_disk)}"
        + (f" ({stats.bytes_per_entry:,.0f} bytes per entry)" if stats.entries else ""),
    ]
    if stats.entries:
        lines += [
            f"written    {_when(stats.oldest)} … {_when(stats.newest)}",
            f"last used  {_when(stats.last_access)}",
        ]
    for ns in stats.namespaces:
        lines.append(
            f"  {ns.name}  {ns.entries:>10,} entries  written {_when(ns.oldest)} … {_when(ns.newest)}  "
            f"last used {_when(ns.last_access)}"
        )
    return "\n".join(lines)


def format_memo_stats(stats: MemoStats) -> str:
    if not stats.exists:
        return f"memo       {stats.path}: empty (not created yet)"
    return (f"memo       {stats.entries:,} entries ({stats.files:,} files), {_bytes(stats.bytes_on_disk)} on disk "
            f"({stats.path})")


def _when(ts: int | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"
