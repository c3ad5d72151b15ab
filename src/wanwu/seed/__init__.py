"""The seed model, 万物识别-中文-通用领域 (ModelScope ``damo/cv_resnest101_general_recognition``).

Importing this package registers two model loaders (no torch needed for that):

* ``modelscope-folder``: a downloaded ModelScope model folder given as ``--model FOLDER``;
* ``modelscope-hub``: ``modelscope:OWNER/NAME[@REVISION]``, downloaded once into ``$WANWU_HOME/models``.

Both produce a ``torch``-backend spec; :mod:`wanwu.seed.resnest` and :mod:`wanwu.seed.checkpoint` (which
need torch) build the network, and ``wanwu convert`` turns it into an ONNX model folder.
"""

from __future__ import annotations

from pathlib import Path

from wanwu.models import register_loader
from wanwu.seed import modelscope
from wanwu.spec import ModelSpec


@register_loader("modelscope-folder", modelscope.is_modelscope_folder)
def _load_folder(ref: str, labels: Path | None) -> ModelSpec:
    return modelscope.load_folder(Path(ref), labels, source=ref)


@register_loader("modelscope-hub", lambda ref: ref.startswith(modelscope.PREFIX))
def _load_hub(ref: str, labels: Path | None) -> ModelSpec:
    return modelscope.load_hub(ref, labels)
