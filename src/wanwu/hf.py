"""Hugging Face model folders and ``hf:`` ids (Chinese-CLIP), as :class:`~wanwu.spec.ModelSpec`.

Two model loaders, registered as lazy entries by :mod:`wanwu.models` (neither imports torch):

* ``hf-folder``: a folder in Hugging Face layout whose ``config.json`` says ``model_type: chinese_clip``
  (weights, tokenizer files, ``preprocessor_config.json``);
* ``hf-hub``: ``hf:OWNER/NAME[@REVISION]``, downloaded once into ``$WANWU_HOME/models/hf`` from
  ``$WANWU_HF_ENDPOINT`` (default ``https://huggingface.co``; a mirror such as ``https://hf-mirror.com``).

The spec's preprocessing follows the checkpoint's ``preprocessor_config.json`` with
``ChineseCLIPImageProcessor`` semantics: shortest edge to ``size`` (long side truncated), its ``resample``
filter, center crop with floored offsets, ``rescale_factor``, ``image_mean``/``image_std``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanwu.errors import DownloadError, ModelError, UsageError
from wanwu.labels import load_labels
from wanwu.paths import wanwu_home
from wanwu.spec import Interpolation, ModelSpec, PreprocessSpec, file_fingerprint

PREFIX = "hf:"
DEFAULT_ENDPOINT = "https://huggingface.co"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")
CONFIG_FILES = ("config.json", "preprocessor_config.json")
REQUIRED_FILES = (*CONFIG_FILES, "vocab.txt")  # besides one of WEIGHT_FILES
# Chinese prompt templates ("a photo of a {}"): each label's text embedding is their normalised mean.
DEFAULT_PROMPTS = ("一张{}的照片。", "{}的照片。", "一张{}的图片。", "这是一张{}的照片。")
_PIL_FILTERS: dict[int, Interpolation] = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
ARCH_BY_MODEL_TYPE = {"chinese_clip": "chinese_clip"}


def is_hf_folder(ref: str) -> bool:
    path = Path(ref)
    if not (path / "config.json").is_file():
        return False
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") in ARCH_BY_MODEL_TYPE


def looks_complete(folder: Path) -> bool:
    """Every file a Chinese-CLIP folder needs is there (weights non-empty)."""
    weights = [folder / n for n in WEIGHT_FILES if (folder / n).is_file()]
    return all((folder / n).is_file() for n in REQUIRED_FILES) and any(w.stat().st_size > 0 for w in weights)


def load_folder(folder: Path, labels: Path | None, *, source: str = "") -> ModelSpec:
    config = _read_json(folder / "config.json")
    arch = ARCH_BY_MODEL_TYPE[str(config.get("model_type"))]
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise ModelError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")
    if labels is None:
        raise UsageError(
            f"{folder.name} is a zero-shot (CLIP) model: give your own label list with --labels FILE, one "
            "label per line (连衣裙, 运动鞋, 蓝牙耳机, …)"
        )
    fingerprint = hashlib.sha256(
        "\n".join(file_fingerprint(p) for p in (weights, folder / "vocab.txt") if p.is_file()).encode()
    ).hexdigest()
    return ModelSpec(
        name=folder.name,
        backend="torch",
        weights=folder,
        labels=load_labels(labels),
        preprocess=preprocess_from_config(folder / "preprocessor_config.json"),
        output="logits",
        source=source or str(folder),
        weights_fingerprint=fingerprint,
        arch=arch,
        prompts=DEFAULT_PROMPTS,
        logit_scale=read_logit_scale(weights),
    )


def preprocess_from_config(path: Path) -> PreprocessSpec:
    """A :class:`PreprocessSpec` that does what ``ChineseCLIPImageProcessor`` does with this config."""
    cfg = _read_json(path) if path.is_file() else {}
    if not cfg and (path.parent / "processor_config.json").is_file():  # transformers 5 writes this one
        cfg = _read_json(path.parent / "processor_config.json").get("image_processor") or {}
    size = cfg.get("size", {"shortest_edge": 224})
    short = size if isinstance(size, int) else size.get("shortest_edge") if isinstance(size, dict) else None
    if not isinstance(short, int):
        raise ModelError(f"{path}: size {size!r} is not a shortest_edge resize, which wanwu does not support")
    crop = cfg.get("crop_size", {"height": short, "width": short})
    if isinstance(crop, dict):
        if crop.get("height") != crop.get("width"):
            raise ModelError(f"{path}: a non-square crop_size {crop!r} is not supported")
        crop = crop.get("height")
    if not cfg.get("do_center_crop", True) or not cfg.get("do_resize", True) or not cfg.get("do_normalize", True):
        raise ModelError(f"{path}: wanwu needs do_resize, do_center_crop and do_normalize to be true")
    resample = cfg.get("resample", 3)
    if resample not in _PIL_FILTERS:
        raise ModelError(f"{path}: unsupported resample filter {resample!r}")
    return PreprocessSpec(
        resize_short=short,
        crop_size=int(crop),
        interpolation=_PIL_FILTERS[resample],
        mean=tuple(float(v) for v in cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711))),  # type: ignore[arg-type]
        scale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
        crop_offset="floor",
    )


def read_logit_scale(weights: Path) -> float:
    """exp(logit_scale) read from the weights file alone (a few bytes of a safetensors file)."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="numpy") as f:
                value = f.get_tensor("logit_scale")
        else:
            import torch

            value = torch.load(str(weights), map_location="cpu", weights_only=True, mmap=True)["logit_scale"]
            value = value.numpy()
    except ImportError as e:
        from wanwu.errors import MissingExtraError

        raise MissingExtraError(e.name or "transformers", "clip", f"the CLIP model {weights.parent}") from None
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise ModelError(f"{weights}: cannot read logit_scale: {e}") from None
    import math

    return math.exp(float(value.reshape(-1)[0]))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


