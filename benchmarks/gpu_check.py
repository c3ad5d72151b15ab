"""What only a GPU can tell: one script, under 8 minutes on one GPU, JSON out.

    python benchmarks/gpu_check.py --out gpu-results            # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --out /tmp/dry --dry-run     # anywhere: every section, tiny sizes, on a CPU

Sections (each writes its results into ``OUT/gpu_check.json`` as soon as it ends, so a timeout keeps what ran;
a section that fails records its error and the next one runs):

* ``environment``: Python, torch, CUDA, cuDNN, the GPU, compute capability, native bf16, onnxruntime and its
  providers, torchvision, pynvml/nvidia-smi;
* ``model_only``: a random full-size ResNeSt-101 at fp32/bf16/fp16 x batch 32/128, images/s of the host path
  (normalise on the CPU, unpinned copy, autocast over fp32 weights, every class's score back, top-k on the
  CPU: what wanwu did before) against the device path (:meth:`TorchBackend.infer_top`), and how far their top
  scores differ;
* ``end_to_end``: ``wanwu recognize --device cuda`` on generated JPEGs (web-size and 12 MP) in a subprocess,
  sampling GPU utilisation and memory (pynvml, else nvidia-smi) every 0.2 s; the web-size set again with
  ``--jpeg-decoder auto`` (nvJPEG), whether it fell back to the CPU, and its top-1 agreement with the CPU decode;
* ``oom``: in a subprocess whose memory is capped (``set_per_process_memory_fraction``) to 1.5x what batch 32
  needs, a batch of 256: the halving sequence, and whether the results equal a batch-32 run;
* ``onnxruntime``: the ResNeSt body exported to ONNX, the providers a session really got, and the stall of the
  first call at each new batch size with cuDNN's heuristic search (wanwu's) against onnxruntime's default
  exhaustive one.

``--dry-run`` runs all of it on a CPU with a tiny ResNeSt (what CI does, in seconds); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


@dataclass
class Plan:
    """The sizes of one run: the real ones on a GPU, tiny ones for ``--dry-run``."""

    device: str
    layers: tuple[int, int, int, int] = (3, 4, 23, 3)
    classes: int = 54092
    stem_width: int = 64
    base_planes: int = 64
    batches: tuple[int, ...] = (32, 128)
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    seconds_per_cell: float = 6.0
    warmups: int = 2
    min_rounds: int = 3
    e2e: tuple[tuple[str, int, int, int], ...] = (("web", 800, 600, 512), ("12mp", 4000, 3000, 96))
    e2e_gpu_decode: tuple[str, ...] = ("web",)  # the sets run again with --jpeg-decoder auto
    oom_batch: int = 256
    oom_reference: int = 32
    onnx_classes: int = 1000
    onnx_batches: tuple[int, ...] = (1, 7, 32, 33, 64)
    budget_s: float = 450.0
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def dry(cls) -> Plan:
        return cls(device="cpu", layers=(1, 1, 1, 1), classes=100, stem_width=8, base_planes=8, batches=(2,),
                   precisions=("fp32", "bf16", "fp16"), seconds_per_cell=0.0, warmups=1, min_rounds=1,
                   e2e=(("web", 320, 240, 2),), oom_batch=4, oom_reference=1, onnx_classes=10, onnx_batches=(1, 2),
                   budget_s=240.0)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


class Report:
    def __init__(self, folder: Path, plan: Plan, dry: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "gpu_check.json"
        self.data: dict[str, Any] = {"dry_run": dry, "plan": {k: v for k, v in asdict(plan).items()
                                                               if k != "started"}}

    def section(self, name: str, run: Callable[[], Any]) -> None:
        start = time.monotonic()
        try:
            result = run()
        except Exception as e:  # one failed section must not cost the others
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
        self.data[name] = {"seconds": round(time.monotonic() - start, 2), **(result or {})}
        self.path.write_text(json.dumps(self.data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        print(f"{name}: {self.data[name]['seconds']} s", file=sys.stderr)


# --- environment ----------------------------------------------------------------------------------------------


def environment(plan: Plan) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available(), "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "torchvision": _version("torchvision"), "pynvml": _version("pynvml"),
        "nvidia_smi": shutil.which("nvidia-smi"),
    }
    if torch.cuda.is_available():
        device = torch.device(plan.device)
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   memory_gb=round(props.total_memory / 2**30, 1),
                   bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
                   bf16_with_emulation=torch.cuda.is_bf16_supported())
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
    return env


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version({"pynvml": "nvidia-ml-py"}.get(module, module))
    except Exception:
        return None


# --- a random ResNeSt in ModelScope's layout -----------------------------------------------------------------


def model_folder(plan: Plan, root: Path) -> Path:
    import torch

    from wanwu.seed.resnest import ResNeSt, ResNeStConfig

    torch.manual_seed(0)
    config = ResNeStConfig(layers=plan.layers, num_classes=plan.classes, stem_width=plan.stem_width,
                           base_planes=plan.base_planes)
    model = ResNeSt(config).eval()
    folder = root / "cv_resnest101_general_recognition"
    folder.mkdir(exist_ok=True)
    (folder / "configuration.json").write_text(json.dumps(
        {"framework": "pytorch", "task": "general-recognition",
         "pipeline": {"type": "resnet101-general-recognition"}}), encoding="utf-8")
    torch.save(model.state_dict(), folder / "pytorch_model.pt")
    lines = [f"n{i:08d}\t类{i}\t{i}" for i in range(plan.classes)]
    (folder / "meta_info.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _crops(n: int, seed: int = 0) -> list[np.ndarray]:  # type: ignore[type-arg]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8) for _ in range(n)]


def _rate(fn: Callable[[], object], images: int, plan: Plan) -> float:
    for _ in range(plan.warmups):  # cuDNN's search, the allocator's growth
        fn()
    count, start = 0, time.perf_counter()
    while count < plan.min_rounds or time.perf_counter() - start < plan.seconds_per_cell:
        fn()
        count += 1
    return images * count / (time.perf_counter() - start)


# --- model only: the host path against the device path ------------------------------------------------------


def model_only(plan: Plan, folder: Path) -> dict[str, Any]:
    import torch

    from wanwu.backends import BackendOptions, create_backend
    from wanwu.engine import Engine
    from wanwu.models import resolve_model
    from wanwu.seed.checkpoint import load_resnest

    spec = resolve_model(str(folder))
    device = torch.device(plan.device)
    host_model = load_resnest(spec.weights, spec.num_classes).to(device).to(memory_format=torch.channels_last)
    cells = []
    for precision in plan.precisions:
        try:
            engine = Engine(spec, create_backend(spec, BackendOptions(device=plan.device, precision=precision)),
                            max(plan.batches))
        except Exception as e:
            cells.append({"precision": precision, "skipped": str(e)})
            continue
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        for batch in plan.batches:
            if plan.left() < 60:
                cells.append({"precision": precision, "batch": batch, "skipped": "time budget"})
                continue
            crops = _crops(batch)
            host = _host_path(host_model, spec, device, dtype)
            cell: dict[str, Any] = {"precision": precision, "batch": batch}
            cell["host_img_s"] = round(_rate(functools.partial(host, crops), batch, plan), 1)
            cell["device_img_s"] = round(_rate(functools.partial(engine.infer, crops), batch, plan), 1)
            cell["speedup"] = round(cell["device_img_s"] / cell["host_img_s"], 2)
            a, b = host(crops), engine.infer(crops)
            cell["top1_agree"] = float(np.mean([x.indices[0] == y.indices[0] for x, y in zip(a, b, strict=True)]))
            cell["max_top5_diff"] = float(max(np.abs(x.values[:5] - y.values[:5]).max() for x, y in zip(a, b,
                                                                                                       strict=True)))
            if device.type == "cuda":
                cell["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            cells.append(cell)
        engine.close()
    return {"cells": cells}


def _host_path(model: Any, spec: Any, device: Any, dtype: Any) -> Callable[[list[Any]], list[Any]]:
    """What wanwu did before the device path: float32 normalised on the CPU, an unpinned copy, autocast over
    fp32 weights, every class's score back in float32, top-k on the CPU."""
    import torch

    from wanwu.imaging import to_batch
    from wanwu.records import top_scores

    def run(crops: list[Any]) -> list[Any]:
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            x = torch.from_numpy(to_batch(crops, spec.preprocess)).to(device, non_blocking=True)
            out = model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
        return top_scores(out)

    return run


