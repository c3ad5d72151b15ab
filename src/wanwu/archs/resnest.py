"""``resnest``: the seed model's ResNeSt-101, built strictly from its ModelScope checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wanwu.spec import ModelSpec

if TYPE_CHECKING:
    import torch


class ResNeStArch:
    name = "resnest"

    def build(self, spec: ModelSpec) -> torch.nn.Module:
        from wanwu.seed.checkpoint import load_resnest

        return load_resnest(spec.weights, spec.num_classes)


ARCH = ResNeStArch()
