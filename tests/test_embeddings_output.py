"""``wanwu recognize --embeddings``: the embedding in jsonl and as a fixed-size list column in Parquet, and
``--embeddings-dir``: clip-retrieval's layout (img_emb/img_emb_N.npy float16 + metadata/metadata_N.parquet in the
same row order), on real photos and the int8 MobileNetV2's pooled features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wanwu.cli.main import main
from wanwu.config import RecognizeOptions
from wanwu.pipeline import Recognizer

pytestmark = [pytest.mark.extra("parquet"), pytest.mark.shared]
NAMES = ("n01443537_goldfish.JPEG", "n02085620_Chihuahua.JPEG", "n02123045_tabby.JPEG", "n07753592_banana.JPEG")


@pytest.fixture()
def inputs(photos: Path, tmp_path: Path) -> list[str]:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((photos / NAMES[0]).read_bytes()[:300])  # a JPEG cut short: an error record
    return [str(photos / NAMES[0]), str(photos / NAMES[1]), str(broken), str(photos / NAMES[2]),
            str(photos / NAMES[3])]


def _library_embeddings(mobilenet: tuple[Path, Path], inputs: list[str]) -> dict[str, np.ndarray]:
    options = RecognizeOptions(decoders=0, cache=False).with_embeddings()
    with Recognizer(str(mobilenet[0]), labels=mobilenet[1], options=options) as rec:
        return {r.input: r.embedding for r in rec.recognize(inputs) if r.embedding is not None}


def test_recognize_embeddings_in_jsonl_parquet_and_clip_retrieval_layout(
    mobilenet: tuple[Path, Path], inputs: list[str], tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    flags = ["-m", str(mobilenet[0]), "-l", str(mobilenet[1]), "-j", "0", "--no-cache", "-q"]
    want = _library_embeddings(mobilenet, inputs)
    assert len(want) == 4 and all(v.shape == (1280,) for v in want.values())

    assert main(["recognize", *inputs, *flags, "-o", str(tmp_path / "plain.jsonl")]) == 3
    assert all("embedding" not in json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines())

    assert main(["recognize", *inputs, *flags, "--embeddings", "-o", str(tmp_path / "out.jsonl")]) == 3
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for line in lines:
        if line["status"] == "ok":
            np.testing.assert_allclose(line["embedding"], want[line["input"]], atol=1e-6)
        else:
            assert "embedding" not in line

    emb_dir = tmp_path / "emb"
    args = ["recognize", *inputs, *flags, "-o", str(tmp_path / "out.parquet"), "--embeddings-dir", str(emb_dir)]
    assert main(args) == 3
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 1280)
    rows = table.to_pylist()
    assert [r["input"] for r in rows] == inputs
    for row in rows:
        if row["status"] == "ok":
            np.testing.assert_array_equal(np.asarray(row["embedding"], np.float32), want[row["input"]])
        else:
            assert row["embedding"] is None

    vectors = np.load(emb_dir / "img_emb" / "img_emb_0.npy")
    meta = pq.read_table(emb_dir / "metadata" / "metadata_0.parquet").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert vectors.dtype == np.float16 and vectors.shape == (len(ok), 1280)
    assert [m["image_path"] for m in meta] == [r["input"] for r in ok]  # the same row order
    assert [m["sha256"] for m in meta] == [r["sha256"] for r in ok]
    assert meta[0]["labels"] == [p["label"] for p in ok[0]["predictions"]]
    for vector, m in zip(vectors, meta, strict=True):
        np.testing.assert_allclose(vector.astype(np.float32), want[m["image_path"]], atol=1e-3)

    assert main(["recognize", *inputs[:2], *flags, "--embeddings-dir", str(emb_dir), "-o",
                 str(tmp_path / "again.jsonl")]) == 0
    assert np.load(emb_dir / "img_emb" / "img_emb_1.npy").shape == (2, 1280)  # a new part; the first one kept
    assert np.array_equal(np.load(emb_dir / "img_emb" / "img_emb_0.npy"), vectors)
