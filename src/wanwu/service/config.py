"""The service's one configuration object. Importing it needs no server packages (the CLI builds it)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from wanwu.config import CPUS, RecognizeOptions
from wanwu.errors import UsageError

# The interpreter's thread switch interval while `wanwu serve` runs (Python's default: 5 ms). A server passes the
# interpreter lock between many threads (the event loop, a thread per request, the batcher's consumers, a thread
# driving each decode process); a thread that has an answer for an idle decode process or a waiting request
# waits up to the interval for the lock. At 1 ms the processes idle less: 3-5% more images per second under
# load on 2 cores (benchmarks/bench_service.py; docs/performance.md), with no more CPU per image.
SWITCH_INTERVAL_S = 0.001
# Decode processes beyond one per core when `wanwu serve` is left to choose (-j -1). A request's images go to a
# process one task each, and between two tasks the process waits for the thread that drives it to get the
# interpreter lock and hand it the next; two more processes keep the cores busy meanwhile. On 2 cores under
# load: 1.84 -> 1.87 cores busy and 3.4% more images per second (5 alternated pairs; docs/performance.md).
EXTRA_DECODERS = 2


@dataclass(frozen=True)
class ServeConfig:
    """How ``wanwu serve`` runs: the model, the dynamic batcher's limits, request limits, API keys.

    ``options`` carries the per-run settings shared with the CLI (default top-k, score kind, decode
    workers, pixel/byte limits, URL fetch timeout, result cache); ``options.batch_size`` is ignored in
    favour of ``max_batch_size``.
    """

    model: str | None = None
    labels: Path | None = None
    label_column: str | None = None  # the label column of a .tsv/.csv label file
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_delay_ms: float = 10.0  # a batch waits at most this long after its first image arrived
    max_queue: int = 256  # images waiting for the batcher; beyond it requests get 503 + Retry-After
    max_upload_mb: float = 50.0  # whole request body
    max_inflight_mb: float = 0.0  # bodies and URL downloads held at once, all requests (0: 4 × max_upload_mb)
    body_timeout_s: float = 20.0  # a request body may take this long, plus a second per min_upload_kb_s KB
    min_upload_kb_s: float = 64.0  # slower uploads get 408 (the rule of Apache's mod_reqtimeout)
    max_files: int = 64  # inputs in one request
    max_requests: int = 64  # requests in progress at once (each runs on a thread of its own); more wait
    api_keys: tuple[str, ...] = ()
    retry_after_s: int = 1
    allow_urls: bool = True  # False (--no-urls): URL inputs become error records, nothing is fetched
    queue: str | None = None  # a job-queue URL: mounts /v1/jobs (see wanwu.jobs)
    index: Path | None = None  # an index folder (wanwu index) that /v1/search answers from
    options: RecognizeOptions = field(default_factory=RecognizeOptions)

    def __post_init__(self) -> None:
        # (option, value, smallest allowed, "at least" or "positive" when the bound itself is not allowed)
        bounds = [
            ("--max-batch-size", self.max_batch_size, 1, True), ("--max-delay-ms", self.max_delay_ms, 0, True),
            ("--max-queue", self.max_queue, 1, True), ("--max-upload-mb", self.max_upload_mb, 0, False),
            ("--max-inflight-mb", self.max_inflight_mb, 0, True), ("max_requests", self.max_requests, 1, True),
            ("--max-files", self.max_files, 1, True), ("--port", self.port, 0, True),
            ("--body-timeout", self.body_timeout_s, 0, False), ("--min-upload-rate", self.min_upload_kb_s, 0, False),
        ]
        for option, value, low, inclusive in bounds:
            if value < low or (value == low and not inclusive):
                limit = f"at least {low}" if inclusive else f"above {low}"
                raise UsageError(f"{option} must be {limit}, got {value}")
        if self.port >= 65536:
            raise UsageError(f"--port must be between 0 and 65535, got {self.port}")
        if any(not key for key in self.api_keys):
            raise UsageError("--api-key must not be empty")
        if self.options.decoders == -1:
            object.__setattr__(self, "options", replace(self.options, decoders=CPUS + EXTRA_DECODERS))
        if self.index is not None and not self.options.backend.embeddings:  # search needs the query's embedding
            backend = replace(self.options.backend, embeddings=True)
            object.__setattr__(self, "options", replace(self.options, backend=backend))

    @property
    def inflight_mb(self) -> float:
        return max(self.max_inflight_mb, self.max_upload_mb) if self.max_inflight_mb else 4 * self.max_upload_mb

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
