"""Shared fixtures. Real data comes from ../shared/data; bad data is made on the fly."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.helpers import make_tiny_onnx

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The CLI speaks the locale's language; tests expect English unless they choose (before wanwu.cli is imported).
os.environ["WANWU_LANG"] = "en"

# Tests of optional extras. The README's quickstart installs only the ONNX path (and pytest): there these tests
# are skipped, not failed; in CI (.ci/run installs .[all,dev]) a missing extra fails them.
EXTRA_PROBES = {
    "torch": "torch", "clip": "transformers", "server": "fastapi", "queue": "redis", "dev": "playwright",
    "parquet": "pyarrow", "s3": "s3fs", "heif": "pillow_heif", "cluster": "ray",
}
MODULE_EXTRAS = {  # modules that import an extra at the top
    "test_convert.py": ("torch",), "test_hub.py": ("torch",), "test_seed_model.py": ("torch",),
    "test_device_path.py": ("torch",),
    "test_clip.py": ("clip",),
    "test_service.py": ("server",), "test_web.py": ("server", "dev"), "test_jobs_redis.py": ("queue",),
    "test_parquet.py": ("parquet",), "test_s3.py": ("s3", "dev"), "test_report.py": ("server", "dev", "parquet"),
    "test_ray.py": ("cluster",),
}


def _missing(extra: str) -> bool:
    return importlib.util.find_spec(EXTRA_PROBES[extra]) is None


collect_ignore = [] if os.environ.get("CI") else [
    name for name, extras in MODULE_EXTRAS.items() if any(_missing(e) for e in extras)
]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.extra("server")``: skip (fail in CI) when that extra is not installed."""
    for mark in item.iter_markers("extra"):
        missing = [e for e in mark.args if _missing(e)]
        if missing and os.environ.get("CI"):
            pytest.fail(f"CI needs the {', '.join(missing)} extra(s) installed")
        if missing:
            pytest.skip(f"needs the {', '.join(missing)} extra(s): pip install -e '.[{','.join(missing)}]'")


def _require_shared() -> Path:
    if SHARED.is_dir():
        return SHARED
    if os.environ.get("CI"):
        pytest.fail(f"CI needs the shared test data at {SHARED}, and it is missing")
    pytest.skip(f"shared test data not found at {SHARED} (it sits beside the checkout in CI)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: fails in CI when missing, skips elsewhere."""
    return _require_shared()


@pytest.fixture(scope="session")
def mobilenet(shared_data: Path) -> tuple[Path, Path]:
    """(model.onnx, labels.txt) of the real ImageNet int8 MobileNetV2 with Chinese labels."""
    return shared_data / "models" / "mobilenetv2-12-int8.onnx", shared_data / "labels" / "imagenet_zh.txt"


@pytest.fixture(scope="session")
def photos(shared_data: Path) -> Path:
    return shared_data / "images" / "imagenet-sample-images"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny deterministic ONNX classifier (10 classes) and its labels: fast, needs no shared data."""
    folder = tmp_path_factory.mktemp("tiny")
    return make_tiny_onnx(folder)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own WANWU_HOME (cache, queue, downloads) and never touches the network."""
    monkeypatch.setenv("WANWU_HOME", str(tmp_path / "wanwu-home"))
    monkeypatch.setenv("WANWU_OFFLINE", "1")
