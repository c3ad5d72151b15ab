"""Each input's bytes: files read, URLs downloaded, objects fetched, uploads taken as they are; sha256 of each.

:class:`Fetcher` bounds what it reads (``max_bytes``) and how long a download may take; it is thread-safe, and
the orchestrator runs it on its fetch threads.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wanwu.errors import FetchError, InputError, NotFoundError, TooLargeError
from wanwu.sources import DEFAULT_MAX_BYTES, InputItem

if TYPE_CHECKING:
    import httpx


@dataclass(frozen=True, slots=True)
class Fetched:
    data: bytes
    sha256: str


class Fetcher:
    """Reads files and downloads URLs with a size limit and timeouts; thread-safe."""

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 30.0, allow_private: bool = False
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout  # the whole download, not each read
        self.allow_private = allow_private  # see wanwu.netguard: by default only public addresses
        self._client: httpx.Client | None = None

    def fetch(self, item: InputItem) -> Fetched:
        """Raises :class:`~wanwu.errors.InputError` with the reason."""
        if item.kind == "missing":
            raise NotFoundError(item.error)
        if item.kind == "bytes":
            data = item.data or b""
            self._check_size(len(data))
        elif item.kind == "url":
            data = self._download(item.locator)
        elif item.kind == "object":
            from wanwu import objstore

            data = objstore.read(item.locator, self.max_bytes)
        else:
            data = self._read(item.locator)
        return Fetched(data, hashlib.sha256(data).hexdigest())

    def _check_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise TooLargeError(f"{size:,} bytes, above the limit of {self.max_bytes:,}")

    def _read(self, path: str) -> bytes:
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it would hold the thread for ever);
            # anything but a regular file is then refused before a byte is read.
            with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                if stat.S_ISDIR(mode):
                    raise NotFoundError("is a folder, not a file")
                if not stat.S_ISREG(mode):
                    raise FetchError("not a regular file (a pipe, socket or device)")
                self._check_size(os.fstat(f.fileno()).st_size)
                return f.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise NotFoundError("no such file") from None
        except IsADirectoryError:
            raise NotFoundError("is a folder, not a file") from None
        except PermissionError:
            raise FetchError("permission denied") from None
        except InputError:
            raise
        except OSError as e:
            raise FetchError(f"cannot read file: {e.strerror or e}") from None

    def _download(self, url: str) -> bytes:
        import httpx

        from wanwu.netguard import deadline

        client = self._http()
        try:
            with deadline(self.timeout), client.stream("GET", url) as response:
                if response.status_code in (404, 410):
                    raise NotFoundError(f"HTTP {response.status_code} from {url}")
                if response.status_code >= 400:
                    raise FetchError(f"HTTP {response.status_code} from {url}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit():
                    self._check_size(int(declared))
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    self._check_size(size)
                    self.downloaded(len(chunk))
                    chunks.append(chunk)
                return b"".join(chunks)
        except InputError:
            raise
        except httpx.TimeoutException:
            raise FetchError(f"timed out after {self.timeout:g}s fetching {url}") from None
        except httpx.HTTPError as e:
            raise FetchError(f"cannot fetch {url}: {type(e).__name__}: {e}") from None

    def downloaded(self, n: int) -> None:
        """Told of each chunk a download receives, as it arrives (a seam for byte budgets: the service counts
        downloads against its in-flight bytes). Raising an InputError stops that download."""

    def _http(self) -> httpx.Client:
        from wanwu.netguard import guarded_client

        if self._client is None:
            self._client = guarded_client(self.timeout, self.allow_private)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None
