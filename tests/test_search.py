"""Embeddings, the image index, search by photo and by text, near-duplicates: on the real int8 MobileNetV2
and real photos, and on tiny graphs that show each way a classifier pools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from wanwu.backends import BackendOptions
from wanwu.cli.main import main
from wanwu.config import RecognizeOptions
from wanwu.embeddings import expose_output, find_pooled_output
from wanwu.errors import IndexFolderError, ModelError
from wanwu.index import ImageIndex, IndexRow
from wanwu.pipeline import Recognizer
from wanwu.search import build_index, dedupe, embedding_options, search_images

NAMES = (
    "n01440764_tench.JPEG", "n01443537_goldfish.JPEG", "n02085620_Chihuahua.JPEG", "n02123045_tabby.JPEG",
    "n02504458_African_elephant.JPEG", "n03417042_garbage_truck.JPEG", "n04285008_sports_car.JPEG",
    "n07753592_banana.JPEG", "n01530575_brambling.JPEG", "n02110958_pug.JPEG",
)
OPTIONS = RecognizeOptions(decoders=0, batch_size=4)


@pytest.fixture()
def library(photos: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "library"
    folder.mkdir()
    for name in NAMES:
        (folder / name).write_bytes((photos / name).read_bytes())
    return folder


def _recognizer(mobilenet: tuple[Path, Path], **backend: object) -> Recognizer:
    model, labels = mobilenet
    options = embedding_options(RecognizeOptions(decoders=0, batch_size=4, backend=BackendOptions(**backend)))  # type: ignore[arg-type]
    return Recognizer(str(model), labels=labels, options=options)


def _pooled_graph(tmp_path: Path, op: str) -> Path:
    """conv -> a global pool (``op``) -> flatten -> linear: a classifier in miniature."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    pool = (helper.make_node("ReduceMean", ["feat"], ["pooled"], axes=[2, 3], keepdims=1) if op == "ReduceMean"
            else helper.make_node("GlobalAveragePool", ["feat"], ["pooled"]))
    nodes = [
        helper.make_node("Conv", ["input", "K"], ["feat"], kernel_shape=[3, 3], strides=[4, 4]),
        pool,
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "pooled",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(rng.normal(size=(6, 3, 3, 3)).astype(np.float32), "K"),
                     numpy_helper.from_array(rng.normal(size=(6, 10)).astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / f"{op}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("op", ["GlobalAveragePool", "ReduceMean"])
def test_pooled_features_are_found_from_the_graph_structure(op: str, tmp_path: Path, tiny_model: tuple[Path, Path],
                                                            photos: Path) -> None:
    import onnx
    import onnxruntime as ort

    path = _pooled_graph(tmp_path, op)
    proto = onnx.load(str(path))
    found = find_pooled_output(proto)
    assert found is not None and found[0] == "pooled"
    rewritten, source = expose_output(proto, None)
    assert not source.fallback and source.tensor == "pooled"
    labels = tiny_model[1]
    with Recognizer(str(path), labels=labels, options=embedding_options(OPTIONS, None)) as rec:
        record = rec.recognize_one(str(photos / NAMES[0]))
    assert record.embedding is not None and record.embedding.shape == (6,)
    assert abs(float(np.linalg.norm(record.embedding)) - 1) < 1e-5
    # the same rows as the graph's own pooled tensor, normalised
    session = ort.InferenceSession(rewritten.SerializeToString())
    assert [o.name for o in session.get_outputs()] == ["output", "wanwu_embedding"]


def test_a_graph_without_a_pool_falls_back_to_logits_and_says_so(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["output"], axis=1)], "flat",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 2, 2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 12])],
    )
    _, source = expose_output(helper.make_model(graph), None)
    assert source.fallback and "logits" in source.describe()
    with pytest.raises(ModelError, match="no tensor"):
        expose_output(onnx.ModelProto.FromString(helper.make_model(graph).SerializeToString()), "nope")


