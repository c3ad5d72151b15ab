"""One typed options object for a recognition run, shared by the CLI, the library and the service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from wanwu.backends import BackendOptions
from wanwu.cache import cache_scheme
from wanwu.errors import UsageError
from wanwu.imaging import DEFAULT_MAX_PIXELS, DecodeOptions
from wanwu.paths import wanwu_home
from wanwu.records import RecordOptions
from wanwu.sources import DEFAULT_MAX_BYTES
from wanwu.spec import ModelSpec, PreprocessSpec

MAX_BATCH_SIZE = 512
# The machine's cores, read once: os.cpu_count() reads a file of /sys on every call, and a service's request
# asked for it twice (about 6 us each, holding the interpreter lock).
CPUS = os.cpu_count() or 1


@dataclass(frozen=True)
class RecognizeOptions:
    record: RecordOptions = field(default_factory=RecordOptions)  # the default for calls that pass none
    batch_size: int = 32
    decoders: int = -1  # decode processes: -1 = one per core, 0 = decode in threads of this process
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    fetch_timeout: float = 30.0  # a whole URL download
    allow_private_urls: bool = False  # fetch URLs on loopback/private/link-local addresses (wanwu.netguard)
    fetch_threads: int = 8
    full_decode: bool = False  # decode large JPEGs at full size instead of a reduced DCT scale
    decode_timeout: float = 30.0  # seconds one image may take to decode before its worker is replaced
    # Seconds of decoding one run (one service request) may use in all; past it, what is left to decode gets a
    # too_large record. None: no budget (the CLI); `wanwu serve` sets one per request.
    decode_budget: float | None = None
    decode_share: float = 1.0  # the fraction of the decode processes one run may hold at once (service: 0.5)
    # Address space (MiB) a decode process may map beyond what it maps at start; None: 3 x the decoded-memory
    # budget (4 bytes per pixel of max_pixels: 1,716 MiB at the default), 0: no limit.
    decode_memory_mb: int | None = None
    formats: tuple[str, ...] = ()  # image formats decoded beyond the defaults (--formats psd,dds or all)
    cache: bool = True
    # a path (SQLite) or redis://HOST:PORT/DB; None = $WANWU_CACHE, else $WANWU_HOME/cache.sqlite3
    cache_path: Path | str | None = None
    rehash: bool = False  # read every input again, even those the stat memo knows unchanged (wanwu.unchanged)
    # Baseline JPEGs decoded on the GPU (wanwu.gpudecode): "cpu" = never (the decode processes), "auto" = the
    # first JPEG decoder that can start here (else the CPU, said once), or a decoder's name (nvjpeg).
    jpeg_decoder: str = "cpu"
    backend: BackendOptions = field(default_factory=BackendOptions)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.batch_size > MAX_BATCH_SIZE:
            raise UsageError(
                f"--batch-size {self.batch_size} is above the most of {MAX_BATCH_SIZE}: memory grows with the "
                "batch (every image of a batch is held as float32 with the model's activations)"
            )
        if self.decode_budget is not None and not self.decode_budget > 0:
            raise UsageError(f"--decode-budget must be positive, got {self.decode_budget}")
        if not 0 < self.decode_share <= 1:
            raise UsageError(f"the decode share must be in (0, 1], got {self.decode_share}")
        if self.decode_memory_mb is not None and self.decode_memory_mb < 0:
            raise UsageError(f"--decode-memory-mb must be 0 (no limit) or positive, got {self.decode_memory_mb}")
        if self.decoders < -1:
            raise UsageError(f"-j/--decoders must be >= 0 (or -1 for one per core), got {self.decoders}")
        if self.max_pixels < 1 or self.max_bytes < 1:
            raise UsageError("--max-pixels and --max-bytes must be positive")
        if not self.decode_timeout > 0:
            raise UsageError(f"--decode-timeout must be positive, got {self.decode_timeout}")
        self.decode_options()  # unknown --formats names fail here, before any work
        if self.jpeg_decoder != "cpu":
            from wanwu.gpudecode import check_jpeg_decoder

            check_jpeg_decoder(self.jpeg_decoder)
        if self.cache:
            cache_scheme(self.cache_location())  # so do unknown cache schemes

    @property
    def decode_processes(self) -> int:
        return CPUS if self.decoders == -1 else self.decoders

    def decode_spec(self, spec: PreprocessSpec) -> PreprocessSpec:
        """The model's preprocessing as decoding should apply it for this run."""
        return replace(spec, jpeg_draft_factor=0.0) if self.full_decode else spec

    def cache_namespace(self, spec: ModelSpec, numerics: Mapping[str, str] | None = None) -> str:
        """The result cache's namespace for ``spec`` run with these options (a full decode is its own) on a
        backend whose :attr:`~wanwu.engine.Engine.numerics` are ``numerics`` (device class, precision)."""
        namespace = replace(spec, preprocess=self.decode_spec(spec.preprocess)).cache_namespace(numerics)
        if self.backend.embeddings:  # results that carry embeddings are kept apart from those without
            namespace += f"+emb:{self.backend.embedding_output or 'auto'}"
        return namespace

    def with_embeddings(self, output: str | None = None) -> RecognizeOptions:
        """These options with embeddings on: the backend gives them (from ``output``, a tensor's name, when
        given) and each record carries its image's (:attr:`RecordOptions.embeddings`)."""
        backend = replace(self.backend, embeddings=True, embedding_output=output or self.backend.embedding_output)
        return replace(self, backend=backend, record=replace(self.record, embeddings=True))

    def decode_options(self) -> DecodeOptions:
        return DecodeOptions.with_formats(self.max_pixels, self.formats)

    def decode_address_space(self) -> int | None:
        """Bytes a decode process may map beyond its start (see ``decode_memory_mb``); None: no limit."""
        if self.decode_memory_mb == 0:
            return None
        if self.decode_memory_mb is not None:
            return self.decode_memory_mb << 20
        return 3 * self.decode_options().memory_budget

    def cache_location(self) -> str:
        """Where the result cache is: ``--cache``, else ``$WANWU_CACHE``, else ``$WANWU_HOME/cache.sqlite3``."""
        if self.cache_path is not None and str(self.cache_path):
            return str(self.cache_path)
        return os.environ.get("WANWU_CACHE") or str(wanwu_home() / "cache.sqlite3")
