"""benchmarks/gpu_check.py, the script that measures what only a GPU can: its dry run on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.extra("torch")
def test_gpu_check_dry_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    assert report["dry_run"] is True
    errors = {name: section["error"] for name, section in report.items()
              if isinstance(section, dict) and "error" in section}
    assert errors == {}
    assert report["environment"]["torch"] and "onnxruntime_providers" in report["environment"]
    cells = report["model_only"]["cells"]
    assert {c["precision"] for c in cells if "device_img_s" in c} == {"fp32", "bf16"}
    assert all(c["top1_agree"] == 1.0 for c in cells if c.get("precision") == "fp32" and "top1_agree" in c)
    runs = report["end_to_end"]["runs"]
    assert [(r["jpeg_decoder"], r["ok"]) for r in runs] == [("cpu", 2), ("auto", 2)]  # every image answered
    assert runs[1]["fell_back_to_cpu"] is True and runs[1]["top1_agree_with_cpu_decode"] == 1.0  # no GPU here
    assert report["oom"]["halving"] == [4, 2, 1] and report["oom"]["equal_to_reference_run"] is True
    assert report["onnxruntime"]["wanwu_reported_device"] == "cpu"