# --- end to end ----------------------------------------------------------------------------------------------


class GpuSampler:
    """GPU utilisation and memory every ``period`` seconds, from pynvml or nvidia-smi; nothing on a CPU."""

    def __init__(self, index: int, period: float = 0.2) -> None:
        self.index, self.period, self.samples = index, period, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._read = self._reader()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _reader(self) -> Callable[[], tuple[float, float]] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            return lambda: (float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                            pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30)
        except Exception:
            pass
        if shutil.which("nvidia-smi") is None:
            return None
        query = ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits"]

        def smi() -> tuple[float, float]:
            util, mem = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.split(",")[:2]
            return float(util), float(mem) / 1024

        return smi

    def _run(self) -> None:
        while self._read is not None and not self._stop.wait(self.period):
            with contextlib.suppress(Exception):
                self.samples.append(self._read())

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"gpu_samples": 0, "note": "no GPU sampler (no pynvml or nvidia-smi, or no GPU)"}
        util = [u for u, _ in self.samples]
        return {"gpu_samples": len(util), "gpu_util_mean": round(float(np.mean(util)), 1),
                "gpu_util_p10": round(float(np.percentile(util, 10)), 1), "gpu_util_max": max(util),
                "gpu_memory_gb_max": round(max(m for _, m in self.samples), 2)}


