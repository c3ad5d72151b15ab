"""``wanwu serve``: the HTTP service (FastAPI + uvicorn, one process, one dynamic batcher)."""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any

import click

from wanwu.cli.collector import collecting_less
from wanwu.cli.options import io_options, model_options, recognize_options
from wanwu.config import RecognizeOptions
from wanwu.errors import MissingExtraError, UsageError
from wanwu.service.config import SWITCH_INTERVAL_S, ServeConfig


@click.command("serve")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 = all).")
@click.option("-p", "--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--max-batch-size", type=int, default=32, show_default=True,
              help="Most images the dynamic batcher runs at once.")
@click.option("--max-delay-ms", type=float, default=10.0, show_default=True,
              help="Longest a batch waits for more images after its first arrived.")
@click.option("--max-queue", type=int, default=256, show_default=True,
              help="Images that may wait for the batcher; beyond it requests get 503 + Retry-After.")
@click.option("--max-upload-mb", type=float, default=50.0, show_default=True,
              help="Largest request body, in MB (413 above it).")
@click.option("--max-inflight-mb", type=float, default=0.0,
              help="Request body and URL download bytes held at once, all requests together (503 + "
              "Retry-After, or an error record for a URL, beyond it; default 4 × --max-upload-mb).")
@click.option("--body-timeout", type=float, default=20.0, show_default=True, metavar="S",
              help="Seconds a request body may take, plus one per --min-upload-rate KB received (408 beyond).")
@click.option("--min-upload-rate", type=float, default=64.0, show_default=True, metavar="KB",
              help="Slowest upload kept, in KB per second on average once --body-timeout has passed.")
@click.option("--max-files", type=int, default=64, show_default=True, help="Most images in one request.")
@click.option("--api-key", "api_keys", multiple=True, envvar="WANWU_API_KEYS", metavar="KEY",
              help="Require this key (Authorization: Bearer KEY or X-API-Key); repeatable. "
              "Env: WANWU_API_KEYS (space-separated).")
@click.option("-k", "--top-k", type=int, default=5, show_default=True,
              help="Default labels per image (1-50).")
@click.option("--score", type=click.Choice(["softmax", "logit"]), default="softmax", show_default=True,
              help="softmax probabilities, or the raw logits.")
@click.option("--threshold", type=float, default=None, help="Drop predictions scoring below this.")
@io_options
@click.option("--queue", default=None, metavar="URL",
              help="Also serve /v1/jobs on this job queue (sqlite:///PATH or redis://HOST:PORT/DB).")
@click.option("--index", "index", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Also serve POST /v1/search over this index folder (wanwu index); -m defaults to its model.")
@click.option("--no-urls", is_flag=True, help="Do not fetch URL inputs (they become error records).")
@click.option("--insecure", is_flag=True,
              help="Allow listening on a non-loopback address without --api-key (anyone who can reach it may use it).")
@click.option("--access-log", is_flag=True, help="Log every request (uvicorn's access log).")
def command(host: str, port: int, access_log: bool, **kw: Any) -> int:
    """Serve recognition over HTTP, with a web page at / and the API under /v1.

    POST /v1/recognize takes multipart 'files' (and 'top_k'), or JSON {"urls": [...]} or
    {"images": [base64, ...]}, and answers {"results": [record, ...]} with the same records as
    `wanwu recognize`. With --index DIR, POST /v1/search answers text or photo queries.
    Also: /v1/models, /healthz, /readyz, /metrics, /docs.
    """
    config = _config(host, port, kw)
    check_exposure(config.host, config.api_keys, kw["insecure"])
    try:
        import uvicorn

        from wanwu.service.app import create_app
    except ImportError as e:
        package = getattr(e, "name", None) or "fastapi"
        raise MissingExtraError(package.split(".")[0], "server", "wanwu serve") from e

    server: Any = None
    failed: list[BaseException] = []

    def stop(error: BaseException) -> None:
        failed.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(config, on_load_failed=stop)
    level = logging.getLogger("wanwu").getEffectiveLevel()
    logging.getLogger("wanwu").setLevel(min(level, logging.INFO))
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level="info", access_log=access_log,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(uv_config)
    click.echo(f"wanwu: serving on http://{config.host}:{config.port}/ (loading the model…)", err=True)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        with collecting_less():  # what is imported by now (the web framework, numpy) is never scanned again
            server.run()
    finally:
        sys.setswitchinterval(switch_interval)
    if failed:
        click.echo(f"wanwu: error: {failed[0]}", err=True)
        return 1
    return 0


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, api_keys: tuple[str, ...], insecure: bool) -> None:
    """Refuse to listen beyond this machine with no API key, unless the user says --insecure."""
    if api_keys or is_loopback(host):
        return
    if not insecure:
        raise UsageError(
            f"refusing to serve on {host} without an API key: anyone who can reach it could use it. "
            "Give --api-key KEY (or WANWU_API_KEYS), listen on 127.0.0.1, or pass --insecure to accept the risk"
        )
    click.echo(f"wanwu: WARNING: serving on {host} with no API key (--insecure): anyone who can reach it "
               "can use it", err=True)


SERVE_DECODE_BUDGET_S = 60.0


def _config(host: str, port: int, kw: dict[str, Any]) -> ServeConfig:
    batch = kw["max_batch_size"] if kw["max_batch_size"] > 0 else RecognizeOptions().batch_size
    # Each request decodes under a time budget, on at most half the decode processes: one caller's slow files
    # cannot hold every decoder (wanwu.pipeline).
    budget = kw["decode_budget"] if kw["decode_budget"] is not None else SERVE_DECODE_BUDGET_S
    options = recognize_options(kw, batch_size=batch, decode_budget=budget, decode_share=0.5)
    model = kw["model"]
    if kw["index"] is not None and model is None:  # the model that made the index
        from wanwu.index import ImageIndex

        model = ImageIndex.open(kw["index"]).header.get("model_source")
    return ServeConfig(
        model=model,
        labels=kw["labels"],
        label_column=kw["label_column"],
        host=host,
        port=port,
        max_batch_size=kw["max_batch_size"],
        max_delay_ms=kw["max_delay_ms"],
        max_queue=kw["max_queue"],
        max_upload_mb=kw["max_upload_mb"],
        max_files=kw["max_files"],
        max_inflight_mb=kw["max_inflight_mb"],
        body_timeout_s=kw["body_timeout"],
        min_upload_kb_s=kw["min_upload_rate"],
        api_keys=tuple(kw["api_keys"]),
        queue=kw["queue"],
        index=kw["index"],
        allow_urls=not kw["no_urls"],
        options=options,
    )

