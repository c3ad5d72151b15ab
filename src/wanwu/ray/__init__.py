"""wanwu on Ray Data: the same records as ``wanwu recognize``, from a cluster (``pip install 'wanwu-vision[cluster]'``).

Put wanwu inside your own pipeline::

    import ray
    from wanwu.ray import recognize_dataset

    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    recognize_dataset(ds, "model.onnx", labels="labels.txt").write_json("s3://bucket/records/")

or use the stages yourself: ``ds.map_batches(decode_batch, fn_kwargs=...)`` (CPU tasks: fetch, hash, cache
lookup, decode with EXIF and per-row errors) then ``.map_batches(Infer, compute=ActorPoolStrategy(...))``
(one model per actor). :class:`RayRunner` is what ``wanwu recognize --runner ray`` runs.
"""

from __future__ import annotations

from wanwu.ray.dataset import RayOptions, recognize_dataset
from wanwu.ray.runner import RayRunner
from wanwu.ray.stages import Infer, decode_batch, item_rows

__all__ = ["Infer", "RayOptions", "RayRunner", "decode_batch", "item_rows", "recognize_dataset"]
