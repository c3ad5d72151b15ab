"""Seed model throughput: PyTorch vs ONNX Runtime on this CPU, and (when there is one) CUDA.

Builds the full-size ResNeSt-101 (54,092 classes, random weights; the architecture, not the weights,
decides speed), exports it to ONNX in a temporary folder (~630 MB), then times batches of 1, 8 and 32,
alternating torch and ORT rounds and reporting medians, so both see the same machine load.

    python benchmarks/bench_seed.py            # a few minutes on a small CPU
    python benchmarks/bench_seed.py --quick    # batches 1 and 8, fewer rounds
    python benchmarks/bench_seed.py --cuda     # also CUDA: bf16 channels-last, and end to end with decoding

Options: --batches 1,8,32 --rounds N --threads N --classes N --layers 3,4,23,3 (smaller for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from _common import time_call, torch_vs_onnx
from wanwu.backends import BackendOptions, create_backend, default_threads
from wanwu.convert import ConvertOptions, convert
from wanwu.seed.resnest import GENERAL_CLASSES, ResNeSt, ResNeStConfig


def _model_folder(root: Path, config: ResNeStConfig) -> Path:
    torch.manual_seed(0)
    model = ResNeSt(config).eval()
    folder = root / "seed"
    folder.mkdir()
    (folder / "configuration.json").write_text('{"framework": "pytorch", "task": "general-recognition"}')
    torch.save(model.state_dict(), folder / "pytorch_model.pt")
    lines = [f"n{i}\t类{i}" for i in range(config.num_classes)]
    (folder / "meta_info.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def cpu_section(folder: Path, onnx_dir: Path, args: argparse.Namespace) -> None:
    from wanwu.models import resolve_model

    options = BackendOptions(device="cpu", threads=args.threads)
    torch_backend = create_backend(resolve_model(str(folder)), options)
    ort_backend = create_backend(resolve_model(str(onnx_dir)), options)
    threads = options.threads or default_threads()
    print(f"\nCPU, {threads} threads, {args.rounds} rounds per batch size (median)")
    torch_vs_onnx(torch_backend, ort_backend, args.batches, args.rounds)


def cuda_section(folder: Path, args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("\nCUDA: not available, skipped")
        return
    from wanwu.models import resolve_model

    spec = resolve_model(str(folder))
    print(f"\nCUDA ({torch.cuda.get_device_name()}), channels-last, {args.rounds} rounds (median)")
    print(f"{'precision':>9} {'batch':>6} {'img/s':>10}")
    for precision in ("fp32", "bf16"):
        backend = create_backend(spec, BackendOptions(device="cuda", precision=precision))
        for b in args.cuda_batches:
            batch = np.random.default_rng(0).normal(size=(b, 3, 224, 224)).astype(np.float32)
            backend.infer(batch)
            times = [time_call(backend.infer, batch) for _ in range(args.rounds)]
            print(f"{precision:>9} {b:>6} {b / statistics.median(times):>10.1f}")
        backend.close()
    _end_to_end(spec, args)


def _end_to_end(spec: object, args: argparse.Namespace) -> None:
    """Decode real JPEGs with the worker pool and feed the GPU; report img/s and the GPU-wait fraction."""
    import io

    from PIL import Image

    from wanwu.config import RecognizeOptions
    from wanwu.engine import Engine
    from wanwu.pipeline import Recognizer
    from wanwu.sources import InputItem

    rng = np.random.default_rng(1)
    blobs = []
    for i in range(args.e2e_images):
        arr = rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        blobs.append(InputItem.from_bytes(f"img{i}.jpg", buf.getvalue()))
    gpu = BackendOptions(device="cuda", precision="bf16")
    options = RecognizeOptions(batch_size=64, cache=False, backend=gpu)
    engine = Engine.load(spec, backend_options=options.backend, max_batch=64)  # type: ignore[arg-type]
    busy = 0.0
    real_infer = engine.backend.infer_top  # type: ignore[attr-defined]  # the device path the engine takes

    def timed(crops: list[np.ndarray], n: int) -> object:  # type: ignore[type-arg]
        nonlocal busy
        start = time.perf_counter()
        out = real_infer(crops, n)
        busy += time.perf_counter() - start
        return out

    engine.backend.infer_top = timed  # type: ignore[attr-defined]
    with Recognizer(spec, options=options, engine=engine, cache=None) as rec:  # type: ignore[arg-type]
        list(rec.recognize(blobs[:64]))  # warm up the decode pool
        busy = 0.0
        start = time.perf_counter()
        n = sum(1 for _ in rec.recognize(blobs))
        elapsed = time.perf_counter() - start
    print(f"\nCUDA end to end (decode 640x480 JPEGs with {options.decode_processes} workers, bf16, batch 64): "
          f"{n / elapsed:.1f} img/s; GPU busy {busy / elapsed:.0%} of the time, "
          f"waiting {1 - busy / elapsed:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8, 3 rounds")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0 = wanwu's default (every core)")
    parser.add_argument("--classes", type=int, default=GENERAL_CLASSES)
    parser.add_argument("--layers", default="3,4,23,3")
    parser.add_argument("--cuda", action="store_true", help="also run the CUDA section (when available)")
    parser.add_argument("--cuda-batches", default="32,128")
    parser.add_argument("--e2e-images", type=int, default=1024)
    args = parser.parse_args()
    args.batches = [1, 8] if args.quick else [int(b) for b in args.batches.split(",")]
    args.rounds = 3 if args.quick else args.rounds
    args.cuda_batches = [int(b) for b in args.cuda_batches.split(",")]
    layers = tuple(int(n) for n in args.layers.split(","))
    if len(layers) != 4:
        parser.error("--layers needs four numbers")
    config = ResNeStConfig(layers=layers, num_classes=args.classes)  # type: ignore[arg-type]
    print(f"ResNeSt layers {layers}, {args.classes} classes, torch {torch.__version__}, "
          f"cpus {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="wanwu-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        folder = _model_folder(root, config)
        report = convert(ConvertOptions(model=str(folder), output=root / "onnx"))
        print(f"export: {time.perf_counter() - start:.0f}s, model.onnx {report.onnx_bytes / 1e6:.0f} MB, "
              f"parity max |Δlogit| {report.max_abs_diff:.2g}")
        cpu_section(folder, root / "onnx", args)
        if args.cuda:
            cuda_section(folder, args)


if __name__ == "__main__":
    main()
