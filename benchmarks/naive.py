"""The naive baseline: what a user writes first. Sequential full-resolution decode, then batches of 32.

Usage: python benchmarks/naive.py MODEL.onnx LABELS.txt FOLDER [--exact-int8]
``--exact-int8`` gives it the same inference graph wanwu uses on CPUs without VNNI, so that the
comparison measures the pipeline, not the kernels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def preprocess(path: Path) -> np.ndarray:
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = img.size
    nw, nh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = round((nw - 224) / 2), round((nh - 224) / 2)
    arr = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    return ((arr - MEAN) / STD).transpose(2, 0, 1)


def main() -> None:
    model, labels_path, folder = sys.argv[1:4]
    labels = Path(labels_path).read_text(encoding="utf-8").splitlines()
    source: str | bytes = model
    if "--exact-int8" in sys.argv:
        import onnx

        from wanwu.backends.int8 import emulate_qoperator

        source = emulate_qoperator(onnx.load(model)).SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    out = sys.stdout
    for start in range(0, len(files), 32):
        chunk = files[start : start + 32]
        batch = np.stack([preprocess(p) for p in chunk])
        logits = session.run(None, {"input": batch})[0]
        for path, row in zip(chunk, logits, strict=True):
            top = np.argsort(-row)[:5]
            out.write(json.dumps({"input": str(path), "top": [labels[i] for i in top]}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
