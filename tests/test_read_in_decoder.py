"""A run with no result cache leaves reading local files to its decode processes: the bytes never cross a pipe.

Each test compares the run that reads in its decode processes with the same inputs read by the run itself
(``decoders=0``: threads, where the run always reads), so a difference in any record shows.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import image_bytes
from wanwu import RecognizeOptions, Recognizer
from wanwu.fetch import Fetcher
from wanwu.imaging import decode_jobs
from wanwu.records import Record
from wanwu.sources import InputItem


def _records(model: tuple[Path, Path], inputs: list[str] | list[InputItem], started: bool = False,
             **kw: object) -> list[Record]:
    """``started``: the decode processes start with the recognizer (as the CLI's over a folder do), so the run
    sends every local file to them unread from its first."""
    options = RecognizeOptions(cache=False, **kw)  # type: ignore[arg-type]
    with Recognizer(str(model[0]), labels=model[1], options=options, start_decoders=started) as rec:
        return list(rec.recognize(inputs))


@pytest.fixture
def run_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The inputs the run itself read (the decode processes are other processes: their reads are not seen)."""
    seen: list[str] = []
    fetch = Fetcher.fetch

    def counting(self: Fetcher, item: InputItem, known: object = None) -> object:
        seen.append(item.input)
        return fetch(self, item, known)  # type: ignore[arg-type]

    monkeypatch.setattr(Fetcher, "fetch", counting)
    yield seen


def _summary(record: Record) -> tuple[object, ...]:
    top = tuple((p.index, round(p.score, 6)) for p in record.predictions)
    error = (record.error.type, record.error.message) if record.error is not None else None
    return record.input, record.sha256, record.width, record.height, top, error


def test_a_run_without_a_cache_leaves_reading_its_files_to_the_decode_processes(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path, run_reads: list[str]
) -> None:
    paths = [str(p) for p in sorted(photos.iterdir())[::25][:40]]
    copy = tmp_path / "copy_of_the_last.JPEG"  # a repeat of content: both records, the same result
    shutil.copyfile(paths[-1], copy)
    paths.append(str(copy))
    records = _records(mobilenet, paths, decoders=2, batch_size=8)
    # The first few inputs are read by the run while it learns that it decodes in processes; the rest never.
    assert len(run_reads) <= 16 < len(paths)
    threads = _records(mobilenet, paths, decoders=0, batch_size=8)
    assert [_summary(r) for r in records] == [_summary(r) for r in threads]
    for path, record in zip(paths, records, strict=True):
        assert record.ok and record.sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert len({tuple(p.index for p in r.predictions) for r in records}) > 20  # distinct photos, distinct answers


def test_a_recognizer_whose_decode_processes_are_started_reads_none_of_its_files_itself(
    mobilenet: tuple[Path, Path], photos: Path, run_reads: list[str]
) -> None:
    """The CLI over a folder starts its decode processes while the model loads (``start_decoders``): then even
    the first files go to them unread, and the first decodes start without waiting for a read."""
    paths = [str(p) for p in sorted(photos.iterdir())[::50][:20]]
    records = _records(mobilenet, paths, started=True, decoders=2, batch_size=8)
    assert run_reads == []
    assert [_summary(r) for r in records] == [_summary(r) for r in _records(mobilenet, paths, decoders=0, batch_size=8)]


def test_a_file_its_decoder_cannot_read_gets_the_record_the_run_would_have_given_it(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path, run_reads: list[str]
) -> None:
    photo_paths = sorted(photos.iterdir())[::40][:24]
    largest = max(p.stat().st_size for p in photo_paths)
    fifo = tmp_path / "a_pipe.jpg"
    os.mkfifo(fifo)
    odd = {
        "gone": str(tmp_path / "deleted_after_listing.jpg"),
        "folder": str(tmp_path),
        "fifo": str(fifo),
        "text": str(tmp_path / "notes.jpg"),
    }
    Path(odd["text"]).write_text("not an image", encoding="utf-8")
    items = [InputItem(str(p), "file", str(p)) for p in photo_paths]
    for n, path in enumerate(odd.values()):
        items.insert(3 + 5 * n, InputItem(path, "file", path))
    options = {"batch_size": 4, "max_bytes": largest - 1}  # the largest photo is over the byte limit
    records = _records(mobilenet, items, started=True, decoders=2, **options)
    assert run_reads == []  # every file read (or refused) where it was decoded
    assert [_summary(r) for r in records] == [_summary(r) for r in _records(mobilenet, items, decoders=0, **options)]
    by_input = {r.input: r for r in records}
    types = {name: by_input[path].error.type for name, path in odd.items()}  # type: ignore[union-attr]
    assert types == {"gone": "not_found", "folder": "not_found", "fifo": "fetch_error", "text": "unsupported"}
    too_large = [r for r in records if r.error is not None and r.error.type == "too_large"]
    assert [r.input for r in too_large] == [str(p) for p in photo_paths if p.stat().st_size == largest]
    assert sum(r.ok for r in records) == len(photo_paths) - len(too_large)


def crashing_decode(datas: list[bytes], spec: object, options: object) -> list[object]:
    """Decodes like wanwu, except that a file starting with CRASH kills its decode process outright."""
    if any(d.startswith(b"CRASH") for d in datas):
        os._exit(1)
    return decode_jobs(datas, spec, options)  # type: ignore[arg-type, return-value]


def test_a_crash_on_a_file_its_decoder_read_costs_that_file_alone_and_its_record_names_its_content(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    run_reads: list[str],
) -> None:
    paths = [str(p) for p in sorted(photos.iterdir())[::33][:26]]
    poison = {}
    for n, at in enumerate((4, 19)):
        path = tmp_path / f"poison_{n}.jpg"
        path.write_bytes(b"CRASH" + image_bytes(size=(300 + n, 200)))
        paths.insert(at, str(path))
        poison[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr("wanwu.pipeline._Run.decode", staticmethod(crashing_decode))
    records = _records(mobilenet, paths, started=True, decoders=2, batch_size=4)
    read_by_the_run = list(run_reads)
    assert [r.input for r in records] == paths
    healthy = _records(mobilenet, [p for p in paths if p not in poison], decoders=0, batch_size=4)
    assert [_summary(r) for r in records if r.input not in poison] == [_summary(r) for r in healthy]
    for record in records:
        if record.input in poison:
            assert record.error is not None and record.error.type == "decode_error"
            assert "crashed" in record.error.message
            assert record.sha256 == poison[record.input]  # read by the run after the crash, for the quarantine
    # The run read only the files that crashed, after they did: the others were read where they were decoded.
    assert sorted(read_by_the_run) == sorted(poison)
