"""Model loaders: turn whatever the user passed as ``--model`` into a :class:`~wanwu.spec.ModelSpec`.

Loaders register in :data:`LOADERS` (a :class:`~wanwu.registry.Registry`; third parties add one through the
``wanwu.loaders`` entry-point group), tried in order; the first whose ``claims`` is true loads the model.
Built in: an ``.onnx`` file plus ``--labels``, a wanwu model folder (``wanwu.json`` manifest, written by
``wanwu convert``), and the seed model's ModelScope folder and ``modelscope:`` hub ids (lazy entries in
:mod:`wanwu.seed`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from wanwu.errors import ModelError, UsageError
from wanwu.labels import load_label_table, load_labels
from wanwu.registry import Registry
from wanwu.spec import ModelSpec, PreprocessSpec, file_fingerprint

MANIFEST = "wanwu.json"
MANIFEST_FORMAT = "wanwu-model/1"
# The 万物识别 general-domain model; used when --model is left out.
DEFAULT_MODEL = "modelscope:damo/cv_resnest101_general_recognition"


class ModelLoader(Protocol):
    @property
    def name(self) -> str: ...

    def claims(self, ref: str) -> bool: ...

    def load(self, ref: str, labels: Path | None) -> ModelSpec: ...


@dataclass(frozen=True)
class _FnLoader:
    name: str
    claims_fn: Callable[[str], bool]
    load_fn: Callable[[str, Path | None], ModelSpec]

    def claims(self, ref: str) -> bool:
        return self.claims_fn(ref)

    def load(self, ref: str, labels: Path | None) -> ModelSpec:
        return self.load_fn(ref, labels)


LOADERS: Registry[ModelLoader] = Registry("model loader", group="wanwu.loaders")


def register_loader(
    name: str, claims: Callable[[str], bool]
) -> Callable[[Callable[[str, Path | None], ModelSpec]], Callable[[str, Path | None], ModelSpec]]:
    def wrap(fn: Callable[[str, Path | None], ModelSpec]) -> Callable[[str, Path | None], ModelSpec]:
        LOADERS.register(name, _FnLoader(name, claims, fn))
        return fn

    return wrap


def resolve_model(
    ref: str | None, labels: Path | str | None = None, label_column: str | None = None, prompts: tuple[str, ...] = (),
) -> ModelSpec:
    """Find the loader for ``ref`` (``None`` = the default seed model) and build the spec.

    An explicit label file is read last, as a table when it is one (``label_column``; English names too).
    ``prompts``: templates such as ``"一张{}的照片"`` for an open-vocabulary (CLIP) model, replacing its defaults.
    """
    ref = ref or DEFAULT_MODEL
    labels = Path(labels) if labels is not None else None  # a str from a library caller
    for _, loader in LOADERS.items():
        if loader.claims(ref):
            spec = _with_scale_rule(loader.load(ref, labels))
            if labels is not None:
                from dataclasses import replace

                table = load_label_table(labels, label_column)
                spec = replace(spec, labels=table.labels, labels_en=table.english)
            elif label_column is not None:
                raise UsageError("--label-column needs --labels FILE.tsv|FILE.csv")
            if prompts:
                spec = _with_prompts(spec, prompts)
            return spec if spec.source else _with_source(spec, ref)
    raise UsageError(_unloadable(ref))


ACCEPTED_FORMS = (
    "an .onnx file (with --labels); a folder written by wanwu convert (with wanwu.json); a ModelScope folder "
    "(configuration.json, pytorch_model.pt, meta_info.txt); a Chinese-CLIP folder in Hugging Face layout "
    "(config.json with model_type chinese_clip); hf:OWNER/NAME[@REV]; or modelscope:OWNER/NAME[@REV]"
)


def _unloadable(ref: str) -> str:
    """Why ``ref`` is not a model: what it is, the forms that are, and an .onnx file inside it if there is one."""
    path = Path(ref)
    what = "is a folder with no model wanwu can load" if path.is_dir() else \
        "is not a file or folder" if not path.exists() else "is not a model file wanwu can load"
    message = f"model {ref!r} {what}. --model takes {ACCEPTED_FORMS}"
    inside = sorted([*path.glob("*.onnx"), *path.glob("*/*.onnx")])[:3] if path.is_dir() else []  # not a deep walk
    if inside:
        message += f". It holds {', '.join(str(p) for p in inside)}: use --model {inside[0]} --labels LABELS"
    return message


def _with_scale_rule(spec: ModelSpec) -> ModelSpec:
    """``spec`` with its JPEG scale rule settled, where its preprocessing leaves it open: the 1/8 scale for an
    ONNX model that quantizes its activations, no smaller than 1/4 for any other (see PreprocessSpec)."""
    if spec.preprocess.jpeg_eighth_scale is not None:
        return spec
    from dataclasses import replace

    eighth = False
    if spec.backend == "onnx":
        from wanwu.quantized import quantizes_activations

        eighth = quantizes_activations(spec.weights, spec.weights_fingerprint)
    return replace(spec, preprocess=replace(spec.preprocess, jpeg_eighth_scale=eighth))


def _with_prompts(spec: ModelSpec, prompts: tuple[str, ...]) -> ModelSpec:
    from dataclasses import replace

    if not spec.prompts:
        raise UsageError(f"--prompt is for zero-shot (CLIP) models; {spec.source or spec.name} has fixed classes")
    if not spec.arch:
        raise UsageError(f"{spec.source or spec.name} has its prompts built in: convert it again with --prompt")
    bad = [p for p in prompts if p.count("{}") != 1]
    if bad:
        raise UsageError(f"a prompt needs exactly one {{}} where the label goes, got {bad[0]!r}")
    return replace(spec, prompts=tuple(dict.fromkeys(prompts)))


def _with_source(spec: ModelSpec, ref: str) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, source=ref)


# --- built-in loaders ---------------------------------------------------------------------------------


@register_loader("onnx-file", lambda ref: ref.lower().endswith(".onnx"))
def _load_onnx_file(ref: str, labels: Path | None) -> ModelSpec:
    path = Path(ref)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if labels is None:
        raise UsageError(f"--labels is required with a bare ONNX file ({path.name}): one label per line")
    return ModelSpec(
        name=path.stem,
        backend="onnx",
        weights=path,
        labels=load_labels(labels),
        source=ref,
        weights_fingerprint=file_fingerprint(path),
    )


@register_loader("wanwu-folder", lambda ref: (Path(ref) / MANIFEST).is_file())
def _load_wanwu_folder(ref: str, labels: Path | None) -> ModelSpec:
    folder = Path(ref)
    manifest = read_manifest(folder)
    weights = folder / str(manifest["weights"])
    if not weights.is_file():
        raise ModelError(f"{folder / MANIFEST} names weights {weights.name!r}, which is missing")
    label_path = labels or folder / str(manifest["labels"])
    prompts = tuple(str(p) for p in manifest.get("prompts", ()))
    if prompts and labels is not None and load_labels(labels) != load_labels(folder / str(manifest["labels"])):
        raise UsageError(
            f"{folder} is a converted zero-shot model whose label list is built into {weights.name}: convert "
            "the original model again with --labels to use other labels"
        )
    try:
        preprocess = PreprocessSpec.from_dict(manifest.get("preprocess", {}))
    except TypeError as e:
        raise ModelError(f"{folder / MANIFEST}: bad preprocess section: {e}") from None
    output = manifest.get("output", "logits")
    if output not in ("logits", "probabilities"):
        raise ModelError(f"{folder / MANIFEST}: output must be 'logits' or 'probabilities', not {output!r}")
    backend = str(manifest.get("backend", "onnx"))
    return ModelSpec(
        name=str(manifest.get("name", folder.name)),
        backend=backend,
        weights=weights,
        labels=load_labels(label_path),
        preprocess=preprocess,
        output=output,
        source=ref,
        weights_fingerprint=file_fingerprint(weights),
        arch=str(manifest.get("arch", "resnest" if backend == "torch" else "")),
        logit_scale=float(manifest.get("logit_scale", 1.0)),
        prompts=prompts,
    )


LOADERS.lazy("modelscope-folder", "wanwu.seed.modelscope:FOLDER_LOADER")
LOADERS.lazy("modelscope-hub", "wanwu.seed.modelscope:HUB_LOADER")
LOADERS.lazy("hf-folder", "wanwu.hf:FOLDER_LOADER")
LOADERS.lazy("hf-hub", "wanwu.hf:HUB_LOADER")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ModelError(f"{path}: expected a JSON object with \"format\": \"{MANIFEST_FORMAT}\"")
    for key in ("weights", "labels"):
        if key not in data:
            raise ModelError(f"{path}: missing required field {key!r}")
    return data


def write_manifest(
    folder: Path, *, name: str, weights: str, labels: str, preprocess: PreprocessSpec, backend: str = "onnx",
    output: str = "logits", extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``wanwu.json`` so the folder loads with ``--model FOLDER``."""
    data: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "backend": backend,
        "weights": weights,
        "labels": labels,
        "output": output,
        # the JPEG scale rule is left to the weights written here, settled when the folder is loaded
        "preprocess": {k: v for k, v in asdict(preprocess).items() if k != "jpeg_eighth_scale"},
        **(extra or {}),
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path
