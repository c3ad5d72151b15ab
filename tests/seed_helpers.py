"""Tiny ResNeSt models in ModelScope's layout, made on the fly (random weights, same key scheme)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wanwu.seed.resnest import ResNeSt, tiny_config

SEED_LABELS = ("猫", "狗", "汽车", "苹果", "飞机", "树", "房子", "花", "鱼", "鸟")


def tiny_network(num_classes: int = len(SEED_LABELS), seed: int = 0) -> ResNeSt:
    """A randomly initialised tiny ResNeSt with non-trivial BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = ResNeSt(tiny_config(num_classes))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.num_batches_tracked.fill_(100)
    return model.eval()


def make_modelscope_folder(
    folder: Path, num_classes: int = len(SEED_LABELS), seed: int = 0, label_file: str = "meta_info.txt",
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """configuration.json + pytorch_model.pt + meta_info.txt (tab-separated, label in column 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "framework": "pytorch",
        "task": "general-recognition",
        "pipeline": {"type": "resnet101-general-recognition"},
        "model": {"type": "ClassificationModel"},
    }
    (folder / "configuration.json").write_text(json.dumps(config), encoding="utf-8")
    torch.save(state if state is not None else tiny_network(num_classes, seed).state_dict(),
               folder / "pytorch_model.pt")
    labels = [SEED_LABELS[i % len(SEED_LABELS)] + (str(i // len(SEED_LABELS)) if i >= 10 else "")
              for i in range(num_classes)]
    if label_file == "meta_info.txt":
        lines = [f"n{i:08d}\t{label}\t{i}" for i, label in enumerate(labels)]
    else:
        lines = [f"{i}\t{label}" for i, label in enumerate(labels)]
    (folder / label_file).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def model_labels(num_classes: int = len(SEED_LABELS)) -> tuple[str, ...]:
    return tuple(SEED_LABELS[i % len(SEED_LABELS)] + (str(i // len(SEED_LABELS)) if i >= 10 else "")
                 for i in range(num_classes))
