"""WebDataset shards as input: ``.tar`` files (local, ``s3://``, globs, brace ranges) read as a stream.

A shard is a plain tar whose members are samples' files, ``KEY.EXT`` side by side (img2dataset writes
``0000123.jpg`` + ``0000123.json`` + ``0000123.txt``). It is read front to back as a stream (headers parsed by
:mod:`tarfile`, no seeking, nothing extracted to disk), so a local file, an object store stream and a pipe read
the same way, and memory holds one sample at a time whatever the shard's size. Each image member becomes an
item whose ``input`` is ``SHARD#MEMBER``; the sample's ``.json`` rides along as ``meta`` with ``--with-meta``.
Non-image members are ignored. A member above the byte limit is skipped unread (its record says so). A shard
that breaks (truncated, corrupt) gives one error record saying after which member it broke; the samples before
it keep theirs. ``shards/{00000..00999}.tar`` is expanded here (brace ranges and ``{a,b}`` lists), so it works
quoted, from stdin and in job inputs alike.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import IO, Any

from wanwu.sources import IMAGE_EXTENSIONS, SHARD_SUFFIXES, InputItem, SourceOptions

SUFFIXES = SHARD_SUFFIXES
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def braces(pattern: str) -> Iterator[str]:
    """``a{00..02}b{x,y}`` -> a00bx a00by a01bx … in order (numeric ranges keep the first number's width)."""
    match = _BRACE.search(pattern)
    if match is None:
        yield pattern
        return
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numbers = _RANGE.match(body)
    if numbers:
        first, last = numbers.group(1), numbers.group(2)
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = ["{" + body + "}"]  # not a brace expression: kept as written
    for option in options:
        for rest in braces(tail):
            yield head + option + rest


def is_shard(arg: str) -> bool:
    return arg.lower().endswith(SUFFIXES)


def _shards(arg: str) -> Iterator[str]:
    """The shard paths an argument names (braces, then globs for local paths)."""
    for path in braces(arg):
        if "://" not in path and globlib.has_magic(path) and not os.path.exists(path):
            matches = sorted(globlib.glob(path, recursive=True))
            yield from matches if matches else [path]
        else:
            yield path


def _key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key is everything before the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + ext).lower()


@dataclass
class _Sample:
    key: str
    images: list[tuple[str, bytes | None, int]] = field(default_factory=list)  # member, data (None: too big), size
    meta: dict[str, Any] | None = None


def _open(shard: str, stack: ExitStack) -> IO[bytes]:
    if shard.lower().startswith("s3://"):
        from wanwu import objstore

        return stack.enter_context(objstore.filesystem().open(shard[len("s3://"):], "rb"))
    return stack.enter_context(open(shard, "rb", buffering=1 << 20))


class _Counting:
    """A read-only byte stream that knows its position (a pipe or an object stream has no tell())."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.position = 0

    def read(self, size: int) -> bytes:
        data = self.raw.read(size)
        self.position += len(data)
        return data

    def tell(self) -> int:
        return self.position


class _Headers:
    """What :meth:`tarfile.TarInfo.fromtarfile` (documented) reads of a TarFile: the stream, the encoding, the
    pax headers, the offset it advances. tarfile's own stream mode (``r|``) copies its whole read buffer on every
    read (1-3 ms a sample here); this reads headers through tarfile and the data straight from a buffered file."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.fileobj = _Counting(raw)
        self.encoding = tarfile.ENCODING
        self.errors = "surrogateescape"
        self.pax_headers: dict[str, str] = {}
        self.offset = 0

    def members(self) -> Iterator[tarfile.TarInfo]:
        """Each member; its data may be read (:meth:`read_data`) before the next one is asked for."""
        while True:
            try:
                member = tarfile.TarInfo.fromtarfile(self)  # type: ignore[arg-type]
            except (tarfile.EOFHeaderError, tarfile.EmptyHeaderError):  # type: ignore[attr-defined]
                return  # the end-of-archive blocks, or the end of the stream after a whole member
            yield member
            self._skip_to(self.offset)

    def read_data(self, member: tarfile.TarInfo) -> bytes:
        data = self.fileobj.read(member.size)
        if len(data) < member.size:
            raise EOFError(f"member {member.name!r} is cut short ({len(data):,} of {member.size:,} bytes)")
        return data

    def _skip_to(self, offset: int) -> None:
        while self.fileobj.position < offset:
            chunk = self.fileobj.read(min(offset - self.fileobj.position, 1 << 20))
            if not chunk:
                raise EOFError("the archive ends inside a member")


