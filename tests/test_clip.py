"""Chinese-CLIP zero-shot: a tiny random checkpoint in Hugging Face layout, scored by wanwu through the normal
batched pipeline and by transformers' own processor + model, on real photos."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.clip_helpers import CLIP_LABELS, make_clip_folder, transformers_logits
from wanwu.archs import ARCHS
from wanwu.cli.main import main
from wanwu.config import RecognizeOptions
from wanwu.errors import UsageError
from wanwu.hf import DEFAULT_PROMPTS, preprocess_from_config
from wanwu.models import resolve_model
from wanwu.pipeline import Recognizer
from wanwu.records import RecordOptions
from wanwu.spec import ModelSpec

# transformers' lazy import machinery leaves a source file unclosed (import_utils.create_import_structure_from_path);
# its ResourceWarning, an error under filterwarnings=error, is not about wanwu.
pytestmark = [pytest.mark.filterwarnings("ignore::ResourceWarning"), pytest.mark.slow]

PHOTO_NAMES = (  # distinct real photos of several sizes and orientations (odd crop offsets among them)
    "n01440764_tench.JPEG", "n01443537_goldfish.JPEG", "n02085620_Chihuahua.JPEG", "n02123045_tabby.JPEG",
    "n02504458_African_elephant.JPEG", "n03417042_garbage_truck.JPEG", "n04285008_sports_car.JPEG",
    "n07753592_banana.JPEG",
)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-chinese-clip", extra_text="一只动物的相片")


@pytest.fixture(scope="module")
def label_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "mine.txt"
    path.write_text("\n".join(CLIP_LABELS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def images(photos: Path) -> list[Path]:
    found = [photos / name for name in PHOTO_NAMES]
    assert all(p.is_file() for p in found)
    return found


def _scores(spec: ModelSpec, images: list[Path], score: str) -> np.ndarray:
    options = RecognizeOptions(cache=False, decoders=0, batch_size=3)  # several batches
    with Recognizer(spec, options=options) as rec:
        records = list(rec.recognize([str(p) for p in images],
                                     record=RecordOptions(top_k=len(spec.labels), score=score)))  # type: ignore[arg-type]
    out = np.full((len(images), len(spec.labels)), np.nan)
    for i, record in enumerate(records):
        assert record.ok, record.error
        for p in record.predictions:
            assert p.label == spec.labels[p.index]
            out[i, p.index] = p.score
    return out


@pytest.mark.shared
def test_scores_match_transformers_on_real_photos(clip_folder: Path, label_file: Path, images: list[Path]) -> None:
    spec = resolve_model(str(clip_folder), label_file)
    assert spec.arch == "chinese_clip" and spec.backend == "torch" and spec.labels == CLIP_LABELS
    assert spec.logit_scale == pytest.approx(30.0, rel=1e-6)  # the learnt scale, read from the weights
    want = transformers_logits(clip_folder, images, CLIP_LABELS, DEFAULT_PROMPTS)
    cosine = _scores(spec, images, "logit")
    np.testing.assert_allclose(cosine, want / 30.0, atol=1e-3 / 30.0)  # --score logit = the cosine
    softmax = _scores(spec, images, "softmax")
    e = np.exp(want - want.max(axis=1, keepdims=True))
    np.testing.assert_allclose(softmax, e / e.sum(axis=1, keepdims=True), atol=1e-3)
    assert not np.allclose(want[0], want[1], atol=1e-2)  # the photos do give different answers


@pytest.mark.shared
def test_custom_prompts_are_averaged_like_clip(clip_folder: Path, label_file: Path, images: list[Path]) -> None:
    prompts = ("一只{}的相片", "{}的照片")
    spec = resolve_model(str(clip_folder), label_file, prompts=prompts)
    assert spec.prompts == prompts
    want = transformers_logits(clip_folder, images[:3], CLIP_LABELS, prompts)
    np.testing.assert_allclose(_scores(spec, images[:3], "logit"), want / 30.0, atol=1e-3 / 30.0)
    default = resolve_model(str(clip_folder), label_file)
    assert spec.cache_namespace() != default.cache_namespace()  # a cached answer never crosses prompt sets


def test_preprocessing_follows_the_processor_config(clip_folder: Path) -> None:
    spec = preprocess_from_config(clip_folder / "preprocessor_config.json")
    assert (spec.resize_short, spec.crop_size, spec.interpolation, spec.crop_offset) == (224, 224, "bicubic", "floor")
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert spec.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    config = json.loads((clip_folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    squashed = clip_folder.parent / "squash.json"
    squashed.write_text(json.dumps({**config, "size": {"height": 224, "width": 224}}), encoding="utf-8")
    with pytest.raises(Exception, match="shortest_edge"):
        preprocess_from_config(squashed)


def test_text_embeddings_are_cached_per_labels_and_prompts(
    clip_folder: Path, label_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wanwu.archs import chinese_clip

    spec = resolve_model(str(clip_folder), label_file)
    first = chinese_clip.text_embeddings(spec)
    assert first.shape == (len(CLIP_LABELS), 16)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    calls: list[tuple[str, ...]] = []
    real = chinese_clip.compute_text_embeddings

    def counting(folder: Path, model: object, labels: tuple[str, ...], prompts: tuple[str, ...]) -> np.ndarray:
        calls.append(labels)
        return real(folder, model, labels, prompts)

    monkeypatch.setattr(chinese_clip, "compute_text_embeddings", counting)
    np.testing.assert_array_equal(chinese_clip.text_embeddings(spec), first)  # from $WANWU_HOME/clip-text
    assert calls == []
    fewer = replace(spec, labels=CLIP_LABELS[:3])
    np.testing.assert_allclose(chinese_clip.text_embeddings(fewer), first[:3], atol=1e-5)
    assert calls == [CLIP_LABELS[:3]]  # another label list is computed, not served from the first


def test_labels_are_required_and_prompts_are_checked(
    clip_folder: Path, label_file: Path, tiny_model: tuple[Path, Path]
) -> None:
    with pytest.raises(UsageError, match="--labels"):
        resolve_model(str(clip_folder))
    with pytest.raises(UsageError, match="exactly one"):
        resolve_model(str(clip_folder), label_file, prompts=("没有位置",))
    with pytest.raises(UsageError, match="zero-shot"):
        resolve_model(str(tiny_model[0]), tiny_model[1], prompts=("一张{}的照片",))


def test_architecture_registry_names_both_networks() -> None:
    assert {"resnest", "chinese_clip"} <= set(ARCHS.names())
    assert ARCHS.get("chinese_clip").name == "chinese_clip"
    with pytest.raises(UsageError, match="unknown architecture"):
        ARCHS.get("no-such-net")


@pytest.mark.shared
def test_cli_multi_label_tagging_on_the_cosine(
    clip_folder: Path, label_file: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    want = transformers_logits(clip_folder, images[:4], CLIP_LABELS, ("一张{}的照片",)) / 30.0
    threshold = float(np.median(want))
    rc = main(["recognize", *map(str, images[:4]), "--model", str(clip_folder), "--labels", str(label_file),
               "--prompt", "一张{}的照片", "--score", "logit", "--threshold", f"{threshold:.6f}", "-k", "8",
               "-j", "0", "-q", "-f", "jsonl", "--device", "cpu"])
    assert rc == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for record, row in zip(records, want, strict=True):
        expected = {CLIP_LABELS[i] for i in np.flatnonzero(row >= threshold + 1e-4)}
        got = {p["label"] for p in record["predictions"]}
        assert expected <= got and all(p["score"] >= threshold for p in record["predictions"])
        assert all(math.isclose(p["score"], row[p["index"]], abs_tol=1e-4) for p in record["predictions"])
    assert sum(len(r["predictions"]) for r in records) < 4 * len(CLIP_LABELS)  # the threshold did cut


@pytest.fixture(scope="module")
def converted(clip_folder: Path, label_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wanwu.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("onnx") / "clip-onnx"
    report = convert(ConvertOptions(model=str(clip_folder), labels=label_file, output=out))
    assert report.max_abs_diff <= 1e-3
    return out


def test_converted_clip_has_a_dynamic_batch_axis(clip_folder: Path, label_file: Path, converted: Path) -> None:
    import onnxruntime as ort
    import torch

    from wanwu.archs import build_network

    session = ort.InferenceSession(str(converted / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(5).normal(size=(5, 3, 224, 224)).astype(np.float32)  # Chinese-CLIP's own: 1
    (got,) = session.run(None, {"input": batch})
    with torch.inference_mode():
        want = build_network(resolve_model(str(clip_folder), label_file))(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    manifest = json.loads((converted / "wanwu.json").read_text(encoding="utf-8"))
    assert manifest["prompts"] == list(DEFAULT_PROMPTS) and manifest["converted_arch"] == "chinese_clip"


@pytest.mark.shared
def test_converted_clip_scores_match_transformers_without_torch(
    clip_folder: Path, converted: Path, label_file: Path, images: list[Path]
) -> None:
    spec = resolve_model(str(converted))
    assert spec.backend == "onnx" and spec.labels == CLIP_LABELS and spec.logit_scale == pytest.approx(30.0)
    assert spec.cache_namespace() != resolve_model(str(clip_folder), label_file).cache_namespace()
    want = transformers_logits(clip_folder, images, CLIP_LABELS, DEFAULT_PROMPTS)
    np.testing.assert_allclose(_scores(spec, images, "logit"), want / 30.0, atol=1e-3 / 30.0)


def test_converted_clip_refuses_other_labels_or_prompts(converted: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("手机\n电脑\n", encoding="utf-8")
    with pytest.raises(UsageError, match="convert"):
        resolve_model(str(converted), other)
    with pytest.raises(UsageError, match="convert"):
        resolve_model(str(converted), prompts=("一张{}的图",))


def test_hf_id_downloads_once_into_wanwu_home(
    clip_folder: Path, label_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from tests.servers import static_server
    from wanwu.errors import DownloadError
    from wanwu.hf import HubRef

    served = tmp_path / "hub" / "OFA-Sys" / "tiny-clip" / "resolve" / "main"
    shutil.copytree(clip_folder, served)
    (served / "special_tokens_map.json").unlink(missing_ok=True)  # optional files may be absent (404)
    monkeypatch.delenv("WANWU_OFFLINE", raising=False)
    with static_server(tmp_path / "hub") as url:
        monkeypatch.setenv("WANWU_HF_ENDPOINT", url)
        spec = resolve_model("hf:OFA-Sys/tiny-clip", label_file)
        local = HubRef.parse("hf:OFA-Sys/tiny-clip").folder()
        assert spec.weights == local and (local / ".complete").is_file()
        assert (local / "model.safetensors").read_bytes() == (clip_folder / "model.safetensors").read_bytes()
        assert spec.source == "hf:OFA-Sys/tiny-clip" and spec.arch == "chinese_clip"
        assert spec.weights_fingerprint == resolve_model(str(clip_folder), label_file).weights_fingerprint
        with pytest.raises(DownloadError, match="HTTP 404"):
            resolve_model("hf:OFA-Sys/missing", label_file)
    # the server is gone: the downloaded copy is used, nothing is fetched again
    assert resolve_model("hf:OFA-Sys/tiny-clip", label_file).weights == local
    monkeypatch.setenv("WANWU_OFFLINE", "1")
    with pytest.raises(DownloadError, match="WANWU_OFFLINE"):
        resolve_model("hf:OFA-Sys/other", label_file)
    for bad in ("hf:noslash", "hf:a/b/c", "hf:../x", "hf:a/b@../main"):
        with pytest.raises(UsageError):
            resolve_model(bad, label_file)


@pytest.mark.shared
@pytest.mark.extra("server")
def test_service_scores_a_label_list_per_request(clip_folder: Path, label_file: Path, images: list[Path]) -> None:
    import base64

    import httpx

    from tests.servers import uvicorn_in_thread
    from wanwu.service import ServeConfig, create_app

    config = ServeConfig(model=str(clip_folder), labels=label_file, options=RecognizeOptions(decoders=0, cache=False))
    mine = ("手机", "金鱼", "汽车")
    want_own = transformers_logits(clip_folder, images[:2], mine, DEFAULT_PROMPTS) / 30.0
    want_default = transformers_logits(clip_folder, images[:2], CLIP_LABELS, DEFAULT_PROMPTS) / 30.0
    body = {"images": [base64.b64encode(p.read_bytes()).decode() for p in images[:2]], "top_k": 8}
    with uvicorn_in_thread(create_app(config)) as base, httpx.Client(base_url=base, timeout=120) as client:
        models = client.get("/v1/models").json()["models"]
        assert models[0]["zero_shot"] is True
        for labels, want in ((mine, want_own), (None, want_default), (mine, want_own)):
            payload = dict(body)
            if labels is not None:
                payload["labels"] = [" 手机 ", *labels[1:], "手机", ""]  # stripped, deduplicated
            response = client.post("/v1/recognize", json=payload)
            assert response.status_code == 200, response.text
            expected_labels = labels or CLIP_LABELS
            for record, row in zip(response.json()["results"], want, strict=True):
                predictions = record["predictions"]
                assert len(predictions) == len(expected_labels)
                assert [p["label"] for p in predictions] == [expected_labels[p["index"]] for p in predictions]
                e = np.exp(30.0 * (row - row.max()))
                probs = e / e.sum()
                assert all(abs(p["score"] - probs[p["index"]]) < 1e-3 for p in predictions)
        form = {"labels": "手机\n金鱼\n汽车\n", "top_k": "3"}
        multipart = client.post("/v1/recognize", data=form,
                                files=[("files", (images[0].name, images[0].read_bytes(), "image/jpeg"))])
        assert {p["label"] for p in multipart.json()["results"][0]["predictions"]} == set(mine)
        too_long = client.post("/v1/recognize", json={**body, "labels": ["长" * 65]})
        assert too_long.status_code == 422


@pytest.mark.extra("server")
def test_service_label_lists_are_evicted_only_when_idle(clip_folder: Path, label_file: Path) -> None:
    from wanwu.engine import Engine
    from wanwu.service import ServeConfig
    from wanwu.service.batcher import _NoObserver
    from wanwu.service.runtime import LABEL_SETS, Runtime

    engine = Engine.load(resolve_model(str(clip_folder), label_file), max_batch=4)
    config = ServeConfig(model=str(clip_folder), labels=label_file, options=RecognizeOptions(decoders=0, cache=False))
    runtime = Runtime(config, engine, None, _NoObserver())
    try:
        held = runtime._for_labels(("猫", "狗"))  # a request still running on the oldest list
        for i in range(LABEL_SETS):
            runtime._release(runtime._for_labels((CLIP_LABELS[i], CLIP_LABELS[i + 1])))
        assert held.evicted and held.recognizer.engine.backend._model is not None  # type: ignore[attr-defined]
        pixels = np.zeros((1, 3, 224, 224), np.float32)
        assert held.recognizer.engine.backend.infer(pixels).shape == (1, 2)  # still usable by its request
        runtime._release(held)
        assert held.recognizer.engine.backend._model is None  # type: ignore[attr-defined]  # closed now
        assert engine.backend.infer(pixels).shape == (1, len(CLIP_LABELS))  # the shared network is untouched
    finally:
        runtime.recognizer.close()
        runtime.batcher.stop()
        for label_set in runtime._label_sets.values():
            label_set.recognizer.close()
            label_set.batcher.stop()


@pytest.mark.shared
def test_bf16_casts_the_image_tower_once_and_keeps_the_cosine_fp32(
    clip_folder: Path, label_file: Path, images: list[Path]
) -> None:
    import torch

    from wanwu.backends import BackendOptions
    from wanwu.engine import Engine
    from wanwu.imaging import prepare

    spec = resolve_model(str(clip_folder), label_file)
    crops = [prepare(p.read_bytes(), spec.preprocess).pixels for p in images]
    fp32 = Engine.load(spec, backend_options=BackendOptions(device="cpu"))
    bf16 = Engine.load(spec, backend_options=BackendOptions(device="cpu", precision="bf16"))
    head = bf16.backend._model  # type: ignore[attr-defined]
    assert head.visual_projection.weight.dtype == torch.bfloat16 and head.text.dtype == torch.float32
    assert bf16.backend._autocast_dtype is None  # type: ignore[attr-defined]
    for got, want in zip(bf16.infer(crops), fp32.infer(crops), strict=True):
        assert got.values.dtype == np.float32
        np.testing.assert_allclose(got.values[:3], want.values[:3], atol=0.02 * 30)  # cosines within 0.02


@pytest.mark.extra("server")
def test_service_label_lists_go_through_a_batcher_and_the_shared_decoders(
    clip_folder: Path, label_file: Path, images: list[Path]
) -> None:
    import asyncio
    import threading

    from wanwu.engine import Engine
    from wanwu.records import RecordOptions
    from wanwu.service import ServeConfig
    from wanwu.service.batcher import _NoObserver
    from wanwu.service.runtime import Runtime
    from wanwu.sources import InputItem

    engine = Engine.load(resolve_model(str(clip_folder), label_file), max_batch=8)
    config = ServeConfig(model=str(clip_folder), labels=label_file, max_delay_ms=200,
                         options=RecognizeOptions(decoders=1, cache=False))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runtime = Runtime(config, engine, None, _NoObserver())
    runtime.start()
    labels = ("猫", "狗", "汽车")
    items = [InputItem.from_bytes(p.name, p.read_bytes()) for p in images[:3]]
    try:
        requests = [asyncio.run_coroutine_threadsafe(runtime.recognize(items, RecordOptions(top_k=3), labels), loop)
                    for _ in range(2)]
        results = [r.result(timeout=300) for r in requests]
        label_set = runtime._label_sets[labels]
        assert all(r.ok for rs in results for r in rs)
        for a, b in zip(*results, strict=True):  # the same answers (up to the last digit: other batch sizes)
            assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
            assert all(abs(p.score - q.score) < 1e-4 for p, q in zip(a.predictions, b.predictions, strict=True))
        assert 1 <= label_set.batcher.batches < 6  # the two requests' six crops, batched together
        assert runtime.batcher.batches == 0  # the default label list's batcher saw none of them
        assert label_set.recognizer.decoders is runtime.recognizer.decoders  # no decode process of its own
        assert runtime._batchers == (runtime.batcher, label_set.batcher)  # both told when the shared pool drains
    finally:
        asyncio.run_coroutine_threadsafe(runtime.close(), loop).result(timeout=120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def test_hf_download_is_checked_and_done_once_by_concurrent_processes(
    clip_folder: Path, label_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import http.server
    import threading
    from collections import Counter

    from tests.servers import free_port
    from wanwu.errors import DownloadError
    from wanwu.hf import HubRef, fetch

    weights = (clip_folder / "model.safetensors").read_bytes()
    good = hashlib.sha256(weights).hexdigest()
    gets: Counter[str] = Counter()
    lying = {"on": True}

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            gets[name] += 1
            local = clip_folder / name
            if not local.is_file():
                self.send_response(404)
                self.end_headers()
                return
            body = local.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            if name == "model.safetensors":  # as the Hub answers for an LFS file
                self.send_header("X-Linked-Etag", f'"{"0" * 64 if lying["on"] else good}"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("WANWU_OFFLINE", raising=False)
    monkeypatch.setenv("WANWU_HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    ref = HubRef.parse("hf:OFA-Sys/tiny-clip")
    try:
        with pytest.raises(DownloadError, match="does not match"):
            fetch(ref)  # a corrupted download is refused, and not kept
        assert not (ref.folder() / "model.safetensors").exists()
        assert not (ref.folder() / "model.safetensors.part").exists()
        lying["on"] = False
        gets.clear()
        results: list[Path] = []
        threads = [threading.Thread(target=lambda: results.append(fetch(ref))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == [ref.folder()] * 3
        assert gets["model.safetensors"] == 1  # one of them downloaded it; the others waited and found it
        assert (ref.folder() / "model.safetensors").read_bytes() == weights
    finally:
        server.shutdown()
        server.server_close()
