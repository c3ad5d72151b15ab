"""Shared fixtures. Real data comes from ../shared/data; bad data is made on the fly."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import make_tiny_onnx

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The CLI speaks the locale's language; tests expect English unless they choose (before wanwu.cli is imported).
os.environ["WANWU_LANG"] = "en"

# Tests of optional extras. The README's quickstart installs only the ONNX path (and pytest): there these tests
# are skipped with the extra they need, not failed; in CI (.ci/run installs .[all,dev]) a missing extra fails them.
EXTRA_PROBES = {
    "torch": "torch", "clip": "transformers", "server": "fastapi", "queue": "redis", "dev": "playwright",
    "parquet": "pyarrow", "s3": "s3fs", "heif": "pillow_heif", "cluster": "ray", "search": "faiss",
}
# The top-level packages each extra brings (what a test module may import at the top), for the skip's reason.
EXTRA_PACKAGES = {
    "torch": ("torch", "onnxscript"), "clip": ("transformers", "safetensors"),
    "server": ("fastapi", "starlette", "uvicorn", "multipart", "python_multipart", "prometheus_client",
               "fastapi_offline"),
    "queue": ("redis",), "parquet": ("pyarrow",), "s3": ("s3fs", "fsspec", "botocore", "aiobotocore"),
    "heif": ("pillow_heif",), "cluster": ("ray",), "search": ("faiss", "usearch"),
    "dev": ("playwright", "moto", "schemathesis", "aiohttp"),
}
_EXTRA_OF_PACKAGE = {package: extra for extra, packages in EXTRA_PACKAGES.items() for package in packages}
MODULE_EXTRAS = {  # modules whose every test needs these extras (modules that import one at the top are found)
    "test_convert.py": ("torch",), "test_hub.py": ("torch",), "test_seed_model.py": ("torch",),
    "test_device_path.py": ("torch",),
    "test_clip.py": ("clip",),
    "test_service.py": ("server",), "test_web.py": ("server", "dev"), "test_jobs_redis.py": ("queue",),
    "test_parquet.py": ("parquet",), "test_s3.py": ("s3", "dev"), "test_report.py": ("server", "dev", "parquet"),
    "test_ray.py": ("cluster",), "test_docs_page.py": ("server", "dev"), "test_schemathesis.py": ("server", "dev"),
}


def _missing(extra: str) -> bool:
    return importlib.util.find_spec(EXTRA_PROBES[extra]) is None


class _NeedsExtra(pytest.Module):
    """A test module that cannot be imported because an extra is absent: one skip that names the extra."""

    reason = ""

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        pytest.skip(self.reason, allow_module_level=True)


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Outside CI, a test module that needs an absent extra is skipped with that reason (in CI it fails)."""
    if os.environ.get("CI") or module_path.parent != Path(__file__).parent:
        return None
    missing = [e for e in MODULE_EXTRAS.get(module_path.name, ()) if _missing(e)]
    reason = (f"{module_path.name} needs the {', '.join(missing)} extra(s): pip install -e '.[{','.join(missing)}]'"
              if missing else "")
    if not reason:
        try:
            importlib.import_module(f"tests.{module_path.stem}")
        except pytest.skip.Exception:
            return None  # the module skips itself (importorskip): pytest's own import reports it
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top not in _EXTRA_OF_PACKAGE:
                return None  # not an extra's package: pytest's own import reports it
            extra = _EXTRA_OF_PACKAGE[top]
            reason = f"{module_path.name} needs the {extra} extra ({top} is absent): pip install -e '.[{extra}]'"
    if not reason:
        return None
    module = _NeedsExtra.from_parent(parent, path=module_path)
    module.reason = reason
    return module


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


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """The CLI configures the root logger on the stderr of the moment, which CliRunner closes after its call: the
    next test's warnings would hit a closed stream ("--- Logging error ---"). Each test leaves logging as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