def read_shard(shard: str, options: SourceOptions | None = None) -> Iterator[InputItem]:
    """The image samples of one shard, in shard order; a shard that breaks ends with an error item."""
    options = options or SourceOptions()
    max_bytes = options.max_bytes
    last, samples = "", 0
    with ExitStack() as stack:
        try:
            reader = _Headers(_open(shard, stack))
            current: _Sample | None = None
            for member in reader.members():
                if not member.isfile():
                    continue
                key, ext = _key(member.name)
                if current is not None and key != current.key:
                    yield from _items(shard, current, max_bytes)
                    samples += 1
                    current = None
                current = current or _Sample(key)
                _add(current, reader, member, ext, options, max_bytes)
                last = member.name
            if current is not None:
                yield from _items(shard, current, max_bytes)
        except FileNotFoundError:
            yield InputItem.failed(shard, "no such shard")
        except PermissionError as e:
            yield InputItem.failed(shard, f"cannot read the shard: {e.strerror or e}", "fetch_error")
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            where = f"after member {last!r}" if last else "before its first member"
            yield InputItem.failed(shard, f"the shard is truncated or not a valid tar ({where}, {samples} "
                                   f"samples read): {e}", "decode_error")


def _add(sample: _Sample, reader: _Headers, member: tarfile.TarInfo, ext: str, options: SourceOptions,
         max_bytes: int) -> None:
    """Read what the sample needs of this member (the rest is skipped unread)."""
    if ext == ".json" and options.with_meta:
        if member.size <= max_bytes:
            try:
                meta = json.loads(reader.read_data(member))
            except ValueError:
                meta = None
            sample.meta = meta if isinstance(meta, dict) else {"_error": "the sample's .json is not a JSON object"}
    elif os.path.splitext(ext)[1] in IMAGE_EXTENSIONS or ext in IMAGE_EXTENSIONS:
        if member.size > max_bytes:
            sample.images.append((member.name, None, member.size))
        else:
            sample.images.append((member.name, reader.read_data(member), member.size))


def _items(shard: str, sample: _Sample, max_bytes: int) -> Iterator[InputItem]:
    for name, data, size in sample.images:
        label = f"{shard}#{name}"
        if data is None:
            item = InputItem.failed(label, f"{size:,} bytes, above the limit of {max_bytes:,}", "too_large")
        else:
            item = InputItem.from_bytes(label, data)
        yield item.with_meta(sample.meta) if sample.meta is not None else item


class ShardSource:
    """The ``shards`` entry of :data:`wanwu.sources.SOURCES`: any argument ending in ``.tar``."""

    name = "shards"

    def claims(self, arg: str) -> bool:
        return is_shard(arg)

    def expand(self, arg: str, options: SourceOptions | None = None) -> Iterator[InputItem]:
        for shard in _shards(arg):
            if options is not None and options.defer_shards:
                yield InputItem(shard, "shard", shard)
            else:
                yield from read_shard(shard, options)


def shard_rows(row: dict[str, Any], options: SourceOptions) -> Iterator[dict[str, Any]]:
    """A Ray ``flat_map`` over rows ``{"shard": path}``: one row per sample, read in the task that runs it
    (rows as :func:`wanwu.ray.stages.item_rows` makes them, the sample's bytes included)."""
    for item in read_shard(str(row["shard"]), options):
        yield {**item.to_row(), "bytes": item.data or b""}


SOURCE = ShardSource()
