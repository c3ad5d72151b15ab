"""万物 wanwu: recognize what is in large numbers of images and name it in Chinese."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wanwu.config import RecognizeOptions
    from wanwu.engine import Engine
    from wanwu.errors import WanwuError
    from wanwu.pipeline import Recognizer
    from wanwu.records import Prediction, Record
    from wanwu.sources import InputItem
    from wanwu.spec import ModelSpec, PreprocessSpec

# Imported on first use, so that a decode worker importing wanwu.imaging pays only for Pillow and numpy.
_EXPORTS = {
    "Engine": "wanwu.engine",
    "InputItem": "wanwu.sources",
    "ModelSpec": "wanwu.spec",
    "Prediction": "wanwu.records",
    "PreprocessSpec": "wanwu.spec",
    "RecognizeOptions": "wanwu.config",
    "Recognizer": "wanwu.pipeline",
    "Record": "wanwu.records",
    "WanwuError": "wanwu.errors",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wanwu' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "Engine",
    "InputItem",
    "ModelSpec",
    "Prediction",
    "PreprocessSpec",
    "RecognizeOptions",
    "Recognizer",
    "Record",
    "WanwuError",
    "__version__",
]
