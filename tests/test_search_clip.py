"""Text search with Chinese-CLIP: a tiny random checkpoint in Hugging Face layout (made with transformers), real
photos indexed through the pipeline, and each query's ranking compared with transformers' cos(image, text)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.clip_helpers import CLIP_LABELS, make_clip_folder
from wanwu.cli.main import main
from wanwu.config import RecognizeOptions
from wanwu.index import ImageIndex
from wanwu.pipeline import Recognizer
from wanwu.search import build_index, embedding_options, search_texts

pytestmark = [pytest.mark.extra("clip"), pytest.mark.filterwarnings("ignore::ResourceWarning")]
PHOTOS = (
    "n01440764_tench.JPEG", "n01443537_goldfish.JPEG", "n02085620_Chihuahua.JPEG", "n02123045_tabby.JPEG",
    "n02504458_African_elephant.JPEG", "n03417042_garbage_truck.JPEG", "n04285008_sports_car.JPEG",
    "n07753592_banana.JPEG",
)
QUERIES = ["金鱼", "一只狗的照片", "运动鞋", "这是一张汽车的图"]


def _transformers_cosines(folder: Path, images: list[Path], texts: list[str]) -> np.ndarray:
    import torch
    from PIL import Image
    from transformers import BertTokenizer, ChineseCLIPImageProcessorPil, ChineseCLIPModel, ChineseCLIPProcessor

    processor = ChineseCLIPProcessor(image_processor=ChineseCLIPImageProcessorPil.from_pretrained(str(folder)),
                                     tokenizer=BertTokenizer.from_pretrained(str(folder)))
    model = ChineseCLIPModel.from_pretrained(str(folder)).eval()

    def norm(out: object) -> torch.Tensor:
        tensor = out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]
        return tensor / tensor.norm(dim=-1, keepdim=True)

    with torch.inference_mode():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")
        image = norm(model.get_image_features(pixel_values=pixels["pixel_values"]))
        tokens = processor(text=texts, padding=True, return_tensors="pt")
        text = norm(model.get_text_features(**tokens))
        return np.asarray((text @ image.T).numpy(), dtype=np.float64)


@pytest.mark.shared
def test_text_search_ranks_photos_as_transformers_does(photos: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_clip_folder(tmp_path / "clip", extra_text="".join(QUERIES))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(CLIP_LABELS) + "\n", encoding="utf-8")
    images = [photos / name for name in PHOTOS]
    options = embedding_options(RecognizeOptions(decoders=0, batch_size=3))
    with Recognizer(str(folder), labels=labels, options=options) as rec:
        build_index(rec, tmp_path / "index", [str(p) for p in images])
        index = ImageIndex.open(tmp_path / "index")
        results = search_texts(rec, index, QUERIES, k=len(images))
    want = _transformers_cosines(folder, images, QUERIES)
    for query, result, cos in zip(QUERIES, results, want, strict=True):
        assert result.query == query
        got = [Path(index.rows[h.row].input).name for h in result.hits]
        assert got == [PHOTOS[i] for i in np.argsort(-cos, kind="stable")], query
        scores = {Path(index.rows[h.row].input).name: h.score for h in result.hits}
        np.testing.assert_allclose([scores[n] for n in PHOTOS], cos, atol=2e-3)  # float16 rows
    assert len({tuple(r.hits) for r in results}) > 1  # the queries do rank differently
    flags = ["-m", str(folder), "-l", str(labels), "-j", "0"]
    assert main(["search", str(tmp_path / "index"), QUERIES[0], QUERIES[1], "-k", "3", *flags]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == QUERIES[:2] and all(len(line["results"]) == 3 for line in lines)
