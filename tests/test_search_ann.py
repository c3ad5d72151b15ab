"""The ANN beside an image index (faiss): the exact answer's top hits, rows added after it, a damaged ANN file
rebuilt, ``--exact``, and exact search without faiss. Synthetic clustered vectors; the size from which the ANN
is used is lowered for the tests."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from wanwu import ann as ann_files
from wanwu.cli.main import main
from wanwu.errors import IndexFolderError
from wanwu.index import ImageIndex, IndexRow

DIM = 32


def _clustered(rows: int, seed: int = 0) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((40, DIM))
    x = centres[rng.integers(0, len(centres), rows)] + 0.5 * rng.standard_normal((rows, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _add(index: ImageIndex, vectors: npt.NDArray[np.float32], first: int = 0) -> None:
    rows = [IndexRow(f"in{first + i}", f"{first + i:064x}") for i in range(len(vectors))]
    index.add(rows, vectors)


def _make(folder: Path, rows: int = 3000, seed: int = 0) -> ImageIndex:
    index = ImageIndex.open_or_create(folder, "model-a", DIM, {})
    _add(index, _clustered(rows, seed))
    return index


@pytest.fixture()
def ann_from_1000(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ann_files, "ANN_FROM_ROWS", 1000)


@pytest.fixture()
def ann_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many queries went through an ANN."""
    calls: list[int] = []
    search = ann_files.Ann.search

    def counted(self: ann_files.Ann, q: npt.NDArray[np.float32], k: int) -> object:
        calls.append(len(q))
        return search(self, q, k)

    monkeypatch.setattr(ann_files.Ann, "search", counted)
    return calls


def _top(index: ImageIndex, queries: npt.NDArray[np.float32], exact: bool, k: int = 10) -> list[list[int]]:
    return [[h.row for h in hits] for hits in index.search(queries, k, exact=exact)]


def _recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.mark.extra("search")
@pytest.mark.usefixtures("ann_from_1000")
def test_the_ann_finds_the_exact_answers_top_hits(tmp_path: Path, ann_calls: list[int],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ann_files, "SCAN_ROWS", 300)  # probe 32 of the 76 lists: approximate, not exhaustive
    index = _make(tmp_path / "index")
    ann = index.ann()
    assert ann is not None and ann.index.nprobe == 32 and ann.index.nlist == 76
    queries = _clustered(100, seed=1)
    approximate, exact = _top(index, queries, exact=False), _top(index, queries, exact=True)
    assert sum(ann_calls) == 100  # the ANN answered, the exact search did not
    assert _recall(approximate, exact) >= 0.95
    assert np.mean([a[0] == e[0] for a, e in zip(approximate, exact, strict=True)]) >= 0.95
    meta = json.loads((tmp_path / "index" / "ann.json").read_text())
    assert meta["rows"] == 3000 and (tmp_path / "index" / meta["file"]).stat().st_size == meta["size"]
    # scores are cosines, best first, as in exact search
    hits = index.search(queries[:1], 5)[0]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert abs(hits[0].score - float(queries[0] @ index.vectors[hits[0].row].astype(np.float32))) < 1e-3


@pytest.mark.extra("search")
@pytest.mark.usefixtures("ann_from_1000")
def test_rows_added_after_the_ann_are_found_then_taken_into_it(tmp_path: Path, ann_calls: list[int]) -> None:
    folder = tmp_path / "index"
    index = _make(folder)
    assert index.ann(tail=0) is not None
    new = _clustered(50, seed=7)
    _add(index, new, first=3000)
    reopened = ImageIndex.open(folder)
    for i, hits in enumerate(reopened.search(new, 1)):  # the ANN's 3,000 rows and, exactly, the 50 past them
        assert hits[0].row == 3000 + i
    assert json.loads((folder / "ann.json").read_text())["rows"] == 3000
    assert ann_calls
    (folder / "ann-9999.faiss.1.tmp").write_bytes(b"a killed writer's leftovers")
    (folder / "ann.json.1.tmp").write_text("{")
    reopened.ann(tail=0)  # what `wanwu index` does at its end
    assert json.loads((folder / "ann.json").read_text())["rows"] == 3050
    assert sorted(f.name for f in folder.glob("ann*")) == ["ann-3050.faiss", "ann.json"]
    for i, hits in enumerate(ImageIndex.open(folder).search(new, 1)):
        assert hits[0].row == 3000 + i


