"""``--resume``: continue a run into the output file an earlier (perhaps killed) run left behind.

Sinks write one whole line per record and flush it, so a run killed at any moment (even SIGKILL) leaves
complete records plus at most one torn last one: a tail with no line end. :func:`prepare_resume` reads the
file once, cuts that tail off, and returns which inputs are already recorded; the caller skips them and
appends the rest, so the end state holds exactly one record per input.

With ``retry_errors`` the error records are not counted as done: the file is rewritten without them
(to a temporary file, then renamed over the original, so a crash leaves either the old or the new file) and
those inputs are redone.

Readers are registered per output format (jsonl and csv; a json array cannot be appended to; Parquet,
which keeps finished row groups as files, has a whole-file reader). Anything
in the file that is not a record of that format stops the resume with a :class:`~wanwu.errors.UsageError`
rather than risk damaging a file that was never wanwu's.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from wanwu.errors import UsageError
from wanwu.registry import Registry
from wanwu.sinks import csv_header
from wanwu.sources import InputItem


@dataclass(frozen=True, slots=True)
class Unit:
    """One complete piece of an output file, its terminator included."""

    raw: bytes
    input: str | None = None  # None: not a record (a csv header, a blank line)
    status: str | None = None
    predictions: int | None = None  # an ok record's number of predictions, where the format tells


Reader = Callable[[BinaryIO, Path, int], Iterator[Unit]]
READERS: Registry[Reader] = Registry("resumable format", group="wanwu.resume_readers")
register_reader = READERS.register


@dataclass
class ResumeState:
    """What an existing output file already holds, after repair."""

    done: Counter[str] = field(default_factory=Counter)  # input -> records kept for it
    exists: bool = False  # the file exists and keeps some content (csv: at least its header)
    kept: int = 0  # records kept
    errors_kept: int = 0
    errors_removed: int = 0  # --retry-errors: error records taken out, to be redone
    torn_bytes: int = 0  # size of the torn tail that was cut off
    skipped: int = 0  # inputs of this run skipped as already recorded (counted by pending())

    def pending(self, items: Iterable[InputItem]) -> Iterator[InputItem]:
        """The items not recorded yet. An input listed twice is skipped as often as it is recorded."""
        for item in items:
            left = self.done.get(item.input, 0)
            if left:
                if left == 1:
                    del self.done[item.input]
                else:
                    self.done[item.input] = left - 1
                self.skipped += 1
                continue
            yield item


def resumable_formats() -> tuple[str, ...]:
    return tuple(sorted({*READERS.names(), *WHOLE_FILE_READERS.names()}))


def prepare_resume(
    path: Path, fmt: str, *, top_k: int, retry_errors: bool = False, expect_predictions: int | None = None
) -> ResumeState:
    """Repair ``path`` (cut a torn tail; drop error records when ``retry_errors``) and say what is done.

    A missing file is a fresh start. Raises :class:`UsageError` for a format that cannot be resumed, a
    file that is not this format's wanwu output, or one written with another top-k (records with more than
    ``top_k`` predictions, or, with ``expect_predictions`` (no threshold), any other count), so that a
    resumed file never mixes two shapes of record.
    """
    if fmt in WHOLE_FILE_READERS:
        return WHOLE_FILE_READERS.get(fmt)(path, retry_errors)
    if fmt not in READERS:
        raise UsageError(f"--resume works with {' and '.join(resumable_formats())} output, not {fmt}")
    reader = READERS.get(fmt)
    state = ResumeState()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return state
    except OSError as e:
        raise UsageError(f"cannot read {path} to resume: {e}") from None
    consumed = 0
    with path.open("rb") as f:
        for unit in reader(f, path, top_k):
            consumed += len(unit.raw)
            if unit.input is None:
                continue
            if unit.predictions is not None and (
                unit.predictions > top_k
                or (expect_predictions is not None and unit.predictions != expect_predictions)
            ):
                raise UsageError(
                    f"{path} holds records with {unit.predictions} predictions, and this run would write "
                    f"{expect_predictions or top_k}: resume with the -k (and --threshold) it was written with, "
                    "or write to a new file"
                )
            if unit.status == "error":
                if retry_errors:
                    state.errors_removed += 1
                    continue
                state.errors_kept += 1
            state.kept += 1
            state.done[unit.input] += 1
    state.torn_bytes = size - consumed
    state.exists = consumed > 0
    if state.errors_removed:
        _rewrite_without_errors(path, reader, top_k)
    elif state.torn_bytes:
        os.truncate(path, consumed)
    return state


def _rewrite_without_errors(path: Path, reader: Reader, top_k: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.resume.tmp")
    try:
        with path.open("rb") as src, tmp.open("wb") as dst:
            for unit in reader(src, path, top_k):
                if unit.status != "error":
                    dst.write(unit.raw)
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _not_ours(path: Path, where: int, why: str) -> UsageError:
    return UsageError(
        f"{path}: record {where} is not wanwu output ({why}); refusing to resume into this file"
    )


@register_reader("jsonl")
def read_jsonl(f: BinaryIO, path: Path, top_k: int) -> Iterator[Unit]:
    for number, line in enumerate(f, 1):
        if not line.endswith(b"\n"):
            return  # the torn tail
        if not line.strip():
            yield Unit(line)
            continue
        try:
            data = json.loads(line)
        except ValueError as e:
            raise _not_ours(path, number, f"not JSON: {e}") from None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("input"), str)
            or data.get("status") not in ("ok", "error")
        ):
            raise _not_ours(path, number, "no input and status")
        predictions = data.get("predictions")
        count = len(predictions) if data["status"] == "ok" and isinstance(predictions, list) else None
        yield Unit(line, data["input"], data["status"], count)


@register_reader("csv")
def read_csv(f: BinaryIO, path: Path, top_k: int) -> Iterator[Unit]:
    """Rows are complete when their quotes balance (a quoted field may hold a line break)."""
    headers = (csv_header(top_k), csv_header(top_k, english=True))  # label_en_i columns or not
    header = headers[0]
    for number, raw in enumerate(_csv_rows(f)):
        text = raw.decode("utf-8", errors="replace")
        if number == 0:
            text = text.removeprefix("\ufeff")
        row = next(csv.reader([text.rstrip("\r\n")]), [])
        if number == 0:
            header = row if row in headers else header
            if row != header:
                raise UsageError(
                    f"{path}: its csv header does not match this run's ({len(header)} columns for --top-k "
                    f"{top_k}); resume with the options of the first run, or write to a new file"
                )
            yield Unit(raw)
        elif len(row) != len(header) or row[1] not in ("ok", "error"):
            raise _not_ours(path, number, f"{len(row)} columns, status {row[1] if len(row) > 1 else '?'}")
        else:
            yield Unit(raw, row[0], row[1])


def _csv_rows(f: BinaryIO) -> Iterator[bytes]:
    """Complete csv records, terminator included; a torn tail (no line end, or open quotes) is not."""
    parts: list[bytes] = []
    quotes = 0
    for line in f:
        parts.append(line)
        quotes += line.count(b'"')
        if line.endswith(b"\n") and quotes % 2 == 0:
            yield b"".join(parts)
            parts, quotes = [], 0


# Formats that are not a stream of byte units (Parquet): the reader gives the whole state itself.
WHOLE_FILE_READERS: Registry[Callable[[Path, bool], ResumeState]] = Registry(
    "resumable format", group="wanwu.resume_whole_file_readers"
)


def _resume_parquet(path: Path, retry_errors: bool) -> ResumeState:
    """Parquet: the finished file and/or the finished row-group parts a killed run kept (see wanwu.parquet)."""
    from wanwu.parquet import scan

    done, kept, errors_kept, errors_removed, exists = scan(path, retry_errors)
    return ResumeState(done=done, exists=exists, kept=kept, errors_kept=errors_kept, errors_removed=errors_removed)


WHOLE_FILE_READERS.register("parquet", _resume_parquet)
