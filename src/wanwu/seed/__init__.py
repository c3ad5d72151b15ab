"""The seed model, 万物识别-中文-通用领域 (ModelScope ``damo/cv_resnest101_general_recognition``).

Two model loaders, registered as lazy entries by :mod:`wanwu.models` (no torch needed for either):

* ``modelscope-folder``: a downloaded ModelScope model folder given as ``--model FOLDER``;
* ``modelscope-hub``: ``modelscope:OWNER/NAME[@REVISION]``, downloaded once into ``$WANWU_HOME/models``.

Both produce a ``torch``-backend spec; :mod:`wanwu.seed.resnest` and :mod:`wanwu.seed.checkpoint` (which
need torch) build the network, and ``wanwu convert`` turns it into an ONNX model folder.
"""

from __future__ import annotations

from pathlib import Path

from wanwu.seed import modelscope
from wanwu.spec import ModelSpec


class _FolderLoader:
    name = "modelscope-folder"

    def claims(self, ref: str) -> bool:
        return modelscope.is_modelscope_folder(ref)

    def load(self, ref: str, labels: Path | None) -> ModelSpec:
        return modelscope.load_folder(Path(ref), labels, source=ref)


class _HubLoader:
    name = "modelscope-hub"

    def claims(self, ref: str) -> bool:
        return ref.startswith(modelscope.PREFIX)

    def load(self, ref: str, labels: Path | None) -> ModelSpec:
        return modelscope.load_hub(ref, labels)


FOLDER_LOADER = _FolderLoader()
HUB_LOADER = _HubLoader()
