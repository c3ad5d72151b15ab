"""Architectures: how to build the network a :class:`~wanwu.spec.ModelSpec` names in ``arch``.

The architecture travels with the model (timm's lesson): a spec says ``arch="resnest"`` or
``arch="chinese_clip"``, and the torch backend and ``wanwu convert`` build that network from the spec's
weights through :data:`ARCHS` (a :class:`~wanwu.registry.Registry`; third parties add one through the
``wanwu.archs`` entry-point group). Adding an architecture is adding one module here (or in a plugin) with an
object that has a ``name`` and a ``build(spec)``.

A built network takes a float32 batch laid out as the spec's preprocessing says and returns
``[N, num_classes]`` scores, so the engine's batching, top-k, softmax and records work unchanged for every
architecture. Built-ins are lazy entries: torch (and transformers) are imported only when one is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from wanwu.errors import ModelError
from wanwu.registry import Registry
from wanwu.spec import ModelSpec

if TYPE_CHECKING:
    import torch


class Architecture(Protocol):
    @property
    def name(self) -> str: ...

    def build(self, spec: ModelSpec) -> torch.nn.Module:
        """The network for ``spec`` (weights loaded, eval mode, on the CPU): batch in, [N, classes] out."""
        ...


ARCHS: Registry[Architecture] = Registry("architecture", group="wanwu.archs")
ARCHS.lazy("resnest", "wanwu.archs.resnest:ARCH", extra="torch")
ARCHS.lazy("chinese_clip", "wanwu.archs.chinese_clip:ARCH", extra="clip")


def build_network(spec: ModelSpec) -> torch.nn.Module:
    """Build ``spec.arch``'s network; a spec without one cannot run on a framework backend."""
    if not spec.arch:
        raise ModelError(f"{spec.source or spec.name} names no architecture (ModelSpec.arch): nothing to build")
    return ARCHS.get(spec.arch).build(spec)
