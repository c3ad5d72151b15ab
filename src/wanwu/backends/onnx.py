"""ONNX Runtime backend: CPU by default, CUDA when asked for and available."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # here, not in the constructor: Engine.load imports it before loading the model

from wanwu.backends import (
    BackendOptions,
    default_cpu_streams,
    default_threads,
    is_out_of_memory,
    numerics_of,
    parse_cuda_index,
)
from wanwu.embeddings import EMBEDDING_OUTPUT, EmbeddingSource, expose_output
from wanwu.errors import ModelError, OutOfMemoryError, UsageError
from wanwu.spec import ModelSpec

log = logging.getLogger("wanwu")


class OnnxBackend:
    def __init__(self, spec: ModelSpec, options: BackendOptions) -> None:
        providers = _providers(options.device, ort.get_available_providers())
        if providers[0] != CPU and _is_quantized(spec):
            log.info("%s is an int8 model: it runs on the CPU provider (CUDA's int8 coverage is partial)", spec.name)
            providers = [CPU]
        on_cpu = providers[0] == CPU
        self._streams_given = options.streams > 0
        self._streams = options.streams or (default_cpu_streams() if on_cpu else 1)
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads or max(1, default_threads() // self._streams)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Decoders share the cores: don't let idle ORT threads spin and steal their time.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        model: str | bytes = str(spec.weights)
        self.int8_exact = False
        self.embedding_source: EmbeddingSource | None = None
        if options.embeddings:
            model, self.embedding_source, self.int8_exact = _with_embedding(spec, options, on_cpu)
        elif on_cpu and options.int8 != "native":
            model, self.int8_exact = _maybe_exact_int8(spec, options.int8)
        try:
            self._session = ort.InferenceSession(model, so, providers=providers)
        except Exception as e:  # ORT raises its own untyped exceptions for bad files
            raise ModelError(f"cannot load ONNX model {spec.weights}: {e}") from None
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1:
            raise ModelError(f"{spec.weights}: expected one image input, found {len(inputs)}")
        self._input = inputs[0].name
        self._output = outputs[0].name
        self._outputs = [self._output]
        if self.embedding_source is not None and not self.embedding_source.fallback:
            self._outputs.append(EMBEDDING_OUTPUT)
        self._check_shapes(spec, inputs[0].shape, outputs[0].shape)
        self._device = self._actual_device(providers)

    def _actual_device(self, requested: list[Provider]) -> str:
        """The device the session really runs on: onnxruntime falls back to the CPU silently when CUDA's
        libraries (cuDNN, cuBLAS) cannot be loaded, and ``get_providers()`` is the only sign of it."""
        actual = self._session.get_providers()
        if actual and actual[0] == CUDA:
            options = requested[0][1] if isinstance(requested[0], tuple) else {}
            return f"cuda:{options.get('device_id', 0)}"
        if requested[0] != CPU:
            log.warning("onnxruntime could not start its CUDA provider (CUDA or cuDNN libraries missing?): "
                        "running on the CPU")
            if not self._streams_given:
                self._streams = default_cpu_streams()
        return "cpu"

    @staticmethod
    def _check_shapes(spec: ModelSpec, in_shape: list[Any], out_shape: list[Any]) -> None:
        classes = out_shape[-1] if out_shape else None
        if isinstance(classes, int) and classes != spec.num_classes:
            raise ModelError(
                f"{spec.weights} outputs {classes} classes but the label file has {spec.num_classes} lines"
            )
        crop = spec.preprocess.crop_size
        spatial = in_shape[2:4] if spec.preprocess.layout == "NCHW" else in_shape[1:3]
        if len(in_shape) == 4 and all(isinstance(s, int) for s in spatial) and list(spatial) != [crop, crop]:
            raise ModelError(f"{spec.weights} expects {spatial} inputs but preprocessing crops to {crop}")

    @property
    def device(self) -> str:
        return self._device

    @property
    def streams(self) -> int:
        return self._streams  # InferenceSession.run is thread-safe

    @property
    def numerics(self) -> dict[str, str]:
        return numerics_of("cpu" if self._device == "cpu" else "cuda", "fp32")

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self._run(batch, [self._output])[0]

    def infer_embedded(
        self, batch: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Scores and embeddings (flattened, not normalised) in one run of the graph."""
        outs = self._run(batch, self._outputs)
        embedded = outs[-1].reshape(len(batch), -1)
        return outs[0], embedded

    def _run(self, batch: npt.NDArray[np.float32], names: list[str]) -> list[npt.NDArray[np.float32]]:
        message = None
        try:
            outs = self._session.run(names, {self._input: batch})
            return [np.asarray(out, dtype=np.float32) for out in outs]
        except Exception as e:  # onnxruntime's errors are untyped: read the message
            if not is_out_of_memory(e):
                raise  # "illegal memory access" and other faults are not retried
            message = str(e)
        raise OutOfMemoryError(f"out of memory on {self._device} for a batch of {len(batch)}: {message}")

    def close(self) -> None:
        del self._session