@pytest.mark.shared
def test_int8_mobilenet_embeds_its_dequantized_pooled_features(mobilenet: tuple[Path, Path], photos: Path) -> None:
    with _recognizer(mobilenet) as rec:
        source = rec.engine.embedding_source
        records = list(rec.recognize([str(photos / n) for n in NAMES[:4]]))
    assert source is not None and not source.fallback
    for record in records:
        assert record.ok and record.embedding is not None and record.embedding.shape == (1280,)
        assert abs(float(np.linalg.norm(record.embedding)) - 1) < 1e-5
        assert record.predictions[0].label  # labels come along with the embedding
    # an explicit tensor name overrides the structure: the logits
    with _recognizer(mobilenet, embedding_output="output") as rec:
        assert rec.recognize_one(str(photos / NAMES[0])).embedding.shape == (1000,)  # type: ignore[union-attr]


@pytest.mark.shared
def test_embeddings_are_cached_by_content_apart_from_plain_results(mobilenet: tuple[Path, Path], photos: Path) -> None:
    model, labels = mobilenet
    with Recognizer(str(model), labels=labels, options=OPTIONS) as plain:
        assert plain.recognize_one(str(photos / NAMES[0])).embedding is None
    with _recognizer(mobilenet) as first:
        fresh = first.recognize_one(str(photos / NAMES[0]))
        assert first.cache_hits == 0  # the plain result above is not an embedding's
    with _recognizer(mobilenet) as second:
        again = second.recognize_one(str(photos / NAMES[0]))
        assert second.cache_hits == 1
    assert fresh.embedding is not None and again.embedding is not None
    assert np.array_equal(fresh.embedding, again.embedding)


@pytest.mark.shared
def test_index_is_incremental_by_content(mobilenet: tuple[Path, Path], library: Path, tmp_path: Path) -> None:
    folder = tmp_path / "index"
    with _recognizer(mobilenet) as rec:
        first = build_index(rec, folder, [str(library / n) for n in NAMES[:6]], commit_every=4)
        again = build_index(rec, folder, [str(library)], commit_every=4)  # grown: 4 new files
        (library / "copy.jpg").write_bytes((library / NAMES[0]).read_bytes())
        third = build_index(rec, folder, [str(library)])
    assert (first.added, first.present) == (6, 0)
    assert (again.added, again.present) == (4, 6)
    assert (third.added, third.present) == (0, 11)  # the copy's content is already there
    index = ImageIndex.open(folder)
    assert len(index) == 10 and index.vectors.shape == (10, 1280) and index.vectors.dtype == np.float16
    assert isinstance(index.vectors, np.memmap)
    assert len(index.rows[0].labels) == 3


