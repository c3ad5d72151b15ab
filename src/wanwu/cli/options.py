"""Option groups shared by several commands, composed as decorators."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from wanwu.backends import BackendOptions
from wanwu.config import RecognizeOptions
from wanwu.records import RecordOptions

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
        help="An .onnx file (with --labels), a model folder, or modelscope:OWNER/NAME[@REV]. "
        "Default: the 万物识别 general model from ModelScope.",
    ),
    click.option(
        "-l", "--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="Label file, UTF-8, line i = class i (overrides the model folder's).",
    ),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option(
        "--threads", type=int, default=0, help="Inference threads per stream (0 = the cores shared among streams)."
    ),
    click.option(
        "--streams", type=int, default=0,
        help="Batches inferred at once (0 = auto: 2 for onnxruntime on a CPU, else 1).",
    ),
    click.option(
        "--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
        help="GPU autocast precision (torch backend).",
    ),
    click.option(
        "--int8", type=click.Choice(["auto", "exact", "native"]), default="auto", show_default=True,
        help="int8 ONNX models: exact integer kernels (auto: on CPUs without VNNI) or the fastest native ones.",
    ),
)


def backend_options(kw: dict[str, Any]) -> BackendOptions:
    return BackendOptions(
        device=kw["device"], threads=kw["threads"], precision=kw["precision"], int8=kw["int8"], streams=kw["streams"]
    )


def recognize_options(kw: dict[str, Any], **overrides: Any) -> RecognizeOptions:
    """RecognizeOptions from the shared model/run flags; ``overrides`` for what a command sets itself."""
    base = RecognizeOptions()
    values: dict[str, Any] = {
        "workers": kw["workers"],
        "max_pixels": kw["max_pixels"] or base.max_pixels,
        "max_bytes": kw["max_bytes"] or base.max_bytes,
        "fetch_timeout": kw["timeout"],
        "allow_private_urls": kw.get("allow_private_urls", False),
        "cache": not kw["no_cache"],
        "full_decode": kw["full_decode"],
        "cache_path": kw["cache_path"],
        "backend": backend_options(kw),
    }
    if "batch_size" in kw:
        values["batch_size"] = kw["batch_size"]
    if "top_k" in kw:
        values["record"] = RecordOptions(kw["top_k"], kw["score"], kw["threshold"])
    return RecognizeOptions(**{**values, **overrides})


io_options = _compose(
    click.option(
        "-j", "--workers", type=int, default=-1,
        help="Decode worker processes (-1 = one per core, 0 = decode in threads).",
    ),
    click.option("--no-cache", is_flag=True, help="Neither read nor write the result cache."),
    click.option(
        "--cache", "cache_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="Result cache file (default $WANWU_HOME/cache.sqlite3).",
    ),
    click.option(
        "--max-pixels", type=int, default=None, help="Refuse images above this many pixels (too_large)."
    ),
    click.option(
        "--full-decode", is_flag=True,
        help="Decode large JPEGs at full size (slower; by default libjpeg scales them down while decoding "
        "as far as the model's resize allows).",
    ),
    click.option("--max-bytes", type=int, default=None, help="Refuse files/downloads above this size."),
    click.option(
        "--timeout", type=float, default=30.0, show_default=True, help="URL fetch deadline (whole download), seconds."
    ),
    click.option(
        "--allow-private-urls", is_flag=True,
        help="Also fetch URLs whose host is loopback, private, link-local or reserved (off: public only).",
    ),
)
"""Reading, decoding and caching: the flags every command that recognizes images shares."""

run_options = _compose(
    click.option("-k", "--top-k", type=int, default=5, show_default=True, help="Labels per image (1-50)."),
    click.option(
        "--score", type=click.Choice(["softmax", "logit"]), default="softmax", show_default=True,
        help="softmax probabilities, or the raw logits (ModelScope's score).",
    ),
    click.option("--threshold", type=float, default=None, help="Drop predictions scoring below this."),
    click.option("-b", "--batch-size", type=int, default=32, show_default=True, help="Images per batch."),
    io_options,
)
