"""The web page in a real headless Chromium: upload photos and a text file, see Chinese labels and errors.

Needs Debian's chromium at /usr/bin/chromium and the playwright package (Playwright's own browser download
is not used). Skips with the reason when either is missing, except in CI (CI=true), where it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servers import free_port, stop, wait_ready

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
pytestmark = [pytest.mark.slow, pytest.mark.shared]


def _require_browser() -> None:
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium fonts-wqy-zenhei)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def server(mobilenet: tuple[Path, Path]) -> Iterator[str]:
    """The real `wanwu serve` command, on a free port."""
    port = free_port()
    model, labels = mobilenet
    cmd = [
        sys.executable, "-c", "from wanwu.cli.main import run; run()",
        "serve", "-m", str(model), "-l", str(labels), "--port", str(port), "--no-cache", "-j", "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=120, proc=proc)
        yield base
    finally:
        stop(proc)


_CARDS_JS = """
() => Array.from(document.querySelectorAll('.card')).map((card) => {
  const text = (sel) => { const e = card.querySelector(sel); return e ? e.innerText : ''; };
  const img = card.querySelector('.thumb img');
  return {
    name: text('.name'),
    status: card.dataset.status,
    labels: Array.from(card.querySelectorAll('.pred .label')).map((e) => e.innerText),
    bars: Array.from(card.querySelectorAll('.bar span')).map((e) => parseFloat(e.style.width)),
    error: text('.error-message'),
    thumb_width: img ? img.naturalWidth : 0,
    no_preview: text('.no-preview'),
  };
})
"""

# Drops an image made in the page onto the drop zone, as a drag from the desktop would.
_DROP_JS = """
async () => {
  const canvas = document.createElement('canvas');
  canvas.width = 300; canvas.height = 200;
  const g = canvas.getContext('2d');
  g.fillStyle = '#c0392b'; g.fillRect(0, 0, 300, 200);
  g.fillStyle = '#f1c40f'; g.beginPath(); g.arc(150, 100, 60, 0, 7); g.fill();
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
  const data = new DataTransfer();
  data.items.add(new File([blob], '拖放.png', { type: 'image/png' }));
  const zone = document.getElementById('drop-zone');
  zone.dispatchEvent(new DragEvent('dragover', { dataTransfer: data, bubbles: true, cancelable: true }));
  const highlighted = zone.classList.contains('dragging');
  zone.dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }));
  return highlighted;
}
"""

# Draws one character in the page's font; a character the fonts lack comes out as the same "tofu" box.
_GLYPHS_JS = """
(chars) => {
  const font = getComputedStyle(document.querySelector('h1')).fontFamily;
  const draw = (ch) => {
    const c = document.createElement('canvas');
    c.width = c.height = 48;
    const g = c.getContext('2d');
    g.fillStyle = '#fff'; g.fillRect(0, 0, 48, 48);
    g.fillStyle = '#000'; g.font = '40px ' + font; g.textBaseline = 'top';
    g.fillText(ch, 2, 2);
    return Array.from(g.getImageData(0, 0, 48, 48).data.filter((_, i) => i % 4 === 0)).join(',');
  };
  return chars.map(draw);
}
"""


def _wait_for_cards(page: Any, count: int) -> None:
    """Until the page shows ``count`` result cards, none of them still pending. (Locators, not a predicate
    string: the page's Content-Security-Policy forbids evaluating strings as script, and rightly.)"""
    from playwright.sync_api import expect

    expect(page.locator(".card")).to_have_count(count, timeout=60_000)
    expect(page.locator(".card[data-status=pending]")).to_have_count(0, timeout=60_000)


def test_upload_two_photos_and_a_text_file(server: str, photos: Path, tmp_path: Path) -> None:
    _require_browser()
    from playwright.sync_api import sync_playwright

    chosen = [photos / "n01443537_goldfish.JPEG", photos / "n02123045_tabby.JPEG"]
    chosen = [p if p.exists() else q for p, q in zip(chosen, sorted(photos.iterdir())[:2], strict=True)]
    notes = tmp_path / "说明.txt"
    notes.write_text("这不是图片。", encoding="utf-8")
    uploads = [*chosen, notes]
    expected = httpx.post(
        f"{server}/v1/recognize",
        files=[("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in uploads],
        data={"top_k": "5"}, timeout=60,
    ).json()["results"]

    shot = tmp_path / "wanwu-web.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="zh-CN")
            refused: list[str] = []  # what the page's Content-Security-Policy blocked: nothing may be
            page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
            page.goto(server + "/")
            assert page.title() == "万物识别"
            assert "将图片拖放到这里" in page.inner_text("#drop-zone")
            page.wait_for_load_state("networkidle")  # /v1/models answered: a fixed-class model, no label box
            labels_box_shown = page.is_visible("#labels-box")
            page.set_input_files("#file-input", [str(p) for p in uploads])
            _wait_for_cards(page, 3)
            shown: list[dict[str, Any]] = page.evaluate(_CARDS_JS)
            status = page.inner_text("#status")
            glyphs = page.evaluate(_GLYPHS_JS, ["万", "物", "\U0010fffd"])
            page.screenshot(path=str(shot), full_page=True)
            highlighted = page.evaluate(_DROP_JS)
            _wait_for_cards(page, 4)
            dropped = page.evaluate(_CARDS_JS)[3]
        finally:
            browser.close()

    assert not labels_box_shown
    assert refused == []
    assert [s["name"] for s in shown] == [p.name for p in uploads]
    assert [s["status"] for s in shown] == ["ok", "ok", "error"]
    for card, record in zip(shown[:2], expected[:2], strict=True):
        assert card["labels"] == [p["label"] for p in record["predictions"]]
        assert len(card["labels"]) == 5
        assert all(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in card["labels"])
        assert card["bars"][0] > 0 and card["bars"] == sorted(card["bars"], reverse=True)
        assert card["thumb_width"] > 0
    assert shown[2]["thumb_width"] == 0 and shown[2]["no_preview"] == "无法预览"
    assert "识别失败" in shown[2]["error"] and "不是受支持的图片格式" in shown[2]["error"]
    assert expected[2]["error"]["message"] in shown[2]["error"]
    assert "成功 2 张" in status and "失败 1 张" in status
    assert highlighted
    assert dropped["name"] == "拖放.png" and dropped["status"] == "ok" and len(dropped["labels"]) == 5

    # The Chinese renders as real glyphs: two characters differ from each other and from a missing glyph.
    wan, wu, missing = glyphs
    assert wan != wu and wan != missing and wu != missing

    # The screenshot is a real page, not a blank or single-colour frame.
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[0] >= 900 and image.shape[1] == 1280
    assert image.std() > 20
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 500


@pytest.mark.extra("clip")
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # transformers' lazy imports leave a file unclosed
def test_a_zero_shot_model_takes_the_label_list_typed_on_the_page(photos: Path, tmp_path: Path) -> None:
    """`wanwu serve` with a Chinese-CLIP folder: the page shows the label box, and what is typed there is what the
    photos are scored against (the same answer as the API gives for that list)."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    from tests.clip_helpers import CLIP_LABELS, make_clip_folder

    mine = ["手机", "金鱼", "汽车"]
    folder = make_clip_folder(tmp_path / "tiny-chinese-clip", extra_text="".join(mine))
    default_labels = tmp_path / "labels.txt"
    default_labels.write_text("\n".join(CLIP_LABELS) + "\n", encoding="utf-8")
    chosen = [photos / "n01443537_goldfish.JPEG", photos / "n04285008_sports_car.JPEG"]
    port = free_port()
    cmd = [sys.executable, "-c", "from wanwu.cli.main import run; run()", "serve", "-m", str(folder),
           "-l", str(default_labels), "--port", str(port), "--no-cache", "-j", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=180, proc=proc)
        expected = httpx.post(
            f"{base}/v1/recognize", data={"top_k": "3", "labels": "\n".join(mine)},
            files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in chosen], timeout=60,
        ).json()["results"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="zh-CN")
                page.goto(base + "/")
                page.wait_for_selector("#labels-box", state="visible", timeout=30_000)
                page.fill("#labels", "\n".join(mine) + "\n")
                page.select_option("#top-k", "3")
                page.set_input_files("#file-input", [str(p) for p in chosen])
                _wait_for_cards(page, 2)
                shown: list[dict[str, Any]] = page.evaluate(_CARDS_JS)
            finally:
                browser.close()
    finally:
        stop(proc)
    assert [s["status"] for s in shown] == ["ok", "ok"]
    for card, record in zip(shown, expected, strict=True):
        assert sorted(card["labels"]) == sorted(mine)  # the typed list, not the server's default labels
        assert card["labels"] == [p["label"] for p in record["predictions"]]


# The search results on the page: each tile's name, score text and whether its thumbnail loaded.
_HITS_JS = """
() => Array.from(document.querySelectorAll('#hits .hit')).map((tile) => {
  const img = tile.querySelector('.thumb img');
  return {
    name: tile.querySelector('.name').innerText,
    score: tile.querySelector('.score').innerText,
    thumb_width: img ? img.naturalWidth : 0,
  };
})
"""


def test_find_similar_on_a_card_shows_the_index_hits_with_thumbnails(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    """`wanwu serve --index --api-key`: once the key is typed, the page shows the search box (no text box:
    MobileNetV2 has no text tower), each card gets 找相似, and a click shows the index's hits for that photo, with
    scores and thumbnails (fetched with the key), as /v1/search answers them."""
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    from wanwu.config import RecognizeOptions
    from wanwu.pipeline import Recognizer
    from wanwu.search import build_index

    library = [photos / n for n in ("n01443537_goldfish.JPEG", "n02123045_tabby.JPEG",
                                    "n04285008_sports_car.JPEG", "n07753592_banana.JPEG")]
    options = RecognizeOptions(decoders=0, cache=False).with_embeddings()
    with Recognizer(str(mobilenet[0]), labels=mobilenet[1], options=options) as rec:
        build_index(rec, tmp_path / "index", [str(p) for p in library])
    query = tmp_path / "猫.jpg"
    with Image.open(library[1]) as im:
        im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(query, quality=70)
    port = free_port()
    cmd = [sys.executable, "-c", "from wanwu.cli.main import run; run()", "serve", "-m", str(mobilenet[0]),
           "-l", str(mobilenet[1]), "--index", str(tmp_path / "index"), "--port", str(port), "--no-cache", "-j", "0",
           "--api-key", "page-key"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=120, proc=proc)
        expected = httpx.post(f"{base}/v1/search", files=[("files", (query.name, query.read_bytes(), "image/jpeg"))],
                              data={"k": "12"}, headers={"X-API-Key": "page-key"},
                              timeout=60).json()["queries"][0]["results"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="zh-CN")
                refused: list[str] = []
                page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
                page.goto(base + "/")
                page.wait_for_selector("#key-box", state="visible", timeout=30_000)  # /v1/models said 401
                search_before_key = page.is_visible("#search-box")
                page.fill("#api-key", "page-key")
                page.dispatch_event("#api-key", "change")
                page.wait_for_selector("#search-box", state="visible", timeout=30_000)
                text_box_shown = page.is_visible("#search-text")
                page.set_input_files("#file-input", [str(query)])
                _wait_for_cards(page, 1)
                page.click(".card .similar")
                expect(page.locator("#hits .hit")).to_have_count(len(expected), timeout=60_000)
                expect(page.locator("#hits .hit .thumb img")).to_have_count(len(expected), timeout=60_000)
                shown: list[dict[str, Any]] = page.evaluate(_HITS_JS)
                title = page.inner_text("#search-title")
            finally:
                browser.close()
    finally:
        stop(proc)
    assert not search_before_key and not text_box_shown
    assert refused == []
    assert "猫.jpg" in title
    assert [s["name"] for s in shown] == [Path(h["input"]).name for h in expected]
    assert shown[0]["name"] == "n02123045_tabby.JPEG"
    assert [s["score"] for s in shown] == [f"相似度 {h['score']:.3f}" for h in expected]
    assert all(s["thumb_width"] > 0 for s in shown)


@pytest.mark.extra("clip")
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # transformers' lazy imports leave a file unclosed
def test_the_search_box_finds_photos_by_chinese_text(photos: Path, tmp_path: Path) -> None:
    """A Chinese-CLIP server with an index: the page's text box sends the words typed there to /v1/search and shows
    the hits in the API's order and scores, each card also offering 找相似."""
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    from tests.clip_helpers import CLIP_LABELS, make_clip_folder
    from wanwu.config import RecognizeOptions
    from wanwu.pipeline import Recognizer
    from wanwu.search import build_index

    words = "一条金鱼"
    folder = make_clip_folder(tmp_path / "tiny-chinese-clip", extra_text=words)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(CLIP_LABELS) + "\n", encoding="utf-8")
    library = [photos / n for n in ("n01443537_goldfish.JPEG", "n02085620_Chihuahua.JPEG",
                                    "n04285008_sports_car.JPEG", "n07753592_banana.JPEG")]
    options = RecognizeOptions(decoders=0, cache=False).with_embeddings()
    with Recognizer(str(folder), labels=labels, options=options) as rec:
        build_index(rec, tmp_path / "index", [str(p) for p in library])
    port = free_port()
    cmd = [sys.executable, "-c", "from wanwu.cli.main import run; run()", "serve", "-m", str(folder),
           "-l", str(labels), "--index", str(tmp_path / "index"), "--port", str(port), "--no-cache", "-j", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=180, proc=proc)
        expected = httpx.post(f"{base}/v1/search", json={"texts": [words], "k": 12},
                              timeout=60).json()["queries"][0]["results"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="zh-CN")
                page.goto(base + "/")
                page.wait_for_selector("#search-text", state="visible", timeout=30_000)
                page.fill("#search-text", words)
                page.press("#search-text", "Enter")
                expect(page.locator("#hits .hit .thumb img")).to_have_count(len(library), timeout=60_000)
                shown: list[dict[str, Any]] = page.evaluate(_HITS_JS)
                title = page.inner_text("#search-title")
                page.set_input_files("#file-input", [str(library[2])])
                _wait_for_cards(page, 1)
                similar = page.locator(".card .similar").count()
            finally:
                browser.close()
    finally:
        stop(proc)
    assert words in title
    assert [s["name"] for s in shown] == [Path(h["input"]).name for h in expected]
    assert [s["score"] for s in shown] == [f"相似度 {h['score']:.3f}" for h in expected]
    assert similar == 1