def _jpegs(folder: Path, width: int, height: int, count: int) -> None:
    """Photo-like JPEGs (smooth gradients plus noise: they compress, and decode, like photos)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(width * 7 + count)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xs / width * 200, ys / height * 200, (xs + ys) / (width + height) * 200], -1)
    for i in range(count):
        noise = rng.normal(0, 12, size=(height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)
        pixels = np.clip(np.roll(base, 37 * i, axis=1) + noise[:height, :width], 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", "JPEG", quality=90)


def end_to_end(plan: Plan, folder: Path, root: Path) -> dict[str, Any]:
    """Each image set with the CPU decode processes, and the sets a GPU JPEG decoder takes (web size: large
    photos stay on the CPU's reduced-size decode) again with ``--jpeg-decoder auto``."""
    from wanwu.gpudecode import FALLS_BACK

    runs = []
    index = int(plan.device.partition(":")[2] or 0)
    for name, width, height, count in plan.e2e:
        images = root / f"jpegs-{name}"
        for decoder in ("cpu", "auto") if name in plan.e2e_gpu_decode else ("cpu",):
            if plan.left() < 60:
                runs.append({"images": name, "jpeg_decoder": decoder, "skipped": "time budget"})
                continue
            if not images.exists():
                _jpegs(images, width, height, count)
            out = root / f"{name}-{decoder}.jsonl"
            cmd = [sys.executable, "-m", "wanwu", "recognize", str(images), "--model", str(folder), "--device",
                   plan.device, "--no-cache", "-q", "-f", "jsonl", "-o", str(out), "-b", "64",
                   "--jpeg-decoder", decoder]
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANWU_OFFLINE": "1"}
            with GpuSampler(index) as sampler:
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(30, plan.left()))
                elapsed = time.perf_counter() - start
            lines = out.read_text(encoding="utf-8").splitlines() if proc.returncode == 0 else []
            run: dict[str, Any] = {
                "images": name, "size": f"{width}x{height}", "count": count, "jpeg_decoder": decoder,
                "rc": proc.returncode, "seconds": round(elapsed, 2), "img_s": round(len(lines) / elapsed, 1),
                "ok": sum('"status": "ok"' in ln or '"status":"ok"' in ln for ln in lines),
                "stderr_tail": proc.stderr[-800:], **sampler.summary()}
            if decoder != "cpu":
                run["fell_back_to_cpu"] = FALLS_BACK in proc.stderr
                run["top1_agree_with_cpu_decode"] = _top1_agreement(root / f"{name}-cpu.jsonl", out)
            runs.append(run)
    return {"command": "wanwu recognize DIR --model FOLDER --device DEVICE --no-cache -b 64 --jpeg-decoder "
                       "cpu|auto", "runs": runs}


def _top1_agreement(a: Path, b: Path) -> float | None:
    """The share of inputs whose top label is the same in two records files (None when either is missing)."""
    if not a.exists() or not b.exists():
        return None

    def top1(path: Path) -> dict[str, str]:
        rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
        return {r["input"]: r["predictions"][0]["label"] for r in rows if r.get("status") == "ok"}

    first, second = top1(a), top1(b)
    shared = first.keys() & second.keys()
    return round(sum(first[k] == second[k] for k in shared) / len(shared), 4) if shared else None


# --- out of memory under a cap --------------------------------------------------------------------------------


def oom(plan: Plan, folder: Path) -> dict[str, Any]:
    """Runs :func:`oom_child` in a subprocess (the memory cap is per process)."""
    cmd = [sys.executable, __file__, "--oom-child", str(folder), "--device", plan.device,
           "--oom-batch", str(plan.oom_batch), "--oom-reference", str(plan.oom_reference)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, plan.left()))
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"error": f"rc {proc.returncode}", "stderr_tail": proc.stderr[-1500:]}
    return result


