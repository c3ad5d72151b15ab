"""Shared fixtures. Real data comes from ../shared/data; bad data is made on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_tiny_onnx

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
