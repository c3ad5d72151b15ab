"""ModelScope models: a downloaded model folder, or ``modelscope:OWNER/NAME[@REVISION]`` from the hub.

A ModelScope folder (``configuration.json`` + ``pytorch_model.pt`` + ``meta_info.txt`` or
``label_mapping.txt``) becomes a ``torch``-backend :class:`~wanwu.spec.ModelSpec` with ModelScope's exact
preprocessing (the :class:`~wanwu.spec.PreprocessSpec` defaults). A hub id is looked up, in order, in

1. wanwu's own download cache, ``$WANWU_HOME/models/OWNER/NAME/REVISION`` (complete only once the marker
   written after a verified download is there, so a complete copy is trusted without any request);
2. ModelScope's cache (``$MODELSCOPE_CACHE`` or ``~/.cache/modelscope/hub``; ``models/OWNER/NAME`` and the
   older ``OWNER/NAME`` layout), when no revision is pinned;
3. the hub itself (:mod:`wanwu.seed.download`), unless ``WANWU_OFFLINE`` is set.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wanwu import hf
from wanwu.errors import MissingExtraError, ModelError, UsageError
from wanwu.labels import load_labels
from wanwu.paths import wanwu_home
from wanwu.spec import ModelSpec, PreprocessSpec, file_fingerprint

if TYPE_CHECKING:
    from wanwu.seed import download

CONFIGURATION = "configuration.json"
CHECKPOINT = "pytorch_model.pt"
LABEL_FILES = ("meta_info.txt", "label_mapping.txt")  # general model, animal sibling
OPTIONAL_FILES = ("README.md",)
MARKER = ".wanwu-download.json"
PREFIX = "modelscope:"
DEFAULT_REVISION = "master"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


# --- a model folder ------------------------------------------------------------------------------------


def is_modelscope_folder(ref: str) -> bool:
    path = Path(ref)
    return (path / CONFIGURATION).is_file() or (path / CHECKPOINT).is_file()


def load_folder(folder: Path, labels: Path | None, *, name: str | None = None, source: str = "") -> ModelSpec:
    """The spec of a ModelScope model folder (the checkpoint itself is read by the torch backend)."""
    config = _read_configuration(folder)
    weights = folder / CHECKPOINT
    if not weights.is_file():
        raise ModelError(f"{folder} has no {CHECKPOINT}: not a complete ModelScope PyTorch model folder")
    label_path = labels or next((folder / n for n in LABEL_FILES if (folder / n).is_file()), None)
    if label_path is None:
        raise ModelError(f"{folder} has no label file ({' or '.join(LABEL_FILES)}); pass one with --labels")
    return ModelSpec(
        name=name or str(config.get("model_id") or folder.name),
        backend="torch",
        weights=weights,
        labels=load_labels(label_path),
        preprocess=PreprocessSpec(),  # ModelScope's general-recognition preprocessing, exactly
        output="logits",
        source=source or str(folder),
        weights_fingerprint=file_fingerprint(weights),
        arch="resnest",
    )


def _read_configuration(folder: Path) -> dict[str, object]:
    path = folder / CONFIGURATION
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    framework = str(data.get("framework", "pytorch")).lower()
    if framework not in ("pytorch", "torch"):
        raise ModelError(f"{path}: framework {framework!r} is not supported (wanwu loads PyTorch models)")
    return data


# --- a hub id ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubRef:
    owner: str
    name: str
    revision: str | None  # None = the default branch

    @property
    def model_id(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def rev(self) -> str:
        return self.revision or DEFAULT_REVISION

    @classmethod
    def parse(cls, ref: str) -> HubRef:
        body = ref[len(PREFIX) :] if ref.startswith(PREFIX) else ref
        model_id, _, revision = body.partition("@")
        owner, _, name = model_id.partition("/")
        for part in (owner, name):
            if not _NAME.fullmatch(part) or part in (".", ".."):
                raise UsageError(f"bad ModelScope id {ref!r}: expected modelscope:OWNER/NAME[@REVISION]")
        if revision and (not _NAME.fullmatch(revision) or ".." in revision):
            raise UsageError(f"bad revision {revision!r} in {ref!r}")
        return cls(owner, name, revision or None)


def hub_dir(ref: HubRef) -> Path:
    return wanwu_home() / "models" / ref.owner / ref.name / ref.rev


def modelscope_cache_candidates(ref: HubRef) -> list[Path]:
    """Where the ``modelscope`` library would have put this model."""
    env = os.environ.get("MODELSCOPE_CACHE")
    roots = [Path(env), Path(env) / "hub"] if env else [Path.home() / ".cache" / "modelscope" / "hub"]
    names = dict.fromkeys([ref.name, ref.name.replace(".", "___")])  # newer modelscope escapes dots
    return [root / sub / ref.owner / n for root in roots for sub in ("models", "") for n in names]


def find_local(ref: HubRef) -> Path | None:
    """A complete local copy, or None. Makes no network request."""
    own = hub_dir(ref)
    if _marked_complete(own):
        return own
    if ref.revision is None:
        for folder in modelscope_cache_candidates(ref):
            if _looks_complete(folder):
                return folder
    return None


def _looks_complete(folder: Path) -> bool:
    if hf.is_hf_folder(str(folder)):  # a Hugging Face layout repository (Chinese-CLIP)
        return hf.looks_complete(folder)
    weights = folder / CHECKPOINT
    return (
        (folder / CONFIGURATION).is_file()
        and weights.is_file()
        and weights.stat().st_size > 0
        and any((folder / n).is_file() for n in LABEL_FILES)
    )


def _marked_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        return bool(files) and all(
            (folder / path).is_file() and (folder / path).stat().st_size == int(info["size"])
            for path, info in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def fetch(ref: HubRef) -> Path:
    """Download the files wanwu needs into :func:`hub_dir` (resuming partial ones) and mark it complete."""
    from wanwu.seed import download  # httpx costs a quarter second to import: only when downloading

    require_torch(f"the ModelScope model {ref.model_id} (PyTorch weights; checked before downloading them)")
    base = download.endpoint()
    download.require_online(
        f"model {PREFIX}{ref.model_id} is not downloaded yet (looked in {hub_dir(ref)}"
        + ("" if ref.revision else " and ModelScope's cache") + ")",
        f"Unset WANWU_OFFLINE to download it from {base}, or download the model folder on a machine with "
        f"internet (e.g.  modelscope download --model {ref.model_id} --local_dir DIR  or  git clone "
        f"{base}/{ref.model_id}.git) and pass it with  --model DIR.",
    )
    target = hub_dir(ref)
    with download.ModelScopeClient(ref.model_id, base) as client:
        if ref.revision is not None:
            known = client.revisions()
            if ref.revision not in known:
                raise ModelError(
                    f"{ref.model_id} has no revision {ref.revision!r} on {base}; known: {', '.join(known)}"
                )
        listing = {f.path: f for f in client.files(ref.rev)}
        wanted = _select(listing, ref)
        bar = download.progress(ref.model_id)
        try:
            for remote in wanted:
                client.download(remote, ref.rev, target / remote.path, bar)
        finally:
            bar.close()
    for remote in wanted:
        if remote.sha256 and remote.path == CHECKPOINT:
            _remember_digest(target / remote.path, remote.sha256)
    marker = {
        "model_id": ref.model_id,
        "revision": ref.rev,
        "endpoint": base,
        "files": {f.path: {"size": f.size, "sha256": f.sha256} for f in wanted},
    }
    tmp = target / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target / MARKER)
    return target


def require_torch(purpose: str) -> None:
    """Raise MissingExtraError now, not after a 630 MB download, when torch is not installed."""
    try:
        found = importlib.util.find_spec("torch") is not None
    except ValueError:  # sys.modules["torch"] is None: deliberately hidden
        found = False
    if not found:
        raise MissingExtraError("torch", "torch", purpose)


def _select(listing: dict[str, download.RemoteFile], ref: HubRef) -> list[download.RemoteFile]:
    if hf.CONFIG_FILES[0] in listing:  # config.json: a repository in Hugging Face layout (Chinese-CLIP)
        weights = [listing[n] for n in hf.WEIGHT_FILES if n in listing][:1]
        lacking = [n for n in hf.REQUIRED_FILES if n not in listing] + ([] if weights else [hf.WEIGHT_FILES[0]])
        if lacking:
            raise ModelError(f"{ref.model_id}@{ref.rev} is in Hugging Face layout but lacks {', '.join(lacking)}")
        optional = [listing[n] for n in hf.TOKENIZER_FILES if n in listing and n not in hf.REQUIRED_FILES]
        return [*(listing[n] for n in hf.REQUIRED_FILES), *optional, *weights]
    missing = [n for n in (CONFIGURATION, CHECKPOINT) if n not in listing]
    labels = [listing[n] for n in LABEL_FILES if n in listing][:1]
    if missing or not labels:
        missing += [] if labels else [" or ".join(LABEL_FILES)]
        raise ModelError(
            f"{ref.model_id}@{ref.rev} is not a ModelScope PyTorch classifier wanwu can load: it lacks "
            f"{', '.join(missing)}"
        )
    extra = [listing[n] for n in OPTIONAL_FILES if n in listing]
    return [listing[CONFIGURATION], *labels, *extra, listing[CHECKPOINT]]


def _remember_digest(path: Path, sha256: str) -> None:
    """Seed :func:`wanwu.spec.file_fingerprint`'s memo with the verified digest (saves hashing 629 MB)."""
    stat = path.stat()
    with contextlib.suppress(OSError):
        memo = path.with_name(path.name + ".sha256")
        memo.write_text(f"{stat.st_size}:{stat.st_mtime_ns} {sha256.lower()}\n")


def load_hub(ref_text: str, labels: Path | None) -> ModelSpec:
    """The seed model's kind (a ModelScope PyTorch classifier), or a repository in Hugging Face layout whose
    ``config.json`` names an architecture wanwu has (Chinese-CLIP), loaded as :mod:`wanwu.hf` loads a folder."""
    ref = HubRef.parse(ref_text)
    folder = find_local(ref) or fetch(ref)
    if hf.is_hf_folder(str(folder)):
        return hf.load_folder(folder, labels, source=ref_text)
    return load_folder(folder, labels, name=ref.model_id, source=ref_text)


class _FolderLoader:
    name = "modelscope-folder"

    def claims(self, ref: str) -> bool:
        return is_modelscope_folder(ref)

    def load(self, ref: str, labels: Path | None) -> ModelSpec:
        return load_folder(Path(ref), labels, source=ref)


class _HubLoader:
    name = "modelscope-hub"

    def claims(self, ref: str) -> bool:
        return ref.startswith(PREFIX)

    def load(self, ref: str, labels: Path | None) -> ModelSpec:
        return load_hub(ref, labels)


FOLDER_LOADER = _FolderLoader()
HUB_LOADER = _HubLoader()
