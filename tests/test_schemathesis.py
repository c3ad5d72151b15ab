"""Schemathesis (an external API fuzzer) against a live server: every operation, every phase (the stateful one
included: chains of calls following the links it infers, e.g. submit a job then read, cancel, delete it), every
check.

The run is bounded for CI: ``--max-examples 10`` per operation and phase, one worker, a fixed seed
(about 500 requests, ~20 s here). Zero failures means the OpenAPI document is complete and truthful (every
status documented, schema-valid bodies accepted, schema-invalid ones refused, Allow headers right,
authentication enforced) and no request causes a 5xx.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import uvicorn_in_thread
from wanwu.config import RecognizeOptions
from wanwu.service import ServeConfig, create_app

pytest.importorskip("schemathesis")
pytestmark = [pytest.mark.slow]


def test_schemathesis_finds_nothing(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    config = ServeConfig(
        model=str(tiny_model[0]), labels=tiny_model[1], options=RecognizeOptions(decoders=0, cache=False),
        queue=f"sqlite:///{tmp_path / 'jobs.sqlite3'}", api_keys=("test-key",),
    )
    cli = shutil.which("schemathesis") or shutil.which("st")
    command = [cli] if cli else [sys.executable, "-m", "schemathesis.cli"]
    with uvicorn_in_thread(create_app(config, cache=None)) as base:
        run = subprocess.run(
            [*command, "run", f"{base}/openapi.json", "--checks", "all", "-H", "X-API-Key: test-key",
             "--phases", "examples,coverage,fuzzing,stateful",  # stateful: sequences over the jobs' links
             "--max-examples", "10", "--workers", "1", "--seed", "1", "--no-color",
             "--report-dir", str(tmp_path / "reports")],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,
        )
    summary = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, summary
    selected = re.search(r"Selected: (\d+)/(\d+)", run.stdout)
    assert selected and selected.group(1) == selected.group(2), summary
    assert f"Tested: {selected.group(1)}" in run.stdout, summary  # every operation (jobs API, /v2 included)
    assert "✅ Stateful" in run.stdout and "API Links" in run.stdout, summary  # the stateful phase ran
    assert "No issues found" in run.stdout or "passed" in run.stdout, summary