# --- hf:OWNER/NAME[@REV] ------------------------------------------------------------------------------


def endpoint() -> str:
    return (os.environ.get("WANWU_HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str = "main"

    @classmethod
    def parse(cls, ref: str) -> HubRef:
        body = ref[len(PREFIX):]
        repo, _, rev = body.partition("@")
        parts = repo.split("/")
        if len(parts) != 2 or not all(p and p not in (".", "..") and p.replace("-", "").replace("_", "")
                                      .replace(".", "").isalnum() for p in parts):
            raise UsageError(f"bad Hugging Face id {ref!r}: expected hf:OWNER/NAME[@REVISION]")
        if rev and (not rev.replace("-", "").replace("_", "").replace(".", "").isalnum()):
            raise UsageError(f"bad revision in {ref!r}")
        return cls(repo, rev or "main")

    def folder(self) -> Path:
        return wanwu_home() / "models" / "hf" / self.repo.replace("/", "--") / self.revision


def fetch(ref: HubRef) -> Path:
    """Download the checkpoint's files once (each via ``NAME.part``, checked, then renamed); the folder is
    complete when ``.complete`` is there. Processes on one machine take turns (a ``filelock`` beside the
    folder, as for ModelScope): the others find the folder complete. Each file's size is checked against what
    the server announced, and its sha256 against the Hub's ``X-Linked-Etag`` (the LFS files: the weights)."""
    import httpx
    from filelock import FileLock

    folder = ref.folder()
    if (folder / ".complete").is_file():
        return folder
    from wanwu.seed.download import offline

    if offline():
        raise DownloadError(f"{PREFIX}{ref.repo} is not downloaded yet and WANWU_OFFLINE is set")
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / ".complete").is_file():  # another process finished it while this one waited
            return folder
        base = f"{endpoint()}/{ref.repo}/resolve/{ref.revision}"
        with httpx.Client(follow_redirects=True, timeout=30.0) as client:
            for name in CONFIG_FILES + TOKENIZER_FILES:
                _get(client, f"{base}/{name}", folder / name, required=name in ("config.json", "vocab.txt"))
            if not any(_get(client, f"{base}/{name}", folder / name, required=False) for name in WEIGHT_FILES):
                raise DownloadError(f"{PREFIX}{ref.repo}@{ref.revision}: no {' or '.join(WEIGHT_FILES)} at {base}")
        (folder / ".complete").write_text(f"{PREFIX}{ref.repo}@{ref.revision}\n", encoding="utf-8")
    return folder


def _get(client: Any, url: str, dest: Path, *, required: bool) -> bool:
    import httpx

    if dest.is_file():
        return True
    part = dest.with_name(dest.name + ".part")
    try:
        with client.stream("GET", url) as response:
            if response.status_code == 404 and not required:
                return False
            if response.status_code != 200:
                raise DownloadError(f"GET {url}: HTTP {response.status_code}")
            expected = _expected(response.headers)
            with part.open("wb") as f:
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
    except httpx.HTTPError as e:
        raise DownloadError(f"GET {url}: {type(e).__name__}: {e}") from None
    _check(part, url, *expected)
    os.replace(part, dest)
    return True


def _expected(headers: Any) -> tuple[int | None, str | None]:
    """The size and sha256 the server vouches for (the Hub: ``X-Linked-Size``/``X-Linked-Etag`` for LFS files,
    ``Content-Length`` otherwise)."""
    size = headers.get("x-linked-size") or (headers.get("content-length") if not headers.get("content-encoding")
                                            else None)
    etag = (headers.get("x-linked-etag") or "").strip('"').removeprefix("W/").strip('"').lower()
    sha = etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None
    return (int(size) if size and size.isdigit() else None), sha


def _check(part: Path, url: str, size: int | None, sha256: str | None) -> None:
    from wanwu.seed.download import sha256_file

    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise DownloadError(f"GET {url}: got {got} bytes, the server announced {size}; deleted it")
    if sha256 is not None and (digest := sha256_file(part)) != sha256:
        part.unlink()
        raise DownloadError(f"GET {url}: sha256 {digest} does not match the Hub's {sha256}; deleted it")


class _FolderLoader:
    name = "hf-folder"

    def claims(self, ref: str) -> bool:
        return is_hf_folder(ref)

    def load(self, ref: str, labels: Path | None) -> ModelSpec:
        return load_folder(Path(ref), labels, source=ref)


class _HubLoader:
    name = "hf-hub"

    def claims(self, ref: str) -> bool:
        return ref.startswith(PREFIX)

    def load(self, ref: str, labels: Path | None) -> ModelSpec:
        folder = fetch(HubRef.parse(ref))
        if not is_hf_folder(str(folder)):
            known = ", ".join(ARCH_BY_MODEL_TYPE)
            raise ModelError(f"{ref}: config.json does not name a supported model_type ({known})")
        return load_folder(folder, labels, source=ref)


FOLDER_LOADER = _FolderLoader()
HUB_LOADER = _HubLoader()
