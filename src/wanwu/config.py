"""One typed options object for a recognition run, shared by the CLI, the library and the service."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from wanwu.backends import BackendOptions
from wanwu.errors import UsageError
from wanwu.imaging import DEFAULT_MAX_PIXELS, DecodeOptions
from wanwu.paths import wanwu_home
from wanwu.records import RecordOptions
from wanwu.sources import DEFAULT_MAX_BYTES
from wanwu.spec import ModelSpec, PreprocessSpec


@dataclass(frozen=True)
class RecognizeOptions:
    record: RecordOptions = field(default_factory=RecordOptions)  # the default for calls that pass none
    batch_size: int = 32
    workers: int = -1  # decode processes: -1 = one per core, 0 = decode in threads of this process
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    fetch_timeout: float = 30.0  # a whole URL download
    allow_private_urls: bool = False  # fetch URLs on loopback/private/link-local addresses (wanwu.netguard)
    fetch_threads: int = 8
    full_decode: bool = False  # decode large JPEGs at full size instead of a reduced DCT scale
    decode_timeout: float = 30.0  # seconds one image may take to decode before its worker is replaced
    formats: tuple[str, ...] = ()  # image formats decoded beyond the defaults (--formats psd,dds or all)
    cache: bool = True
    cache_path: Path | None = None  # None = $WANWU_HOME/cache.sqlite3
    backend: BackendOptions = field(default_factory=BackendOptions)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers < -1:
            raise UsageError(f"-j/--decoders must be >= 0 (or -1 for one per core), got {self.workers}")
        if self.max_pixels < 1 or self.max_bytes < 1:
            raise UsageError("--max-pixels and --max-bytes must be positive")
        if not self.decode_timeout > 0:
            raise UsageError(f"--decode-timeout must be positive, got {self.decode_timeout}")
        self.decode_options()  # unknown --formats names fail here, before any work

    @property
    def decode_workers(self) -> int:
        return (os.cpu_count() or 1) if self.workers == -1 else self.workers

    def decode_spec(self, spec: PreprocessSpec) -> PreprocessSpec:
        """The model's preprocessing as decoding should apply it for this run."""
        return replace(spec, jpeg_draft_factor=0.0) if self.full_decode else spec

    def cache_namespace(self, spec: ModelSpec) -> str:
        """The result cache's namespace for ``spec`` run with these options (a full decode is its own)."""
        namespace = replace(spec, preprocess=self.decode_spec(spec.preprocess)).cache_namespace()
        if self.backend.embeddings:  # results that carry embeddings are kept apart from those without
            namespace += f"+emb:{self.backend.embedding_output or 'auto'}"
        return namespace

    def decode_options(self) -> DecodeOptions:
        return DecodeOptions.with_formats(self.max_pixels, self.formats)

    def resolved_cache_path(self) -> Path:
        return self.cache_path or wanwu_home() / "cache.sqlite3"