def _truncate(folder: Path) -> None:
    path = folder / json.loads((folder / "ann.json").read_text())["file"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(folder: Path) -> None:
    path = folder / json.loads((folder / "ann.json").read_text())["file"]
    size = path.stat().st_size
    path.write_bytes(b"\x00not faiss" * (size // 10) + b"\x00" * (size % 10))  # the size ann.json says


def _bad_json(folder: Path) -> None:
    (folder / "ann.json").write_text("{half")


def _copy_ann(other: ImageIndex, folder: Path) -> None:
    other.ann(tail=0)
    for path in folder.glob("ann*"):
        path.unlink()
    for path in other.folder.glob("ann*"):
        (folder / path.name).write_bytes(path.read_bytes())


def _other_rows(folder: Path) -> None:
    """The ANN of other rows, as many (a folder indexed anew over an old ANN file)."""
    _copy_ann(_make(folder.parent / "other", seed=8), folder)


def _more_rows(folder: Path) -> None:
    """An ANN over more rows than the index has committed."""
    other = _make(folder.parent / "other")
    _add(other, _clustered(10, seed=5), first=3000)
    _copy_ann(other, folder)


@pytest.mark.extra("search")
@pytest.mark.usefixtures("ann_from_1000")
@pytest.mark.parametrize("damage", [_truncate, _garbage, _bad_json, _other_rows, _more_rows])
def test_a_damaged_or_foreign_ann_file_is_rebuilt(tmp_path: Path, damage: object,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "index"
    _make(folder).ann(tail=0)
    damage(folder)  # type: ignore[operator]
    index = ImageIndex.open(folder)
    queries = _clustered(20, seed=3)
    with caplog.at_level(logging.WARNING, logger="wanwu"):
        assert _recall(_top(index, queries, exact=False), _top(index, queries, exact=True)) >= 0.95
    meta = json.loads((folder / "ann.json").read_text())
    assert meta["rows"] == 3000 and (folder / meta["file"]).stat().st_size == meta["size"]
    assert ann_files.open_ann(folder, index.vectors, 3000) is not None
    assert "rebuilt" in caplog.text


@pytest.mark.extra("search")
@pytest.mark.usefixtures("ann_from_1000")
def test_a_half_written_index_is_refused_whatever_its_ann(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    _make(folder).ann(tail=0)
    with (folder / "vectors.f16").open("r+b") as f:
        f.truncate(1000 * DIM * 2)
    with pytest.raises(IndexFolderError, match=r"vectors\.f16"):
        ImageIndex.open(folder)
    (folder / "index.json").unlink()
    with pytest.raises(IndexFolderError, match="half-written"):
        ImageIndex.open(folder)


@pytest.mark.extra("search")
@pytest.mark.usefixtures("ann_from_1000")
def test_exact_searches_and_dedupes_without_the_ann(tmp_path: Path, ann_calls: list[int],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "index"
    index = _make(folder)
    twins = _clustered(3, seed=11)
    _add(index, twins, first=3000)
    _add(index, twins + 1e-3, first=3003)  # near-copies of the three
    index.ann(tail=0)
    queries = _clustered(10, seed=4)
    found = [[h.row for h in hits] for hits in ImageIndex.open(folder, exact=True).search(queries, 10)]
    assert not ann_calls  # what `wanwu search --exact` opens
    assert found == _top(index, queries, exact=True)
    assert not ann_calls
    assert main(["dedupe", str(folder), "--threshold", "0.999", "--exact"]) == 0
    exact_groups = [json.loads(line)["inputs"] for line in capsys.readouterr().out.splitlines()]
    assert sorted(exact_groups) == [["in3000", "in3003"], ["in3001", "in3004"], ["in3002", "in3005"]]
    ranged: list[int] = []
    pairs = ann_files.Ann.pairs
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ann_files.Ann, "pairs", lambda self, q, t: (ranged.append(len(q)), pairs(self, q, t))[1])
        assert main(["dedupe", str(folder), "--threshold", "0.999"]) == 0
    assert sum(ranged) == 3006  # every row went through the ANN's range search
    assert sorted(json.loads(line)["inputs"] for line in capsys.readouterr().out.splitlines()) == exact_groups


@pytest.mark.usefixtures("ann_from_1000")
def test_without_faiss_search_is_exact_and_says_so_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    monkeypatch.setattr(ann_files, "_told", set())
    folder = tmp_path / "index"
    index = _make(folder)
    queries = _clustered(5, seed=2)
    with caplog.at_level(logging.WARNING, logger="wanwu"):
        found = _top(index, queries, exact=False)
        assert index.ann(tail=0) is None
        again = _top(ImageIndex.open(folder), queries, exact=False)
    assert found == again == _top(index, queries, exact=True)
    assert caplog.text.count("search is exact") == 1
    assert not list(folder.glob("ann*"))


@pytest.mark.shared
@pytest.mark.extra("search")
def test_cli_index_builds_the_ann_and_search_exact_skips_it(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    ann_calls: list[int], capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(ann_files, "ANN_FROM_ROWS", 40)
    library = sorted(photos.glob("*.JPEG"))[:80]
    model, labels = mobilenet
    flags = ["-m", str(model), "-l", str(labels), "-j", "0"]
    folder = tmp_path / "idx"
    assert main(["index", str(folder), *map(str, library), *flags]) == 0
    assert json.loads((folder / "ann.json").read_text())["rows"] == 80  # built by `wanwu index` at its end
    capsys.readouterr()
    query = ["--image", str(library[7]), "-k", "3", *flags]
    assert main(["search", str(folder), *query, "--exact"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert not ann_calls
    assert main(["search", str(folder), *query]) == 0
    approximate = json.loads(capsys.readouterr().out)
    assert ann_calls == [1]
    assert exact["results"][0]["input"] == approximate["results"][0]["input"] == str(library[7])