def oom_child(folder: Path, device_name: str, batch: int, reference: int) -> dict[str, Any]:
    import torch

    from wanwu.backends import BackendOptions
    from wanwu.engine import Engine
    from wanwu.errors import OutOfMemoryError

    device = torch.device(device_name)
    options = BackendOptions(device=device_name, precision="bf16" if device.type == "cuda" else "fp32")
    crops = _crops(batch, seed=3)
    small = Engine.load(str(folder), backend_options=options, max_batch=reference)
    want = small.infer(crops)
    result: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the cap counts what the allocator keeps cached
        peak = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(0.95, 1.5 * peak / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        result.update(peak_gb_at_reference=round(peak / 2**30, 2), memory_fraction=round(fraction, 4))
    engine = Engine(small.spec, small.backend, batch)
    if device.type != "cuda":  # a CPU has no cap to hit: refuse what is over the reference, as a cap would
        real = engine.backend.infer_top  # type: ignore[attr-defined]

        def capped(chunk: list[Any], n: int) -> Any:
            if len(chunk) > reference:
                raise OutOfMemoryError(f"simulated: batch {len(chunk)} over {reference}")
            return real(chunk, n)

        engine.backend.infer_top = capped  # type: ignore[attr-defined]
    sizes = _logged_batch_sizes()
    got = engine.infer(crops)
    same = all(np.array_equal(a.indices, b.indices) and np.allclose(a.values, b.values, rtol=1e-3, atol=1e-3)
               for a, b in zip(got, want, strict=True))
    result.update(halving=[batch, *sizes()], final_batch=engine.max_batch, equal_to_reference_run=same,
                  images=len(got))
    return result


def _logged_batch_sizes() -> Callable[[], list[int]]:
    """The batch sizes the engine retried with, read off its warnings."""
    seen: list[int] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retrying with batch" in record.getMessage():
                seen.append(int(record.getMessage().split("retrying with batch ")[1].split()[0]))

    logging.getLogger("wanwu").addHandler(Catch())
    return lambda: list(seen)


# --- onnxruntime ----------------------------------------------------------------------------------------------


def onnxruntime_check(plan: Plan, root: Path) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from wanwu.backends import BackendOptions, create_backend
    from wanwu.models import resolve_model
    from wanwu.seed.resnest import ResNeSt, ResNeStConfig

    path = root / "resnest.onnx"
    model = ResNeSt(ResNeStConfig(layers=plan.layers, num_classes=plan.onnx_classes, stem_width=plan.stem_width,
                                  base_planes=plan.base_planes)).eval()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    labels = root / "onnx_labels.txt"
    labels.write_text("\n".join(f"类{i}" for i in range(plan.onnx_classes)) + "\n", encoding="utf-8")
    device = plan.device if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    backend = create_backend(resolve_model(str(path), labels), BackendOptions(device=device))
    out: dict[str, Any] = {"requested_device": device, "wanwu_reported_device": backend.device,
                           "session_providers": backend._session.get_providers()}  # type: ignore[attr-defined]
    out["heuristic_first_call_s"] = _first_calls(backend.infer, plan.onnx_batches)
    if device != "cpu":
        exhaustive = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", {
            "device_id": int(device.partition(":")[2] or 0)}), "CPUExecutionProvider"])
        run = lambda b: exhaustive.run(None, {"input": b})  # noqa: E731
        out["exhaustive_first_call_s"] = _first_calls(run, plan.onnx_batches)
    backend.close()
    return out


def _first_calls(run: Callable[[Any], Any], batches: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Per batch size: the first call (any algorithm search) and the second (steady state), in seconds."""
    times = {}
    for b in batches:
        x = np.random.default_rng(b).normal(size=(b, 3, 224, 224)).astype(np.float32)
        first = time.perf_counter()
        run(x)
        second = time.perf_counter()
        run(x)
        end = time.perf_counter()
        times[str(b)] = {"first": round(second - first, 4), "second": round(end - second, 4)}
    return times


# --- main -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="wanwu-gpu-check-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 450; 240 dry)")
    parser.add_argument("--workdir", type=Path, help="keep models and JPEGs here instead of a temporary folder")
    parser.add_argument("--oom-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--oom-batch", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--oom-reference", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.oom_child:
        print(json.dumps(oom_child(args.oom_child, args.device, args.oom_batch, args.oom_reference)))
        return 0
    if args.out is None:
        parser.error("--out is required")
    plan = Plan.dry() if args.dry_run else Plan(device=args.device)
    if args.budget:
        plan.budget_s = args.budget
    report = Report(args.out, plan, args.dry_run)
    report.section("environment", lambda: environment(plan))
    if not args.dry_run and not report.data["environment"].get("cuda_available"):
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    with _workdir(args.workdir) as root:
        folder = model_folder(plan, root)
        report.section("model_only", lambda: model_only(plan, folder))
        report.section("end_to_end", lambda: end_to_end(plan, folder, root))
        report.section("oom", lambda: oom(plan, folder))
        report.section("onnxruntime", lambda: onnxruntime_check(plan, root))
    print(report.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
