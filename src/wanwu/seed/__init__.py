"""The seed model, 万物识别-中文-通用领域 (ModelScope ``damo/cv_resnest101_general_recognition``).

Two model loaders in :mod:`wanwu.seed.modelscope`, registered as lazy entries by :mod:`wanwu.models` (no torch
needed for either):

* ``modelscope-folder``: a downloaded ModelScope model folder given as ``--model FOLDER``;
* ``modelscope-hub``: ``modelscope:OWNER/NAME[@REVISION]``, downloaded once into ``$WANWU_HOME/models``.

Both produce a ``torch``-backend spec; :mod:`wanwu.seed.resnest` and :mod:`wanwu.seed.checkpoint` (which
need torch) build the network, and ``wanwu convert`` turns it into an ONNX model folder.
"""

