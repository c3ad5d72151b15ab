"""Reading a local file: what it holds, no more than the limit, and never an allocation the size of the limit.

``Fetcher.read_file`` once asked for ``max_bytes + 1`` bytes at once (to see a file above the limit), which made
Python allocate 100 MiB for every file, a fresh mapping faulted in page by page: about 300 page faults and 0.7 ms
of kernel time per phone photo, in every decode process. It now reads the size ``fstat`` gives, and a byte more
to notice a file that grew since, reading on (up to the limit) only then.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest

from wanwu.errors import TooLargeError
from wanwu.fetch import Fetcher

LIMIT = 100 * 1024 * 1024


def _reporting_less(monkeypatch: pytest.MonkeyPatch, path: Path, shown: int) -> None:
    """``os.fstat`` of ``path`` reports ``shown`` bytes: the file grew between the size and the read."""
    real = os.fstat
    inode = path.stat().st_ino

    def fstat(fd: int) -> object:
        st = real(fd)
        return SimpleNamespace(st_mode=st.st_mode, st_size=shown) if st.st_ino == inode else st

    monkeypatch.setattr(os, "fstat", fstat)


def test_a_read_allocates_what_the_file_holds_not_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    data = os.urandom(300_000)
    path.write_bytes(data)
    fetcher = Fetcher(LIMIT)
    tracemalloc.start()
    try:
        got = fetcher.read_file(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == data
    # Asking for LIMIT + 1 bytes at once peaks at 100 MiB. The bound leaves room for whatever another thread of
    # the test process allocates meanwhile (tracemalloc sees every thread).
    assert peak < 16 * 1024 * 1024


def test_a_file_that_grew_after_its_size_was_read_is_read_whole(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "growing.jpg"
    data = os.urandom(200_000)
    path.write_bytes(data)
    _reporting_less(monkeypatch, path, 1_000)
    assert Fetcher(LIMIT).read_file(str(path)) == data


def test_a_file_that_grew_past_the_limit_after_its_size_was_read_is_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "growing.jpg"
    path.write_bytes(os.urandom(5_000))
    _reporting_less(monkeypatch, path, 1_000)
    with pytest.raises(TooLargeError, match="above the limit of 4,096"):
        Fetcher(4_096).read_file(str(path))


@pytest.mark.parametrize("size", [0, 1, 4_096])
def test_a_file_is_read_whole_at_any_size_up_to_the_limit(tmp_path: Path, size: int) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    assert Fetcher(4_096).read_file(str(path)) == data
