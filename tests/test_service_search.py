"""POST /v1/search: the index of ``wanwu serve --index DIR`` searched by photo (the real int8 MobileNetV2 and real
photos) and by Chinese text (a tiny random Chinese-CLIP), answering the CLI's search lines, behind the same API
keys and body limits as the other routes."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageOps

from tests.helpers import image_bytes
from tests.servers import uvicorn_in_thread
from wanwu.cli.main import main
from wanwu.config import RecognizeOptions
from wanwu.errors import IndexFolderError
from wanwu.index import ImageIndex
from wanwu.pipeline import Recognizer
from wanwu.search import build_index, embedding_options

pytestmark = pytest.mark.extra("server")
NAMES = ("n01443537_goldfish.JPEG", "n02085620_Chihuahua.JPEG", "n02123045_tabby.JPEG",
         "n02504458_African_elephant.JPEG", "n04285008_sports_car.JPEG", "n07753592_banana.JPEG")
KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextmanager
def serve(model: str, labels: Path | None, **config: Any) -> Iterator[str]:
    from wanwu.service import ServeConfig, create_app

    cfg = ServeConfig(model=model, labels=labels, options=RecognizeOptions(decoders=0, cache=False), **config)
    with uvicorn_in_thread(create_app(cfg)) as base:
        yield base


@pytest.fixture()
def mobilenet_index(mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path) -> Path:
    options = embedding_options(RecognizeOptions(decoders=0, batch_size=4, cache=False))
    with Recognizer(str(mobilenet[0]), labels=mobilenet[1], options=options) as rec:
        build_index(rec, tmp_path / "index", [str(photos / n) for n in NAMES])
    return tmp_path / "index"


def _altered(path: Path) -> bytes:
    """The photo mirrored, shrunk and recompressed: a near-duplicate, not the same bytes."""
    with Image.open(path) as im:
        copy = ImageOps.mirror(im.convert("RGB"))
        copy = copy.resize((copy.width * 2 // 3, copy.height * 2 // 3))
        out = io.BytesIO()
        copy.save(out, "JPEG", quality=70)
    return out.getvalue()


@pytest.mark.shared
def test_search_by_photo_answers_the_cli_lines_behind_the_keys(
    mobilenet: tuple[Path, Path], mobilenet_index: Path, photos: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    query = tmp_path / "query.jpg"
    query.write_bytes(_altered(photos / "n02123045_tabby.JPEG"))
    flags = ["-m", str(mobilenet[0]), "-l", str(mobilenet[1]), "-j", "0", "--no-cache"]
    assert main(["search", str(mobilenet_index), "--image", str(query), "-k", "3", *flags]) == 0
    cli_line = json.loads(capsys.readouterr().out.splitlines()[0])
    with serve(str(mobilenet[0]), mobilenet[1], index=mobilenet_index, api_keys=(KEY,)) as base:
        files = [("files", ("query.jpg", query.read_bytes(), "image/jpeg")),
                 ("files", ("notes.txt", b"not an image", "text/plain"))]
        refused = httpx.post(f"{base}/v1/search", files=files, data={"k": "3"}, timeout=120)
        assert refused.status_code == 401
        answer = httpx.post(f"{base}/v1/search", files=files, data={"k": "3"}, headers=AUTH, timeout=120)
        assert answer.status_code == 200, answer.text
        found, failed = answer.json()["queries"]
        assert found["query"] == "query.jpg"
        assert Path(found["results"][0]["input"]).name == "n02123045_tabby.JPEG"
        assert found["results"] == cli_line["results"]  # the same hits and scores as `wanwu search`
        assert failed["query"] == "notes.txt" and failed["error"]["type"] == "unsupported"
        assert "results" not in failed
        as_json = httpx.post(f"{base}/v1/search", headers=AUTH, timeout=120, json={
            "images": [{"name": "q.jpg", "data": base64.b64encode(query.read_bytes()).decode()}],
            "k": 2, "threshold": -1})
        assert as_json.status_code == 200, as_json.text
        assert as_json.json()["queries"][0]["results"] == cli_line["results"][:2]
        text = httpx.post(f"{base}/v1/search", headers=AUTH, json={"texts": ["一只猫"]}, timeout=60)
        assert text.status_code == 422 and text.json()["error"]["code"] == "no_text_tower"
        both = httpx.post(f"{base}/v1/search", headers=AUTH, files=files[:1], data={"text": "猫"}, timeout=60)
        assert both.status_code == 422
        model = httpx.get(f"{base}/v1/models", headers=AUTH, timeout=30).json()["models"][0]
        assert model["index"] == {"rows": len(NAMES), "dim": 1280, "text": False}


@pytest.mark.shared
def test_search_bodies_are_held_to_the_upload_limit(
    mobilenet: tuple[Path, Path], mobilenet_index: Path, photos: Path
) -> None:
    big = (photos / "n02504458_African_elephant.JPEG").read_bytes()
    with serve(str(mobilenet[0]), mobilenet[1], index=mobilenet_index, max_upload_mb=0.03, max_files=2) as base:
        too_big = httpx.post(f"{base}/v1/search", files=[("files", ("e.jpg", big, "image/jpeg"))], timeout=60)
        assert len(big) > 0.03 * 1024 * 1024 and too_big.status_code == 413
        many = httpx.post(f"{base}/v1/search", json={"texts": ["一", "二", "三"]}, timeout=60)
        assert many.status_code == 413 and many.json()["error"]["code"] == "too_many_files"
        bad_k = httpx.post(f"{base}/v1/search", json={"texts": ["猫"], "k": 0}, timeout=60)
        assert bad_k.status_code == 422


def test_a_server_without_an_index_says_so(tiny_model: tuple[Path, Path]) -> None:
    with serve(str(tiny_model[0]), tiny_model[1]) as base:
        answer = httpx.post(f"{base}/v1/search", json={"texts": ["猫"]}, timeout=60)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "no_index"
        assert httpx.get(f"{base}/v1/models", timeout=30).json()["models"][0]["index"] is None


@pytest.mark.shared
def test_an_index_of_another_model_fails_the_load(tiny_model: tuple[Path, Path], mobilenet_index: Path) -> None:
    from wanwu.service import ServeConfig, create_app

    cfg = ServeConfig(model=str(tiny_model[0]), labels=tiny_model[1], index=mobilenet_index,
                      options=RecognizeOptions(decoders=0, cache=False))
    failed: list[BaseException] = []
    done = threading.Event()
    app = create_app(cfg, on_load_failed=lambda e: (failed.append(e), done.set()))
    with uvicorn_in_thread(app, ready=False) as base:
        assert done.wait(120), "the load neither failed nor finished"
        ready = httpx.get(f"{base}/readyz", timeout=30)
    assert isinstance(failed[0], IndexFolderError)
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    assert "another model" in ready.json()["message"]


@pytest.mark.shared
@pytest.mark.extra("clip")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_text_search_over_http_ranks_as_the_library(photos: Path, tmp_path: Path) -> None:
    from tests.clip_helpers import CLIP_LABELS, make_clip_folder
    from wanwu.index import ImageIndex
    from wanwu.search import search_texts

    queries = ["金鱼", "一只狗的照片"]
    folder = make_clip_folder(tmp_path / "clip", extra_text="".join(queries))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(CLIP_LABELS) + "\n", encoding="utf-8")
    options = embedding_options(RecognizeOptions(decoders=0, batch_size=3, cache=False))
    with Recognizer(str(folder), labels=labels, options=options) as rec:
        build_index(rec, tmp_path / "index", [str(photos / n) for n in NAMES])
        index = ImageIndex.open(tmp_path / "index")
        want = [r.to_dict(index) for r in search_texts(rec, index, queries, k=4)]
    with serve(str(folder), labels, index=tmp_path / "index") as base:
        answer = httpx.post(f"{base}/v1/search", files=[("text", (None, q)) for q in queries], data={"k": "4"},
                            timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["queries"] == want


def test_indexed_photos_are_served_only_while_their_file_holds_the_indexed_content(
    tiny_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """GET /v1/search/images/{sha256}: the thumbnail source of the page's hits: the bytes as indexed, never a
    file that changed since, nor anything outside the index."""
    red, blue = tmp_path / "red.png", tmp_path / "blue.jpg"
    red.write_bytes(image_bytes((220, 20, 20), fmt="PNG"))
    blue.write_bytes(image_bytes((20, 30, 220)))
    options = RecognizeOptions(decoders=0, cache=False).with_embeddings()
    with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=options) as rec:
        build_index(rec, tmp_path / "index", [str(red), str(blue)])
    shas = {Path(r.input).name: r.sha256 for r in ImageIndex.open(tmp_path / "index").rows}
    with serve(str(tiny_model[0]), tiny_model[1], index=tmp_path / "index", api_keys=(KEY,)) as base:
        answer = httpx.post(f"{base}/v1/search", headers=AUTH, timeout=60,
                            files=[("files", ("q.png", red.read_bytes(), "image/png"))]).json()["queries"][0]
        first = answer["results"][0]
        assert first["input"] == str(red) and first["sha256"] == shas["red.png"]
        assert first["score"] == pytest.approx(1.0, abs=1e-3)  # float16 rows
        url = f"{base}/v1/search/images/{shas['red.png']}"
        assert httpx.get(url, timeout=30).status_code == 401
        got = httpx.get(url, headers=AUTH, timeout=30)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert got.content == red.read_bytes()
        jpeg = httpx.get(f"{base}/v1/search/images/{shas['blue.jpg']}", headers=AUTH, timeout=30)
        assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content == blue.read_bytes()
        red.write_bytes(image_bytes((10, 200, 10), fmt="PNG"))  # the file changed since it was indexed
        changed = httpx.get(url, headers=AUTH, timeout=30)
        assert changed.status_code == 404 and changed.json()["error"]["code"] == "no_preview"
        for other in ("0" * 64, "../../etc/passwd", shas["blue.jpg"].upper()):
            assert httpx.get(f"{base}/v1/search/images/{other}", headers=AUTH, timeout=30).status_code == 404


def test_serve_refuses_a_missing_index_before_it_listens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--index", str(tmp_path / "nowhere"), "--port", "0"]) == 1
    said = capsys.readouterr().err
    assert "nowhere" in said and "Traceback" not in said