@pytest.mark.shared
def test_a_photo_finds_its_altered_original_first(mobilenet: tuple[Path, Path], library: Path, tmp_path: Path) -> None:
    with _recognizer(mobilenet) as rec:
        build_index(rec, tmp_path / "index", [str(library)])
        index = ImageIndex.open(tmp_path / "index")
        queries = []
        for i, name in enumerate(NAMES[:5]):
            image = Image.open(library / name).convert("RGB")
            altered = ImageOps.mirror(image) if i % 2 else image.resize((image.width // 2, image.height // 2))
            path = tmp_path / f"query{i}.jpg"
            altered.save(path, quality=60)
            queries.append(str(path))
        (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        results = list(search_images(rec, index, [*queries, str(tmp_path / "broken.jpg")], k=3))
    for name, result in zip(NAMES[:5], results, strict=False):
        assert result.error is None
        assert Path(index.rows[result.hits[0].row].input).name == name
        assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)
    assert results[-1].error is not None and results[-1].error[0] == "unsupported"
    assert results[-1].to_dict(index)["query"].endswith("broken.jpg")


@pytest.mark.shared
def test_dedupe_groups_a_resized_copy_with_its_original(mobilenet: tuple[Path, Path], library: Path,
                                                      tmp_path: Path) -> None:
    image = Image.open(library / NAMES[3]).convert("RGB")
    image.resize((image.width * 2 // 3, image.height * 2 // 3)).save(library / "smaller.jpg", quality=80)
    with _recognizer(mobilenet) as rec:
        build_index(rec, tmp_path / "index", [str(library)])
    groups = list(dedupe(ImageIndex.open(tmp_path / "index"), 0.9))
    assert len(groups) == 1
    assert sorted(Path(p).name for p in groups[0]["inputs"]) == sorted([NAMES[3], "smaller.jpg"])


def _index(folder: Path, rows: int = 3, dim: int = 4) -> ImageIndex:
    index = ImageIndex.open_or_create(folder, "model-a", dim, {})
    vectors = np.eye(rows, dim, dtype=np.float32)
    index.add([IndexRow(f"in{i}", f"{i:064x}") for i in range(rows)], vectors)
    return index


def test_a_killed_writer_leaves_the_last_committed_index(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    _index(folder)
    with (folder / "vectors.f16").open("ab") as f:  # what a writer killed before its commit leaves
        f.write(b"\x00" * 7)
    with (folder / "rows.jsonl").open("a") as f:
        f.write('{"input": "half')
    index = ImageIndex.open(folder, "model-a")
    assert len(index) == 3 and [r.input for r in index.rows] == ["in0", "in1", "in2"]
    assert index.add([IndexRow("in3", "f" * 64)], np.ones((1, 4), dtype=np.float32)) == 1
    reopened = ImageIndex.open(folder)
    assert [r.input for r in reopened.rows] == ["in0", "in1", "in2", "in3"]
    assert (folder / "vectors.f16").stat().st_size == 4 * 4 * 2
    assert reopened.search(np.array([[0, 1, 0, 0]], dtype=np.float32), k=1)[0][0].row == 1


def test_missing_foreign_half_written_and_other_model_indexes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(IndexFolderError, match="no index"):
        ImageIndex.open(tmp_path / "nowhere")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "index.json").write_text('{"format": "something else"}')
    with pytest.raises(IndexFolderError, match="not a wanwu index"):
        ImageIndex.open(tmp_path / "foreign")
    folder = tmp_path / "index"
    _index(folder)
    with pytest.raises(IndexFolderError, match="another model"):
        ImageIndex.open(folder, "model-b")
    with (folder / "vectors.f16").open("r+b") as f:
        f.truncate(10)
    with pytest.raises(IndexFolderError, match=r"vectors\.f16"):
        ImageIndex.open(folder)
    (folder / "index.json").unlink()  # half-written: data without its header
    with pytest.raises(IndexFolderError, match="half-written"):
        ImageIndex.open_or_create(folder, "model-a", 4, {})
    assert not (folder / "index.json").exists()  # never rebuilt silently


@pytest.mark.shared
def test_cli_index_search_dedupe(mobilenet: tuple[Path, Path], library: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    model, labels = mobilenet
    flags = ["-m", str(model), "-l", str(labels), "-j", "0"]
    assert main(["index", str(tmp_path / "idx"), str(library), *flags]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "--image", str(library / NAMES[1]), "-k", "2", *flags]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    answer = json.loads(line)
    assert answer["query"].endswith(NAMES[1]) and len(answer["results"]) == 2
    assert answer["results"][0]["input"].endswith(NAMES[1]) and answer["results"][0]["labels"][0] == "金鱼"
    assert main(["search", str(tmp_path / "idx"), "--image", str(library / NAMES[1]), "-f", "csv", *flags]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "query,rank,input,score,labels,error"
    assert main(["search", str(tmp_path / "idx"), "金鱼", *flags]) == 2  # no text tower
    assert "text tower" in capsys.readouterr().err
    assert main(["dedupe", str(tmp_path / "idx"), "--threshold", "0.999"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["search", str(tmp_path / "missing"), "--image", str(library), *flags]) == 1
    assert "no index" in capsys.readouterr().err