def _with_embedding(spec: ModelSpec, options: BackendOptions, on_cpu: bool) -> tuple[bytes, EmbeddingSource, bool]:
    """The model with its embedding tensor as a second output (and, where needed, its exact int8 rewrite)."""
    import onnx

    from wanwu.backends.int8 import cpu_has_vnni, emulate_qoperator, is_qoperator

    try:
        proto = onnx.load(str(spec.weights))
    except Exception as e:
        raise ModelError(f"cannot read ONNX model {spec.weights}: {e}") from None
    proto, source = expose_output(proto, options.embedding_output)
    exact = (
        on_cpu and is_qoperator(proto)
        and (options.int8 == "exact" or (options.int8 == "auto" and not cpu_has_vnni()))
    )
    if exact:
        proto = emulate_qoperator(proto)
    log.info("embeddings: %s", source.describe())
    data: bytes = proto.SerializeToString()
    return data, source, exact


def _maybe_exact_int8(spec: ModelSpec, mode: str) -> tuple[str | bytes, bool]:
    """The model to load: ``spec.weights`` as it is, or (int8 on a CPU without VNNI) its exact rewrite.

    The rewrite is kept under ``$WANWU_HOME/int8`` by the weights' fingerprint, so later runs load it
    directly (without importing ``onnx``); a model found not to need it leaves a marker for the same reason.
    """
    from wanwu.backends.int8 import cpu_has_vnni, emulate_qoperator, is_qoperator

    if mode not in ("auto", "exact"):
        raise UsageError(f"--int8 must be auto, exact or native, not {mode!r}")
    if mode == "auto" and cpu_has_vnni():
        return str(spec.weights), False
    rewritten, plain = _int8_cache(spec)
    if rewritten is not None and rewritten.is_file():
        return str(rewritten), True
    if plain is not None and plain.is_file():
        return str(spec.weights), False
    import onnx

    try:
        proto = onnx.load(str(spec.weights))
    except Exception as e:
        raise ModelError(f"cannot read ONNX model {spec.weights}: {e}") from None
    if not is_qoperator(proto):
        _store(plain, b"")
        return str(spec.weights), False
    log.info("int8 model on a CPU without VNNI: using exact integer kernels (--int8 native to skip)")
    data: bytes = emulate_qoperator(proto).SerializeToString()
    _store(rewritten, data)
    return data, True


INT8_REWRITE = "u8w1"  # bump when emulate_qoperator changes what it writes


def _int8_cache(spec: ModelSpec) -> tuple[Path | None, Path | None]:
    if not spec.weights_fingerprint:
        return None, None
    from wanwu.paths import wanwu_home

    stem = wanwu_home() / "int8" / f"{spec.weights_fingerprint}-{INT8_REWRITE}"
    return stem.with_suffix(".onnx"), stem.with_suffix(".plain")


def _store(path: Path | None, data: bytes) -> None:
    """Write atomically, or not at all: the cache only saves time."""
    if path is None:
        return
    from wanwu.paths import keep

    if not keep(path, data):
        log.debug("cannot keep the int8 rewrite at %s", path)


CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
Provider = str | tuple[str, dict[str, Any]]


def _providers(device: str, available: list[str]) -> list[Provider]:
    """The providers for ``--device``: ``cuda:N`` keeps N (``device_id``). cuDNN's convolution algorithm is
    chosen by heuristic rather than by timing every candidate (``EXHAUSTIVE``, onnxruntime's default), which
    stalls a session for seconds at every new batch shape."""
    device = (device or "auto").strip().lower()
    if device == "cpu" or (device == "auto" and CUDA not in available):
        return [CPU]
    index = None if device == "auto" else parse_cuda_index(device)
    if CUDA not in available:
        raise UsageError(
            f"--device {device}: this onnxruntime has no CUDA provider. The GPU wheel replaces the CPU one (both "
            "install the same files, so have only one): pip uninstall -y onnxruntime onnxruntime-gpu && "
            "pip install onnxruntime-gpu"
        )
    cuda_options = {"device_id": index or 0, "cudnn_conv_algo_search": "HEURISTIC"}
    return [(CUDA, cuda_options), CPU]


def _is_quantized(spec: ModelSpec) -> bool:
    """Whether the model computes in int8 (QOperator or QDQ): read only when a GPU provider would be used."""
    from wanwu.quantized import ACTIVATION_INT8_OPS

    int8_ops = {*ACTIVATION_INT8_OPS, "DequantizeLinear"}
    try:
        import onnx

        graph = onnx.load(str(spec.weights), load_external_data=False).graph
    except Exception:  # not readable here: the session's own load reports it
        return False
    return any(node.op_type in int8_ops for node in graph.node)


def create(spec: ModelSpec, options: BackendOptions) -> OnnxBackend:
    return OnnxBackend(spec, options)
