"""Option groups shared by several commands, composed as decorators."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from wanwu.backends import BackendOptions
from wanwu.cli.messages import h
from wanwu.config import RecognizeOptions
from wanwu.records import RecordOptions
from wanwu.runners import RUNNERS

F = TypeVar("F", bound=Callable[..., Any])


def _compose(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def wrap(fn: F) -> F:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return wrap


model_options = _compose(
    click.option(
        "-m", "--model", "model", metavar="MODEL", default=None,
        help=h("model"),
    ),
    click.option(
        "-l", "--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help=h("labels"),
    ),
    click.option(
        "--label-column", metavar="NAME", default=None,
        help=h("label_column"),
    ),
    click.option("--device", default="auto", show_default=True, help=h("device")),
    click.option(
        "--threads", type=int, default=0, help=h("threads")
    ),
    click.option(
        "--streams", type=int, default=0,
        help=h("streams"),
    ),
    click.option(
        "--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
        help=h("precision"),
    ),
    click.option(
        "--int8", type=click.Choice(["auto", "exact", "native"]), default="auto", show_default=True,
        help=h("int8"),
    ),
)


prompt_option = click.option(
    "--prompt", "prompts", multiple=True, metavar="TEMPLATE", help=h("prompt"),
)
"""``--prompt "一张{}的照片"`` (repeatable): prompt templates of a zero-shot (CLIP) model."""


def backend_options(kw: dict[str, Any]) -> BackendOptions:
    return BackendOptions(
        device=kw["device"], threads=kw["threads"], precision=kw["precision"], int8=kw["int8"], streams=kw["streams"]
    )


def recognize_options(kw: dict[str, Any], **overrides: Any) -> RecognizeOptions:
    """RecognizeOptions from the shared model/run flags; ``overrides`` for what a command sets itself."""
    base = RecognizeOptions()
    values: dict[str, Any] = {
        "decoders": kw["decoders"],
        "max_pixels": kw["max_pixels"] if kw["max_pixels"] is not None else base.max_pixels,
        "max_bytes": kw["max_bytes"] if kw["max_bytes"] is not None else base.max_bytes,
        "fetch_timeout": kw["timeout"],
        "allow_private_urls": kw.get("allow_private_urls", False),
        "cache": not kw["no_cache"],
        "full_decode": kw["full_decode"],
        "jpeg_decoder": kw.get("jpeg_decoder", "cpu"),
        "decode_timeout": kw["decode_timeout"],
        "decode_budget": kw.get("decode_budget"),
        "decode_memory_mb": kw.get("decode_memory_mb"),
        "formats": tuple(name for part in kw["formats"] for name in part.split(",") if name.strip()),
        "cache_path": kw["cache_path"],
        "rehash": kw.get("rehash", False),
        "backend": backend_options(kw),
    }
    if "batch_size" in kw:
        values["batch_size"] = kw["batch_size"]
    if "top_k" in kw:
        values["record"] = RecordOptions(kw["top_k"], kw["score"], kw["threshold"])
    return RecognizeOptions(**{**values, **overrides})


io_options = _compose(
    click.option(
        # --decoders: `wanwu worker` is a queue worker, so this option no longer says "workers" (kept as an alias)
        "-j", "--decoders", "--workers", "decoders", type=int, default=-1, show_default=True,
        help=h("workers"),
    ),
    click.option("--no-cache", is_flag=True, help=h("no_cache")),
    click.option("--rehash", is_flag=True, help=h("rehash")),
    click.option(
        "--cache", "cache_path", metavar="PATH|URL", default=None, help=h("cache"),
    ),
    click.option(
        "--max-pixels", type=click.IntRange(min=1), default=RecognizeOptions.max_pixels,
        help=h("max_pixels"),
    ),
    click.option(
        "--full-decode", is_flag=True,
        help=h("full_decode"),
    ),
    click.option("--jpeg-decoder", metavar="cpu|auto|NAME", default="cpu", show_default=True,
                 help=h("jpeg_decoder")),
    click.option("--max-bytes", type=click.IntRange(min=1), default=RecognizeOptions.max_bytes,
                 help=h("max_bytes")),
    click.option("--decode-timeout", type=click.FloatRange(min=0, min_open=True),
                 default=RecognizeOptions.decode_timeout, show_default=True, help=h("decode_timeout")),
    click.option("--decode-budget", type=click.FloatRange(min=0, min_open=True), default=None,
                 help=h("decode_budget")),
    click.option("--decode-memory-mb", type=click.IntRange(min=0), default=None, help=h("decode_memory_mb")),
    click.option("--formats", multiple=True, metavar="LIST", help=h("formats")),
    click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=RecognizeOptions.fetch_timeout,
                 show_default=True, help=h("timeout")),
    click.option("--allow-private-urls", is_flag=True, help=h("allow_private_urls")),
)
"""Reading, decoding and caching: the flags every command that recognizes images shares."""

run_options = _compose(
    click.option("-k", "--top-k", type=click.IntRange(1, 50), default=5, show_default=True,
                 help=h("top_k")),
    click.option(
        "--score", type=click.Choice(["softmax", "logit"]), default="softmax", show_default=True,
        help=h("score"),
    ),
    click.option("--threshold", type=float, default=None, help=h("threshold")),
    click.option("-b", "--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                 help=h("batch_size")),
    io_options,
)

runner_options = _compose(
    click.option("--runner", type=click.Choice(sorted(RUNNERS.names())), default="local", show_default=True,
                 help=h("runner")),
    click.option("--ray-address", default=None, metavar="ADDR", help=h("ray_address")),
    click.option("--ray-actors", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
                 help=h("ray_actors")),
)
"""Where a run executes: the runner registry (:mod:`wanwu.runners`)."""
