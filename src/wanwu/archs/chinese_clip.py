"""``chinese_clip``: zero-shot classification with a Chinese-CLIP checkpoint (Hugging Face layout).

The network built for a spec is the image tower plus one last projection onto the label list: the image
embedding is normalised and multiplied by the labels' normalised text embeddings, times ``logit_scale``, so
its outputs are ``logit_scale * cosine`` per label, exactly the ``logits_per_image`` of transformers'
``ChineseCLIPModel``. The engine's batching, top-k, softmax and records then work unchanged: the default
score is ``softmax(logit_scale * cos)`` over the label list, and ``--score logit`` reports the cosine
(the records divide by :attr:`~wanwu.spec.ModelSpec.logit_scale`).

A label's text embedding is the mean of its normalised prompt embeddings (one per template,
``"一张{}的照片"``), normalised again, as CLIP does. They are computed once per (weights, labels,
templates) and kept under ``$WANWU_HOME/clip-text``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from transformers import AutoTokenizer, ChineseCLIPModel
from transformers.utils import logging as hf_logging

from wanwu.errors import ModelError
from wanwu.paths import wanwu_home
from wanwu.spec import ModelSpec

TEXT_BATCH = 64  # prompts embedded at once


class ChineseClipArch:
    name = "chinese_clip"

    def build(self, spec: ModelSpec) -> torch.nn.Module:
        model = load_model(spec.weights)
        head = ZeroShotHead(model, text_embeddings(spec, model), logit_scale(model))
        return head.eval()


ARCH = ChineseClipArch()


def load_model(folder: Path) -> Any:
    """The ChineseCLIPModel in ``folder`` (Hugging Face layout), in eval mode, float32, on the CPU."""
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no "Loading weights" bar
    try:
        model: Any = ChineseCLIPModel.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the Chinese-CLIP model in {folder}: {e}") from None
    model.eval()
    return model


class ZeroShotHead(torch.nn.Module):
    """pixels [N,3,H,W] → ``scale`` * cos(image, label) [N, labels]: the image tower and the label list."""

    def __init__(self, model: Any, text: npt.NDArray[np.float32], scale: float) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection
        self.register_buffer("text", torch.from_numpy(np.ascontiguousarray(text.T)), persistent=False)
        self.scale = scale
        self.__dict__["clip"] = model  # the whole model, for relabel (not a submodule: not exported)

    def relabel(self, spec: ModelSpec) -> ZeroShotHead:
        """The same image tower (shared, not copied) projected onto ``spec``'s labels and prompts."""
        head = ZeroShotHead(self.__dict__["clip"], text_embeddings(spec, self.__dict__["clip"]), self.scale)
        device: torch.device = self.visual_projection.weight.device
        return head.to(device).eval()

    def cast_body(self, dtype: torch.dtype) -> None:
        """The image tower in ``dtype`` (once); the cosine against the label embeddings stays fp32."""
        self.vision_model.to(dtype)
        self.visual_projection.to(dtype)

    @property
    def input_dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.visual_projection.weight.dtype
        return dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embed(pixel_values)[0]

    def embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and the image's projected, normalised embedding (``get_image_features``, normalised)."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        image = self.visual_projection(pooled).float()
        image = image / image.norm(dim=-1, keepdim=True)
        scores: torch.Tensor = self.scale * (image @ self.text)
        return scores, image

    def embed_texts(self, texts: list[str], folder: Path) -> npt.NDArray[np.float32]:
        """Normalised text embeddings of ``texts`` (search queries), as transformers' get_text_features."""
        return text_features(folder, self.__dict__["clip"], texts)


def logit_scale(model: Any) -> float:
    """exp(the model's learnt log scale): 100 for the released checkpoints."""
    return float(model.logit_scale.exp().item())


def text_embeddings(spec: ModelSpec, model: Any | None = None) -> npt.NDArray[np.float32]:
    """[labels, D] normalised prompt-averaged text embeddings for ``spec``, from the disk cache if there.

    ``model``: the loaded ChineseCLIPModel (loaded from ``spec.weights`` when left out and needed)."""
    if not spec.prompts:
        raise ModelError(f"{spec.source or spec.name}: a CLIP model needs at least one prompt template")
    key = hashlib.sha256(f"{spec.weights_fingerprint}\n{spec.vocabulary_fingerprint()}".encode()).hexdigest()
    path = wanwu_home() / "clip-text" / f"{key[:32]}.npy"
    try:
        cached = np.load(path, allow_pickle=False)
        if cached.ndim == 2 and cached.shape[0] == spec.num_classes and cached.dtype == np.float32:
            return np.asarray(cached, dtype=np.float32)
    except (OSError, ValueError):
        pass
    if model is None:
        model = load_model(spec.weights)
    embeddings = compute_text_embeddings(spec.weights, model, spec.labels, spec.prompts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, embeddings, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable home: compute again next time
    return embeddings


def compute_text_embeddings(
    folder: Path, model: Any, labels: tuple[str, ...], prompts: tuple[str, ...]
) -> npt.NDArray[np.float32]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {folder}: {e}") from None
    texts = [prompt.replace("{}", label) for label in labels for prompt in prompts]
    with torch.inference_mode():
        per_prompt = torch.from_numpy(_text_rows(tokenizer, model, texts)).reshape(len(labels), len(prompts), -1)
        mean = per_prompt.mean(dim=1)
        mean = mean / mean.norm(dim=-1, keepdim=True)
    return np.ascontiguousarray(mean.numpy(), dtype=np.float32)


def text_features(folder: Path, model: Any, texts: list[str]) -> npt.NDArray[np.float32]:
    """[len(texts), D] normalised text embeddings (search queries)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {folder}: {e}") from None
    with torch.inference_mode():
        return _text_rows(tokenizer, model, texts)


def _text_rows(tokenizer: Any, model: Any, texts: list[str]) -> npt.NDArray[np.float32]:
    limit = int(getattr(model.config.text_config, "max_position_embeddings", 512))
    parts = []
    for start in range(0, len(texts), TEXT_BATCH):
        tokens = tokenizer(texts[start : start + TEXT_BATCH], padding=True, truncation=True,
                           max_length=limit, return_tensors="pt")
        hidden = model.text_model(**tokens).last_hidden_state[:, 0, :]
        emb = model.text_projection(hidden)
        parts.append(emb / emb.norm(dim=-1, keepdim=True))
    return np.ascontiguousarray(torch.cat(parts).numpy(), dtype=np.float32)
