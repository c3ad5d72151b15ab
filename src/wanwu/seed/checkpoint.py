"""Load ModelScope's ``pytorch_model.pt`` into :class:`~wanwu.seed.resnest.ResNeSt`, strictly.

ModelScope copies only the keys whose names and shapes match and silently leaves the rest random; wanwu
refuses such a checkpoint instead (:class:`~wanwu.errors.CheckpointMismatchError` names every missing,
unexpected and mis-shaped key). The network's depth and widths are read from the checkpoint itself, so the
same code loads ResNeSt-101 (54,092 or 8,288 classes) and the tiny networks the tests build.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wanwu.errors import CheckpointMismatchError, ModelError
from wanwu.seed.resnest import ResNeSt, ResNeStConfig

StateDict = dict[str, Tensor]


def read_state_dict(path: Path) -> StateDict:
    """``torch.load(weights_only=True)``; unwrap ``{"state_dict": ...}``; drop DataParallel ``module.``."""
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint not found: {path}") from None
    except Exception as e:  # pickle errors, truncated zip, refused (non-weights) objects
        raise ModelError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data:
        raise ModelError(f"{path}: expected a state dict (name -> tensor), got {type(data).__name__}")
    out: StateDict = {}
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ModelError(f"{path}: entry {key!r} is not a named tensor")
        out[normalize_key(key)] = value
    return out


def normalize_key(key: str) -> str:
    if key.startswith("module."):
        key = key[len("module.") :]
    return key.replace(".module.", ".")


def infer_config(state: StateDict, where: str = "checkpoint") -> ResNeStConfig:
    """Read depth, widths, radix and class count off the tensors' names and shapes."""
    try:
        fc = state["fc.weight"]
        stem = state["conv1.0.weight"]
        first = state["layer1.0.conv1.weight"]
        split = state["layer1.0.conv2.conv.weight"]
    except KeyError as e:
        raise ModelError(f"{where} is not a ResNeSt state dict: no {e.args[0]!r}") from None
    if fc.ndim != 2 or stem.ndim != 4 or first.ndim != 4 or split.ndim != 4:
        raise ModelError(f"{where}: unexpected tensor ranks for a ResNeSt state dict")
    layers = []
    for stage in range(1, 5):
        pattern = re.compile(rf"layer{stage}\.(\d+)\.conv1\.weight")
        blocks = {int(m.group(1)) for k in state if (m := pattern.fullmatch(k))}
        if not blocks:
            raise ModelError(f"{where}: no blocks in layer{stage}")
        layers.append(max(blocks) + 1)
    group_width = int(first.shape[0])
    radix = int(split.shape[0]) // group_width
    return ResNeStConfig(
        layers=(layers[0], layers[1], layers[2], layers[3]),
        num_classes=int(fc.shape[0]),
        radix=max(radix, 1),
        stem_width=int(stem.shape[0]),
        base_planes=group_width,
        avg_down="layer2.0.downsample.0.weight" not in state,
    )


def check_state_dict(model: torch.nn.Module, state: StateDict) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` fills every parameter and buffer exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched)


def load_resnest(path: Path, num_labels: int | None = None) -> ResNeSt:
    """The network with every weight from ``path``, in eval mode, float32, on the CPU.

    ``num_labels``: the label file's line count, checked against the classifier's output size.
    """
    state = read_state_dict(path)
    config = infer_config(state, str(path))
    if num_labels is not None and config.num_classes != num_labels:
        raise ModelError(
            f"{path} classifies into {config.num_classes} classes (fc.weight) but the label file has "
            f"{num_labels} lines"
        )
    with torch.device("meta"):  # no second copy of the weights: the checkpoint's tensors are adopted
        model = ResNeSt(config)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().eval()
