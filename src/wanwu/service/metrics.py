"""Prometheus metrics, in a registry of their own per app (so several apps in one process never clash)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from wanwu.records import Record

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Only these paths get their own label; anything else is "other", so scanners cannot blow up cardinality.
KNOWN_PATHS = frozenset(
    {"/", "/v1/recognize", "/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"}
)


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "wanwu_http_requests", "HTTP requests answered.", ["path", "method", "status"], registry=r
        )
        self.request_errors = Counter(
            "wanwu_http_request_errors", "HTTP requests answered with a 4xx or 5xx status.",
            ["path", "status"], registry=r,
        )
        self.latency = Histogram(
            "wanwu_http_request_duration_seconds", "Time to answer an HTTP request.", ["path"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.images = Counter("wanwu_images", "Records returned, by status.", ["status"], registry=r)
        self.image_errors = Counter(
            "wanwu_image_errors", "Error records returned, by error type.", ["type"], registry=r
        )
        self.batch_size = Histogram(
            "wanwu_batch_size", "Images per batch run by the dynamic batcher.", buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "wanwu_batch_duration_seconds", "Model time per batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Gauge("wanwu_queue_depth", "Images waiting for the batcher.", registry=r)
        self.rejected = Counter(
            "wanwu_queue_rejections", "Requests refused with 503 because the queue was full.", registry=r
        )
        self.cache_hits = Counter("wanwu_cache_hits", "Images answered from the result cache.", registry=r)
        self.ready = Gauge("wanwu_ready", "1 once the model is loaded.", registry=r)
        self.body_bytes = Gauge(
            "wanwu_request_body_bytes_in_flight", "Request body and URL download bytes held by requests in progress.",
            registry=r,
        )

    # BatchObserver
    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def queue_depth(self, depth: int) -> None:
        self.queue.set(depth)

    def records(self, records: list[Record]) -> None:
        for record in records:
            self.images.labels(record.status).inc()
            if record.error is not None:
                self.image_errors.labels(record.error.type).inc()

    def request(self, path: str, method: str, status: int, seconds: float) -> None:
        label = path if path in KNOWN_PATHS else "/static" if path.startswith("/static/") else "other"
        self.requests.labels(label, method, str(status)).inc()
        if status >= 400:
            self.request_errors.labels(label, str(status)).inc()
        self.latency.labels(label).observe(seconds)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class MetricsMiddleware:
    """Pure ASGI: counts every HTTP request by path and status and observes its latency."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request(scope["path"], scope["method"], status, time.perf_counter() - start)
