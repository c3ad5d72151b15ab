"""One exception hierarchy for everything a user can cause.

Per-input problems (a corrupt file, a dead URL) never raise out of a run: they become error records whose
``type`` is one of :data:`ERROR_TYPES`. Everything else (a bad option, an unloadable model) raises a
:class:`WanwuError` subclass with a message meant for a person.
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorType = Literal[
    "not_found", "decode_error", "too_large", "unsupported", "fetch_error", "model_error", "internal"
]
ERROR_TYPES: tuple[ErrorType, ...] = (
    "not_found",
    "decode_error",
    "too_large",
    "unsupported",
    "fetch_error",
    "model_error",
    "internal",
)


DISTRIBUTION = "wanwu-vision"
"""wanwu's name on PyPI (``wanwu`` there is an unrelated project); the import and the command are ``wanwu``."""


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra`` of this distribution (never a stranger's ``wanwu``)."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


class WanwuError(Exception):
    """Base class of every error wanwu raises on purpose."""


class UsageError(WanwuError):
    """The caller asked for something inconsistent or impossible (exit code 2 on the CLI)."""


class ClosedError(WanwuError):
    """The object was closed: it does no more work (a closed object never starts threads or processes again)."""


class ModelError(WanwuError):
    """A model could not be found, loaded or understood."""


class CheckpointMismatchError(ModelError):
    """A checkpoint does not fill the network's parameters exactly."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
        if mismatched:
            shown = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in mismatched]
            parts.append(f"{len(mismatched)} mis-shaped key(s): {_preview(shown)}")
        super().__init__("checkpoint does not match the network: " + "; ".join(parts))


class DownloadError(ModelError):
    """A model file could not be downloaded or failed its integrity check."""


class MissingExtraError(WanwuError):
    """An optional dependency is not installed; the message names the extra that provides it."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package, self.extra = package, extra
        super().__init__(f"{purpose} needs the '{package}' package: install it with  {install_hint(extra)}")


class OutOfMemoryError(WanwuError):
    """A backend ran out of memory for a batch; the engine halves the batch and retries."""


class DeviceOutOfMemoryError(OutOfMemoryError):
    """Out of memory even for a batch of one image. Every crop has the same size, so the device (full, or
    shared with another process), not the image, is at fault: the images of that batch get ``model_error``
    records (never ``too_large``, which says the file is too big) and the run goes on."""


class CacheError(WanwuError):
    """The result cache could not be opened or used."""


class IndexFolderError(WanwuError):
    """An index folder that is missing, foreign, damaged, or made by another model."""


class QueueError(WanwuError):
    """A job queue could not be reached or used."""


class QueueUnavailableError(QueueError):
    """The queue's store is briefly unusable (Redis down, restarting or loading its data; SQLite's write lock
    held by another process past the busy timeout). Retrying later is expected to succeed."""


class QueueStorageError(QueueError):
    """The queue refuses more uploaded bytes: its upload budget is spent until jobs finish or are deleted."""


class InputError(WanwuError):
    """One input could not be turned into pixels. Becomes an error record, never stops a run."""

    type: ClassVar[ErrorType] = "decode_error"


class NotFoundError(InputError):
    type = "not_found"


class DecodeError(InputError):
    type = "decode_error"


class TooLargeError(InputError):
    type = "too_large"


class UnsupportedError(InputError):
    type = "unsupported"


class FetchError(InputError):
    type = "fetch_error"


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … (+{len(items) - limit} more)" if len(items) > limit else "")
