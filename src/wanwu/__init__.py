"""万物 wanwu: recognize what is in large numbers of images and name it in Chinese."""

from __future__ import annotations

__version__ = "0.1.0"

from wanwu.config import RecognizeOptions
from wanwu.engine import Engine
from wanwu.errors import WanwuError
from wanwu.pipeline import Recognizer
from wanwu.records import Prediction, Record
from wanwu.sources import InputItem
from wanwu.spec import ModelSpec, PreprocessSpec

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
