"""How a result is stored, whatever the store: the same bytes in SQLite and in Redis.

* the key: a hex sha256 becomes its 32 raw bytes (:func:`key_blob`);
* the scores: :func:`encode_top`, a 12-byte header + indices (uint16 when they fit, else int32) + float32
  values, about 310 bytes for the top 50, an exact round trip; in the namespaces of runs that embed, the
  image's float32 embedding follows (flag 2);
* the decoder's warnings: a JSON list, or nothing when there are none (almost every file).
"""

from __future__ import annotations

import json
import struct

import numpy as np

from wanwu.records import TopScores

_BLOB_VERSION = 1
_HEADER = struct.Struct("<BBBxd")  # blob version, flags, n, pad, logsumexp
_FLAG_U16 = 1  # indices stored as uint16 (every index < 65536), else int32
_FLAG_EMBEDDING = 2  # a float32 embedding follows the values (namespaces of runs that embed)


def encode_top(top: TopScores) -> bytes:
    """Header (12 bytes) + indices (uint16 when they fit, else int32) + float32 values; exact round trip."""
    n = len(top.indices)
    if n > 255 or len(top.values) != n:
        raise ValueError(f"cannot store {n} scores (at most 255, one value per index)")
    small = n == 0 or (int(top.indices.max()) < 65536 and int(top.indices.min()) >= 0)
    indices = np.asarray(top.indices, dtype="<u2" if small else "<i4")
    values = np.asarray(top.values, dtype="<f4")
    flags = (_FLAG_U16 if small else 0) | (_FLAG_EMBEDDING if top.embedding is not None else 0)
    header = _HEADER.pack(_BLOB_VERSION, flags, n, float(top.logsumexp))
    embedding = b"" if top.embedding is None else np.asarray(top.embedding, dtype="<f4").tobytes()
    return header + indices.tobytes() + values.tobytes() + embedding


def decode_top(blob: bytes) -> TopScores:
    """Raises ValueError for anything that is not a whole encoded result (never struct.error)."""
    if not isinstance(blob, bytes) or len(blob) < _HEADER.size:
        raise ValueError("truncated result")
    version, flags, n, lse = _HEADER.unpack_from(blob)
    if version != _BLOB_VERSION:
        raise ValueError(f"unknown result encoding {version}")
    width = 2 if flags & _FLAG_U16 else 4
    start = _HEADER.size
    end = start + n * (width + 4)
    rest = len(blob) - end
    if rest < 0 or rest % 4 or bool(rest) != bool(flags & _FLAG_EMBEDDING):
        raise ValueError("truncated result")
    # positional arguments and dtype objects: numpy's keyword and string parsing cost more than the read itself
    # (a rerun answered from the cache decodes tens of thousands a second)
    idx = np.frombuffer(blob, _U2 if width == 2 else _I4, n, start)
    values = np.frombuffer(blob, _F4, n, start + n * width)
    embedding = np.frombuffer(blob, _F4, -1, end).astype(np.float32) if rest else None
    # read-only views of the blob where the stored type is already the native one (no copy)
    return TopScores(idx.astype(np.int32, copy=False), values.astype(np.float32, copy=False), lse, embedding=embedding)


_U2, _I4, _F4 = np.dtype("<u2"), np.dtype("<i4"), np.dtype("<f4")


def key_blob(key: str) -> bytes:
    """A hex sha256 becomes its 32 raw bytes; anything else is stored as UTF-8."""
    if len(key) == 64:
        try:
            return bytes.fromhex(key)
        except ValueError:
            pass
    return key.encode()


def encode_warnings(warnings: tuple[str, ...]) -> str | None:
    return json.dumps(list(warnings), ensure_ascii=False) if warnings else None


def decode_warnings(text: str | None) -> tuple[str, ...]:
    """Raises ValueError for a damaged entry (a miss, like a damaged ``top``)."""
    if not text:
        return ()
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("damaged warnings")
    return tuple(value)
