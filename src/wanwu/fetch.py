"""Each input's bytes: files read, URLs downloaded, objects fetched, uploads taken as they are; sha256 of each.

:class:`Fetcher` bounds what it reads (``max_bytes``) and how long a download may take; it is thread-safe, and
the orchestrator runs it on its fetch threads. How an item's bytes are read depends on its ``kind`` alone,
through :data:`FETCHERS` (a :class:`~wanwu.registry.Registry`; the ``wanwu.fetchers`` entry-point group), so a
source plug-in that yields items of a kind of its own registers the reader of that kind beside it::

    def read_tar_member(fetcher: Fetcher, item: InputItem) -> bytes: ...   # raises InputError subclasses
    FETCHERS.register("tar", FetchKind(read_tar_member, remote=False))

``remote`` kinds (downloads) run on threads apart from local reads, so slow servers never stall file reads.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wanwu.errors import FetchError, InputError, NotFoundError, TooLargeError, UnsupportedError
from wanwu.registry import Registry
from wanwu.sources import DEFAULT_MAX_BYTES, InputItem

if TYPE_CHECKING:
    import httpx

    from wanwu.cache.memo import Remembered
    from wanwu.imaging import DecodeResult
    from wanwu.spec import PreprocessSpec


@dataclass(frozen=True, slots=True)
class Fetched:
    data: bytes
    sha256: str
    validator: str | None = None  # a URL's ETag / Last-Modified, for the stat memo (wanwu.cache.memo)
    not_modified: bool = False  # a conditional GET answered 304: ``sha256`` is the remembered one, no data


class Fetcher:
    """Reads files and downloads URLs with a size limit and timeouts; thread-safe."""

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 30.0, allow_private: bool = False
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout  # the whole download, not each read
        self.allow_private = allow_private  # see wanwu.netguard: by default only public addresses
        self._client: httpx.Client | None = None

    def fetch(self, item: InputItem, known: Remembered | None = None) -> Fetched:
        """Raises :class:`~wanwu.errors.InputError` with the reason. ``known``: what the stat memo remembers of
        a URL; it is revalidated with a conditional GET, and a 304 answers with its sha256, without data."""
        if item.kind == "missing":
            raise NotFoundError(item.error)
        if item.kind == "url":  # a download keeps its validator, and revalidates what the memo knows
            body, validator = self.download_validated(item.locator, known.stamp if known else None)
            if body is None:
                assert known is not None
                return Fetched(b"", known.sha256, validator or known.stamp, not_modified=True)
            return Fetched(body, hashlib.sha256(body).hexdigest(), validator)
        if item.kind not in FETCHERS:
            raise UnsupportedError(f"no reader for inputs of kind {item.kind!r}")
        data = FETCHERS.get(item.kind).read(self, item)
        return Fetched(data, hashlib.sha256(data).hexdigest())

    def check_size(self, size: int) -> None:
        """Raises TooLargeError above ``max_bytes`` (for readers: before reading when the size is known)."""
        if size > self.max_bytes:
            raise TooLargeError(f"{size:,} bytes, above the limit of {self.max_bytes:,}")

    def read_file(self, path: str) -> bytes:
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it would hold the thread for ever);
            # anything but a regular file is then refused before a byte is read.
            with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
                st = os.fstat(f.fileno())
                if stat.S_ISDIR(st.st_mode):
                    raise NotFoundError("is a folder, not a file")
                if not stat.S_ISREG(st.st_mode):
                    raise FetchError("not a regular file (a pipe, socket or device)")
                size = st.st_size
                self.check_size(size)
                # What the file holds, and a byte more to see one that grew since: asking for max_bytes + 1 at
                # once allocates that much, a fresh mapping that every read faults in page by page (about 300
                # faults and 0.7 ms of kernel time per phone photo).
                data = f.read(size + 1)
                if len(data) > size:  # it grew: read on, up to the limit
                    data += f.read(self.max_bytes + 1 - len(data))
                    self.check_size(len(data))
                return data
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

    def download(self, url: str) -> bytes:
        body, _ = self.download_validated(url)
        assert body is not None  # not a conditional GET
        return body

    def download_validated(self, url: str, validator: str | None = None) -> tuple[bytes | None, str | None]:
        """The body (None: not modified since ``validator``) and the response's validator."""
        import httpx

        from wanwu.netguard import deadline

        client = self._http()
        try:
            with deadline(self.timeout), client.stream("GET", url, headers=conditional(validator)) as response:
                if response.status_code == 304 and validator is not None:
                    return None, response_validator(response.headers)
                if response.status_code in (404, 410):
                    raise NotFoundError(f"HTTP {response.status_code} from {url}")
                if response.status_code >= 400:
                    raise FetchError(f"HTTP {response.status_code} from {url}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit():
                    self.check_size(int(declared))
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    self.check_size(size)
                    self.downloaded(len(chunk))
                    chunks.append(chunk)
                return b"".join(chunks), response_validator(response.headers)
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


# --- revalidation (the stat memo's validators of URLs) ------------------------------------------------------


def response_validator(headers: httpx.Headers) -> str | None:
    """What identifies this version of a resource: its ``ETag``, else a ``Last-Modified`` at least two seconds
    older than the response (a resource changed twice within one second keeps its Last-Modified)."""
    etag: str | None = headers.get("etag")
    if etag:
        return "etag:" + etag
    modified: str | None = headers.get("last-modified")
    if not modified:
        return None
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(modified).timestamp()
        date = headers.get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
    except (TypeError, ValueError, OverflowError):
        return None
    return "lm:" + modified if when <= now - 2 else None


def conditional(validator: str | None) -> dict[str, str]:
    """The request headers that revalidate ``validator``."""
    if validator is None:
        return {}
    kind, _, value = validator.partition(":")
    return {"If-None-Match": value} if kind == "etag" else {"If-Modified-Since": value} if kind == "lm" else {}


# --- readers by input kind --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchKind:
    """How the bytes of one kind of input are read: ``read(fetcher, item)`` returns them (at most
    ``fetcher.max_bytes``) or raises an :class:`~wanwu.errors.InputError`; ``remote``: over a network."""

    read: Callable[[Fetcher, InputItem], bytes]
    remote: bool = False


class _Readers(Registry[FetchKind]):
    def remote(self, kind: str) -> bool:
        """Items of ``kind`` are read over a network (an unknown kind is not: it fails at once)."""
        return kind in self and self.get(kind).remote


def _read_file(fetcher: Fetcher, item: InputItem) -> bytes:
    return fetcher.read_file(item.locator)


def _download(fetcher: Fetcher, item: InputItem) -> bytes:
    return fetcher.download(item.locator)


def _uploaded(fetcher: Fetcher, item: InputItem) -> bytes:
    data = item.data or b""
    fetcher.check_size(len(data))
    return data


FETCHERS = _Readers("input kind", group="wanwu.fetchers")
FETCHERS.register("file", FetchKind(_read_file))
FETCHERS.register("url", FetchKind(_download, remote=True))
FETCHERS.register("bytes", FetchKind(_uploaded))
FETCHERS.lazy("object", "wanwu.objstore:FETCH", extra="s3")


# --- read where decoded ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadThenDecode:
    """A decode task over local files that the decode worker reads itself. In a run with no result cache to
    consult before decoding, a file's bytes then never cross from the run to its worker: a phone photo is
    megabytes through a pipe, copied on both sides. For each item, ``(sha256, result)``: the item fetched by
    :meth:`Fetcher.fetch`, as the run would have (an item that cannot be read gives its failure and no sha256),
    then ``decode([data], spec, options)``."""

    decode: Callable[..., list[DecodeResult]]
    max_bytes: int

    def __call__(self, items: list[InputItem], spec: PreprocessSpec, options: Any
                 ) -> list[tuple[str | None, DecodeResult]]:
        fetcher = Fetcher(self.max_bytes)
        out: list[tuple[str | None, DecodeResult]] = []
        for item in items:
            try:
                fetched = fetcher.fetch(item)
            except InputError as e:
                out.append((None, (e.type, str(e))))
                continue
            out.append((fetched.sha256, self.decode([fetched.data], spec, options)[0]))
        return out
