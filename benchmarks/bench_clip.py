"""Chinese-CLIP image-tower throughput: PyTorch vs ONNX Runtime, side by side in one run.

Builds the full-size ViT-B/16 Chinese-CLIP architecture (chinese-clip-vit-base-patch16: ViT-B/16 image tower,
12-layer BERT-base text tower with the 21,128-token Chinese vocabulary size, 512-d projection) with random
weights (the architecture, not the weights, decides speed), zero-shot over the 1,000 Chinese ImageNet labels of
../shared/data (or N generated labels), exports it with ``wanwu convert`` (dynamic batch axis, parity-checked)
into a temporary folder, then times batches alternating torch and ORT rounds and reports medians, so both see
the same machine load. Also reports the one-off text-embedding time and the cached reload.

    python benchmarks/bench_clip.py            # several minutes on a small CPU
    python benchmarks/bench_clip.py --quick    # batches 1 and 8, fewer rounds

Options: --batches 1,8,32 --rounds N --threads N --labels N --layers N (smaller for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.clip_helpers


from tests.clip_helpers import make_clip_folder

from _common import torch_vs_onnx
from wanwu.backends import BackendOptions, create_backend, default_threads
from wanwu.convert import ConvertOptions, convert
from wanwu.hf import DEFAULT_PROMPTS
from wanwu.models import resolve_model

SHARED_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "labels" / "imagenet_zh.txt"


def make_folder(root: Path, labels: list[str], layers: int) -> Path:
    """The ViT-B/16 Chinese-CLIP architecture (text tower with the real 21,128-token vocabulary size), random
    weights: speed depends on the architecture, not on the weights."""
    return make_clip_folder(
        root / "chinese-clip-vit-b16-random", extra_text="".join(labels), logit_scale=100.0,
        text_config={"vocab_size": 21128, "num_hidden_layers": layers, "max_position_embeddings": 512},
        vision_config={"patch_size": 16, "num_hidden_layers": layers, "image_size": 224},
        projection_dim=512,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--labels", type=int, default=0, help="generated labels instead of the 1,000 ImageNet ones")
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    batches = [1, 8] if args.quick else [int(b) for b in args.batches.split(",")]
    rounds = 3 if args.quick else args.rounds
    if args.labels or not SHARED_LABELS.is_file():
        labels = [f"类别{i}" for i in range(args.labels or 1000)]
    else:
        labels = [line.strip() for line in SHARED_LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as tmp:
        root = Path(tmp)
        os.environ["WANWU_HOME"] = str(root / "home")
        (root / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        t0 = time.perf_counter()
        folder = make_folder(root, labels, args.layers)
        built = time.perf_counter() - t0
        print(f"built random ViT-B/16 Chinese-CLIP ({args.layers} layers per tower) in {built:.0f} s; "
              f"{len(labels)} labels x {len(DEFAULT_PROMPTS)} prompts")
        spec = resolve_model(str(folder), root / "labels.txt")
        options = BackendOptions(device="cpu", threads=args.threads)
        t0 = time.perf_counter()
        torch_backend = create_backend(spec, options)  # computes the text embeddings
        first = time.perf_counter() - t0
        torch_backend.close()
        t0 = time.perf_counter()
        torch_backend = create_backend(spec, options)  # from $WANWU_HOME/clip-text
        print(f"model + text embeddings: {first:.1f} s the first time, {time.perf_counter() - t0:.1f} s cached")
        t0 = time.perf_counter()
        report = convert(ConvertOptions(model=str(folder), labels=root / "labels.txt", output=root / "onnx"))
        print(f"wanwu convert: {time.perf_counter() - t0:.0f} s, {report.onnx_bytes / 1e6:.0f} MB, parity max "
              f"|Δlogit| {report.max_abs_diff:.2g} on {report.images} images")
        ort_backend = create_backend(report.spec, options)
        threads = options.threads or default_threads()
        print(f"\nimage tower + label projection, CPU, {threads} threads, {rounds} rounds per batch (median)")
        torch_vs_onnx(torch_backend, ort_backend, batches, rounds)


if __name__ == "__main__":
    main()
