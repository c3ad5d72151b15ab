"""Label files: plain lists and .tsv/.csv tables with a header; English names carried as ``label_en``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from tests.helpers import TINY_LABELS
from wanwu.cli.main import main
from wanwu.errors import ModelError, UsageError
from wanwu.labels import load_label_table, load_labels

PHOTOS = ("n01440764_tench.JPEG", "n07753592_banana.JPEG", "n03417042_garbage_truck.JPEG")


def _tsv_columns(shared_data: Path) -> dict[str, list[str]]:
    text = (shared_data / "labels" / "imagenet_labels.tsv").read_text(encoding="utf-8")
    rows = list(csv.reader(text.splitlines(), delimiter="\t"))
    return {name: [row[i] for row in rows[1:]] for i, name in enumerate(rows[0])}


def test_the_shared_zh_en_table_reads_as_1000_classes(shared_data: Path) -> None:
    path = shared_data / "labels" / "imagenet_labels.tsv"
    table = load_label_table(path)
    plain = load_labels(shared_data / "labels" / "imagenet_zh.txt")
    assert len(table.labels) == 1000 and table.labels == plain  # zh by default, same as the plain list
    assert table.english[0] == "tench, Tinca tinca" and table.english[954] == "banana"
    english = load_label_table(path, "en")
    assert english.labels == table.english and english.english == ()  # en is the label: nothing to carry


def test_index_column_orders_rows_and_must_be_complete(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("en,index,label\nblue,2,蓝\nred,0,红\ngreen,1,绿\n", encoding="utf-8")
    table = load_label_table(path)
    assert table.labels == ("红", "绿", "蓝") and table.english == ("red", "green", "blue")
    path.write_text("index,label\n0,红\n2,蓝\n", encoding="utf-8")
    with pytest.raises(ModelError, match=r"0\.\.1"):
        load_label_table(path)
    path.write_text("index,label\n0,红,extra\n", encoding="utf-8")
    with pytest.raises(ModelError, match="line 2"):
        load_label_table(path)
    with pytest.raises(UsageError, match="no column 'fr'"):
        load_label_table(tmp_path / "labels.csv", "fr")
    with pytest.raises(UsageError, match=r"\.tsv or \.csv"):
        plain = tmp_path / "labels.txt"
        plain.write_text("红\n", encoding="utf-8")
        load_label_table(plain, "zh")


@pytest.mark.shared
def test_recognize_with_the_tsv_carries_label_en(mobilenet: tuple[Path, Path], photos: Path, shared_data: Path,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    columns = _tsv_columns(shared_data)
    inputs = [str(photos / name) for name in PHOTOS]
    args = ["--model", str(mobilenet[0]), "--labels", str(shared_data / "labels" / "imagenet_labels.tsv"),
            "-k", "3", "-j", "0", "-q"]
    assert main(["recognize", *inputs, *args]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["predictions"][0]["index"] for r in records] == [0, 954, 569]
    for record in records:
        for p in record["predictions"]:
            assert (p["label"], p["label_en"]) == (columns["zh"][p["index"]], columns["en"][p["index"]])

    out = tmp_path / "out.csv"
    assert main(["recognize", *inputs[:2], *args, "-o", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [(r["label_1"], r["label_en_1"]) for r in rows] == [("丁鲷", "tench, Tinca tinca"), ("香蕉", "banana")]
    # --resume reads the label_en header back and appends the third photo only.
    assert main(["recognize", *inputs, *args, "-o", str(out), "--resume"]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [r["label_en_1"] for r in rows] == ["tench, Tinca tinca", "banana", columns["en"][569]]

    assert main(["recognize", inputs[0], *args, "--label-column", "en"]) == 0
    first = json.loads(capsys.readouterr().out)["predictions"][0]
    assert first == {"index": 0, "label": "tench, Tinca tinca", "score": first["score"]}


def test_plain_label_files_carry_no_label_en(tiny_model: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import image_bytes

    photo = tmp_path / "red.jpg"
    photo.write_bytes(image_bytes((230, 20, 20)))
    base = ["recognize", str(photo), "--model", str(tiny_model[0]), "-j", "0", "-q", "--no-cache"]
    assert main([*base, "--labels", str(tiny_model[1])]) == 0
    assert all(set(p) == {"index", "label", "score"} for p in json.loads(capsys.readouterr().out)["predictions"])
    assert main([*base, "--labels", str(tiny_model[1]), "--label-column", "zh"]) == 2
    table = tmp_path / "tiny.tsv"
    table.write_text("index\tzh\n" + "".join(f"{i}\t{n}\n" for i, n in enumerate(TINY_LABELS)), encoding="utf-8")
    assert main([*base, "--labels", str(table)]) == 0
    assert all(set(p) == {"index", "label", "score"} for p in json.loads(capsys.readouterr().out)["predictions"])


def test_a_library_caller_may_name_the_label_file_as_a_string(tiny_model: tuple[Path, Path]) -> None:
    from wanwu.engine import Engine

    engine = Engine.load(str(tiny_model[0]), str(tiny_model[1]))
    try:
        assert engine.spec.labels == load_labels(tiny_model[1])
    finally:
        engine.close()
