"""``wanwu report``: one self-contained HTML page about a run's records (Chinese UI, works offline).

The results are read once, streaming (JSONL, or Parquet with the ``parquet`` extra); memory holds counts plus
a bounded sample: per label the ``per_label`` best-scoring inputs, and the first ``max_failures`` failures.
Thumbnails are made only for the sampled inputs that are readable local files, as small JPEG data URIs; a
budget caps their total (``THUMB_BUDGET``), after which a sample is shown without its picture. So the page
stays bounded whatever the run's size: about ``THUMB_BUDGET`` + 1 MB at the defaults (text of at most
``top_labels`` × ``per_label`` cards, ``max_failures`` failure rows with messages cut to 300 characters).
The chart is inline SVG; the page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import heapq
import html
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wanwu.errors import UsageError

THUMB_PX = 112
THUMB_BUDGET = 4 * 1024 * 1024  # bytes of JPEG thumbnails in one page, at most
MESSAGE_CHARS = 300
ERROR_NAMES = {
    "not_found": "找不到", "decode_error": "无法解码", "too_large": "文件过大", "unsupported": "格式不支持",
    "fetch_error": "读取失败", "internal": "内部错误",
}


@dataclass
class Summary:
    """What the page shows, gathered in one pass with bounded memory."""

    per_label: int = 8
    max_failures: int = 500
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    labels: Counter[str] = field(default_factory=Counter)  # top-1 label -> records
    samples: dict[str, list[tuple[float, int, str]]] = field(default_factory=dict)  # label -> min-heap
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # input, type, message
    unreadable: int = 0  # lines that were not records
    seen: int = 0

    def add(self, data: dict[str, Any]) -> None:
        self.seen += 1
        inp = str(data.get("input", ""))
        if data.get("status") == "ok":
            self.ok += 1
            preds = data.get("predictions") or []
            if not preds:
                return
            label, score = str(preds[0].get("label", "")), float(preds[0].get("score", 0.0))
            self.labels[label] += 1
            heap = self.samples.setdefault(label, [])
            entry = (score, -self.seen, inp)  # ties: the earlier input wins
            if len(heap) < self.per_label:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                heapq.heapreplace(heap, entry)
        else:
            err = data.get("error") or {}
            kind = str(err.get("type", "internal"))
            self.errors[kind] += 1
            if len(self.failures) < self.max_failures:
                self.failures.append((inp, kind, str(err.get("message", ""))[:MESSAGE_CHARS]))

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def read_records(path: Path) -> Iterator[dict[str, Any] | None]:
    """Records of a results file (None for a line that is not one). JSONL, or Parquet by its suffix."""
    if path.suffix.lower() in (".parquet", ".pq"):
        yield from _read_parquet(path)
        return
    try:
        f = path.open("rb")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for line in f:
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except ValueError:
                yield None
                continue
            yield data if isinstance(data, dict) and "status" in data else None


def _read_parquet(path: Path) -> Iterator[dict[str, Any] | None]:
    from wanwu.parquet import require_pyarrow

    pq = require_pyarrow().parquet
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UsageError(f"cannot read {path} as Parquet: {e}") from None
    for batch in pf.iter_batches():
        for row in batch.to_pylist():
            if row.get("status") == "error":
                row["error"] = {"type": row.get("error_type"), "message": row.get("error_message")}
            yield row


def summarize(paths: Iterable[Path], per_label: int = 8, max_failures: int = 500) -> Summary:
    summary = Summary(per_label=per_label, max_failures=max_failures)
    for path in paths:
        for data in read_records(path):
            if data is None:
                summary.unreadable += 1
            else:
                summary.add(data)
    return summary


def thumbnail(source: str, px: int = THUMB_PX) -> bytes | None:
    """A small JPEG of a local image file, or None (not a local file, unreadable, not an image)."""
    if "://" in source or not os.path.isfile(source):
        return None
    from PIL import Image, ImageOps

    try:
        with Image.open(source) as im:
            im.draft("RGB", (px * 2, px * 2))
            small = ImageOps.exif_transpose(im).convert("RGB")
            small.thumbnail((px, px))
            out = io.BytesIO()
            small.save(out, "JPEG", quality=70, optimize=True)
            return out.getvalue()
    except Exception:  # a broken file gets no picture; the report goes on
        return None


def render(summary: Summary, *, title: str, top_labels: int = 24, chart_labels: int = 20,
           elapsed: float | None = None, thumb_budget: int = THUMB_BUDGET) -> str:
    e = html.escape
    total = summary.ok + summary.failed
    parts = [_HEAD.replace("{title}", e(title))]
    parts.append(f"<h1>{e(title)}</h1>")
    cards = [("总数", f"{total:,}"), ("成功", f"{summary.ok:,}"), ("失败", f"{summary.failed:,}")]
    if elapsed:
        cards.append(("吞吐量", f"{total / elapsed:,.1f} 张/秒"))
    else:
        cards.append(("吞吐量", "未知（结果中没有耗时；可用 --seconds 提供）"))
    if summary.unreadable:
        cards.append(("无法解析的行", f"{summary.unreadable:,}"))
    parts.append('<section class="cards">' + "".join(
        f'<div class="card"><div class="k">{e(k)}</div><div class="v">{e(v)}</div></div>' for k, v in cards
    ) + "</section>")
    if summary.errors:
        parts.append('<h2>失败类型</h2><table class="errs"><tr><th>类型</th><th>数量</th></tr>' + "".join(
            f"<tr><td>{e(ERROR_NAMES.get(k, k))} <code>{e(k)}</code></td><td>{n:,}</td></tr>"
            for k, n in summary.errors.most_common()
        ) + "</table>")
    parts.append(f"<h2>最常见的标签（前 {min(chart_labels, len(summary.labels))} 个，按首选标签计）</h2>")
    parts.append(_chart(summary.labels.most_common(chart_labels), summary.ok))
    parts.append(f"<h2>各标签的样例（每个标签最多 {summary.per_label} 张，按置信度从高到低）</h2>")
    budget = thumb_budget
    for label, count in summary.labels.most_common(top_labels):
        samples = sorted(summary.samples.get(label, []), reverse=True)
        parts.append(f'<section class="label" data-label="{e(label)}"><h3>{e(label)} '
                     f'<span class="n">{count:,} 张</span></h3><div class="grid">')
        for score, _order, inp in samples:
            jpeg = thumbnail(inp) if budget > 0 else None
            if jpeg is not None and len(jpeg) <= budget:
                budget -= len(jpeg)
                pic = f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">'
            else:
                pic = '<div class="noimg">无预览</div>'
            parts.append(f'<figure title="{e(inp)}">{pic}<figcaption><b>{score * 100:.1f}%</b> '
                         f"<span>{e(os.path.basename(inp.rstrip('/')) or inp)}</span></figcaption></figure>")
        parts.append("</div></section>")
    if len(summary.labels) > top_labels:
        parts.append(f'<p class="note">另有 {len(summary.labels) - top_labels:,} 个标签未列出样例。</p>')
    parts.append(f"<h2>失败的输入（{summary.failed:,}）</h2>")
    if summary.failures:
        parts.append('<table class="fails"><tr><th>输入</th><th>类型</th><th>原因</th></tr>' + "".join(
            f"<tr><td>{e(i)}</td><td>{e(ERROR_NAMES.get(k, k))}</td><td>{e(m)}</td></tr>"
            for i, k, m in summary.failures
        ) + "</table>")
        if summary.failed > len(summary.failures):
            parts.append(f'<p class="note">只列出前 {len(summary.failures):,} 个失败。</p>')
    else:
        parts.append("<p>没有失败。</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _chart(rows: list[tuple[str, int]], ok: int) -> str:
    if not rows:
        return "<p>没有成功识别的图片。</p>"
    e = html.escape
    bar_h, gap, left, width = 22, 6, 170, 760
    top = max(n for _, n in rows)
    height = len(rows) * (bar_h + gap)
    out = [f'<svg class="chart" role="img" aria-label="标签频次" width="{left + width + 90}" height="{height}" '
           f'xmlns="http://www.w3.org/2000/svg">']
    for i, (label, n) in enumerate(rows):
        y = i * (bar_h + gap)
        w = max(2, round(width * n / top))
        share = f"{n / ok * 100:.1f}%" if ok else ""
        out.append(
            f'<text x="{left - 8}" y="{y + 16}" text-anchor="end">{e(label[:14])}</text>'
            f'<rect x="{left}" y="{y}" width="{w}" height="{bar_h}" rx="3"><title>{e(label)}: {n}</title></rect>'
            f'<text x="{left + w + 6}" y="{y + 16}" class="num">{n:,} · {share}</text>'
        )
    out.append("</svg>")
    return "".join(out)


_HEAD = """<!DOCTYPE html>
<html lang="zh-CN"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title>
<style>
body{font-family:"Noto Sans CJK SC","WenQuanYi Zen Hei","PingFang SC","Microsoft YaHei",sans-serif;margin:24px;
color:#1f2328;background:#fafafa}
h1{font-size:26px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 8px}.n{color:#666;font-weight:normal;font-size:14px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{background:#fff;border:1px solid #ddd;border-radius:8px;
padding:10px 16px;min-width:120px}.k{color:#666;font-size:13px}.v{font-size:22px;font-weight:bold}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:4px 10px;text-align:left;
font-size:14px;vertical-align:top}.fails td:first-child{word-break:break-all;max-width:520px}
.chart text{font-size:13px;fill:#1f2328}.chart rect{fill:#2f81f7}.chart .num{fill:#555}
.grid{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:120px;background:#fff;border:1px solid #ddd;
border-radius:6px;padding:4px}figure img,.noimg{width:112px;height:112px;object-fit:cover;display:block}
.noimg{display:flex;align-items:center;justify-content:center;background:#eee;color:#888;font-size:13px}
figcaption{font-size:12px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}.note{color:#666}
</style></head><body>
"""
