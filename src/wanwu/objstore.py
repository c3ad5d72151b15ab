"""Object storage inputs: ``s3://bucket/prefix/`` is read like a folder, ``s3://bucket/key.jpg`` like a file.

Through fsspec's s3fs (the ``s3`` extra), so the standard AWS credential chain applies (``AWS_ACCESS_KEY_ID``
/ ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``~/.aws``, instance roles), and
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` points it at any S3-compatible server (MinIO, Ceph, Aliyun OSS's
S3-compatible endpoint, …). A prefix is walked lazily, folder level by folder level, sorted by key in each,
picking image keys by extension like a local folder walk. A listing that fails (no such bucket, denied, no
credentials) becomes one error record for that argument; each object's read failure is that object's record.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

from wanwu.errors import FetchError, MissingExtraError, NotFoundError, TooLargeError
from wanwu.fetch import Fetcher, FetchKind
from wanwu.sources import IMAGE_EXTENSIONS, OBJECT_SCHEMES, InputItem, SourceOptions

SCHEMES = OBJECT_SCHEMES

_lock = threading.Lock()
_cache: dict[tuple[str | None, ...], Any] = {}


def claims(arg: str) -> bool:
    return arg.lower().startswith(SCHEMES)


def filesystem() -> Any:
    """One s3fs filesystem per endpoint and credentials in the environment (they may change between runs)."""
    try:
        import s3fs
    except ModuleNotFoundError:
        raise MissingExtraError("s3fs", "s3", "Reading s3:// inputs") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    key = (endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    with _lock:
        fs = _cache.get(key)
        if fs is None:
            fs = _cache[key] = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        return fs


def _is_image(key: str) -> bool:
    return os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS


def expand(arg: str) -> Iterator[InputItem]:
    """A key that is an object: that object. Otherwise a prefix: its image objects, walked lazily."""
    bare = arg[len("s3://"):]
    if not bare.strip("/"):
        yield InputItem.failed(arg, "no bucket named")
        return
    try:
        fs = filesystem()
        fs.invalidate_cache()  # listings remembered from an earlier run may be stale (ETags included)
        info = _file_info(fs, bare) if not arg.endswith("/") else None
        if info is not None:
            yield InputItem(arg, "object", arg, stamp=stamp(info))
            return
        found = False
        for folder, _dirs, files in fs.walk(bare.rstrip("/"), detail=True):
            for name in sorted(files):
                if _is_image(name):
                    found = True
                    yield InputItem(f"s3://{folder.rstrip('/')}/{name}", "object", f"s3://{folder}/{name}",
                                    stamp=stamp(files[name]))
        if not found:
            yield InputItem.failed(arg, _nothing_under(fs, bare))
    except MissingExtraError:
        raise
    except FileNotFoundError:
        yield InputItem.failed(arg, "no such bucket or key")
    except PermissionError as e:
        yield InputItem.failed(arg, f"access denied listing {arg}: {e}", "fetch_error")
    except OSError as e:
        yield InputItem.failed(arg, f"cannot list {arg}: {e}", "fetch_error")
    except Exception as e:  # botocore's NoCredentialsError, EndpointConnectionError … are not OSErrors
        yield InputItem.failed(arg, f"cannot list {arg}: {type(e).__name__}: {e}", "fetch_error")


def _nothing_under(fs: Any, bare: str) -> str:
    """Why a listing found no image: no such bucket, no such key or prefix, or no image objects there."""
    bucket, _, key = bare.partition("/")
    if not fs.exists(bucket):
        return f"no such bucket: {bucket}"
    if key.strip("/") and not fs.exists(bare.rstrip("/")):
        return f"no object or prefix {key!r} in bucket {bucket}"
    return "no image objects under this prefix"


def _file_info(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = fs.info(path)
    except FileNotFoundError:
        return None
    return info if info.get("type") == "file" else None


def stamp(info: dict[str, Any]) -> str | None:
    """What the stat memo compares (:func:`wanwu.cache.memo.object_stamp`): size, ETag, version id."""
    from wanwu.cache.memo import object_stamp

    return object_stamp(info.get("size"), info.get("ETag"), info.get("VersionId"))


def read(url: str, max_bytes: int) -> bytes:
    """The object's bytes, at most ``max_bytes``; raises :class:`~wanwu.errors.InputError` with the reason."""
    path = url[len("s3://"):]
    try:
        fs = filesystem()
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise TooLargeError(f"{size:,} bytes, above the limit of {max_bytes:,}")
        data: bytes = fs.cat_file(path)
    except (TooLargeError, MissingExtraError):
        raise
    except FileNotFoundError:
        raise NotFoundError(f"no such object {url}") from None
    except PermissionError as e:
        raise FetchError(f"access denied reading {url}: {e}") from None
    except Exception as e:  # botocore errors are not OSErrors
        raise FetchError(f"cannot read {url}: {type(e).__name__}: {e}") from None
    if len(data) > max_bytes:
        raise TooLargeError(f"{len(data):,} bytes, above the limit of {max_bytes:,}")
    return data


class _ObjectSource:
    """The ``object`` entry of :data:`wanwu.sources.SOURCES`: ``s3://`` prefixes and keys."""

    name = "object"

    def claims(self, arg: str) -> bool:
        return claims(arg)

    def expand(self, arg: str, options: SourceOptions | None = None) -> Iterator[InputItem]:
        return expand(arg)


SOURCE = _ObjectSource()


def _fetch(fetcher: Fetcher, item: InputItem) -> bytes:
    return read(item.locator, fetcher.max_bytes)


FETCH = FetchKind(_fetch, remote=True)  # the ``object`` entry of :data:`wanwu.fetch.FETCHERS`
