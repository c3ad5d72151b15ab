"""wanwu report: a self-contained HTML page, read in Chromium; bounded for large runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_web import CHROMIUM, CHROMIUM_ARGS, _require_browser
from wanwu.cli.main import main
from wanwu.report import render, summarize


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, mobilenet: tuple[Path, Path], photos: Path) -> Path:
    """A real run: 40 photos, one missing file, one text file named .jpg."""
    folder = tmp_path_factory.mktemp("report")
    bad = folder / "说明.jpg"
    bad.write_text("这不是图片 <script>alert(1)</script>", encoding="utf-8")
    inputs = [*map(str, sorted(photos.glob("*.JPEG"))[:40]), str(folder / "gone.jpg"), str(bad)]
    out = folder / "run.jsonl"
    assert main(["recognize", *inputs, "--model", str(mobilenet[0]), "--labels", str(mobilenet[1]), "-q",
                 "--no-cache", "-o", str(out)]) == 3
    return out


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_report_in_chromium(run: Path, tmp_path: Path) -> None:
    _require_browser()
    from playwright.sync_api import sync_playwright

    page_path = tmp_path / "report.html"
    assert main(["report", str(run), "-o", str(page_path), "--seconds", "4"]) == 0
    records = _records(run)
    ok = [r for r in records if r["status"] == "ok"]
    top1 = [r["predictions"][0] for r in ok]  # type: ignore[index]
    shot = tmp_path / "report.png"
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000}, locale="zh-CN")
            page.on("request", lambda req: requests.append(req.url))
            page.on("dialog", lambda d: requests.append("dialog " + d.message))
            page.goto(page_path.as_uri())
            assert page.title() == "万物识别报告"
            cards = page.inner_text(".cards")
            assert "42" in cards and "40" in cards and "吞吐量" in cards and "10.5 张/秒" in cards
            assert "找不到" in page.inner_text(".errs")
            fails = page.inner_text(".fails")
            assert "gone.jpg" in fails and "说明.jpg" in fails
            bars = page.locator("svg.chart rect").count()
            assert bars == min(20, len({p["label"] for p in top1}))  # type: ignore[index]
            # every shown sample is a decoded picture of a real input, with its score
            shown = page.evaluate(
                "[...document.querySelectorAll('figure')].map(f => ({title: f.title, "
                "w: f.querySelector('img') ? f.querySelector('img').naturalWidth : 0, "
                "score: f.querySelector('b').textContent}))"
            )
            by_input = {r["input"]: r for r in ok}
            assert shown and all(0 < s["w"] <= 112 for s in shown)
            for s in shown:
                best = by_input[s["title"]]["predictions"][0]  # type: ignore[index]
                assert s["score"] == f"{best['score'] * 100:.1f}%"  # type: ignore[index]
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert requests == [page_path.as_uri()]  # nothing fetched beyond the file itself; no script ran
    assert shot.stat().st_size > 10_000


def test_sampling_keeps_best_per_label_and_page_is_bounded(tmp_path: Path, photos: Path) -> None:
    files = sorted(photos.glob("*.JPEG"))[:120]
    results = tmp_path / "big.jsonl"
    with results.open("w", encoding="utf-8") as f:
        for i in range(30_000):  # a large run: many records over few real files, 3 labels, some failures
            if i % 100 == 99:
                f.write(json.dumps({"input": f"/x/{i}.jpg", "status": "error",
                                    "error": {"type": "decode_error", "message": "m" * 1000}}) + "\n")
                continue
            label = ("猫", "狗", "鸟")[i % 3]
            f.write(json.dumps({"input": str(files[i % len(files)]), "status": "ok",
                                "predictions": [{"index": i % 3, "label": label, "score": (i % 997) / 1000}]},
                               ensure_ascii=False) + "\n")
        f.write('{"input": "torn')
    summary = summarize([results], per_label=30, max_failures=50)
    assert summary.ok == 29_700 and summary.failed == 300 and summary.unreadable == 1
    assert len(summary.failures) == 50 and all(len(m) == 300 for _, _, m in summary.failures)
    assert all(len(h) == 30 for h in summary.samples.values())
    assert min(s for s, _, _ in summary.samples["猫"]) >= 0.966  # the 30 best of 猫's scores
    budget = 200_000
    page = render(summary, title="大", thumb_budget=budget)
    pictures = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert pictures and "无预览" in page  # the budget ran out before all 90 samples had a picture
    assert sum(len(p) * 3 // 4 for p in pictures) <= budget
    assert len(page.encode()) < budget * 4 // 3 + 200_000
    assert "只列出前 50 个失败" in page


def test_parquet_results_give_the_same_page(run: Path, tmp_path: Path) -> None:
    from wanwu.parquet import ParquetSink
    from wanwu.records import Record
    from wanwu.sinks import SinkOptions

    parquet_path = tmp_path / "run.parquet"
    with parquet_path.open("w") as stream:
        sink = ParquetSink(stream, SinkOptions())
        for data in _records(run):
            sink.write(Record.from_dict(data))
        sink.close()
    from_jsonl = render(summarize([run]), title="t")
    assert "说明.jpg" in from_jsonl and render(summarize([parquet_path]), title="t") == from_jsonl
