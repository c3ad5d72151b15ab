"""A tiny randomly initialised Chinese-CLIP checkpoint in Hugging Face layout, made on the fly, and
transformers' own zero-shot computation to compare wanwu with."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

CLIP_LABELS = ("连衣裙", "运动鞋", "蓝牙耳机", "金鱼", "鲨鱼", "狗", "猫", "汽车")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def make_clip_folder(
    folder: Path, *, seed: int = 0, image_size: int = 224, extra_text: str = "",
    text_config: dict[str, int] | None = None, vision_config: dict[str, int] | None = None,
    projection_dim: int = 16, logit_scale: float = 30.0,
) -> Path:
    """Write a ChineseCLIPModel with random weights and a learnt logit scale of ``logit_scale``, a BERT
    vocab.txt with every character of the labels, prompts and ``extra_text``, and the default
    ChineseCLIPImageProcessor config. Tiny unless ``text_config``/``vision_config`` say otherwise (they replace
    the tiny settings; transformers' defaults, ViT-B/16-size, fill in the rest)."""
    import torch
    from transformers import (
        BertTokenizer,
        ChineseCLIPConfig,
        ChineseCLIPImageProcessorPil,
        ChineseCLIPModel,
    )

    from wanwu.hf import DEFAULT_PROMPTS

    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set("".join(CLIP_LABELS) + "".join(DEFAULT_PROMPTS) + extra_text + "，。的一张照片图这是"))
    (folder / "vocab.txt").write_text("\n".join([*SPECIALS, *chars]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.save_pretrained(str(folder))
    # The released checkpoints' preprocessor_config.json: shortest edge 224, bicubic, crop 224, CLIP mean/std
    ChineseCLIPImageProcessorPil().to_json_file(str(folder / "preprocessor_config.json"))
    torch.manual_seed(seed)
    config = ChineseCLIPConfig(
        text_config=text_config or {
            "vocab_size": len(SPECIALS) + len(chars), "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64,
        },
        vision_config=vision_config or {
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
            "image_size": image_size, "patch_size": 32,
        },
        projection_dim=projection_dim,
    )
    model = ChineseCLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(logit_scale))
    model.save_pretrained(str(folder))
    return folder


def transformers_logits(
    folder: Path, images: list[Path], labels: tuple[str, ...], prompts: tuple[str, ...]
) -> npt.NDArray[np.float32]:
    """logits_per_image (logit_scale * cos) as transformers computes them, prompts averaged as CLIP does."""
    import torch
    from PIL import Image
    from transformers import BertTokenizer, ChineseCLIPImageProcessorPil, ChineseCLIPModel, ChineseCLIPProcessor

    processor = ChineseCLIPProcessor(
        image_processor=ChineseCLIPImageProcessorPil.from_pretrained(str(folder)),
        tokenizer=BertTokenizer.from_pretrained(str(folder)),
    )
    model = ChineseCLIPModel.from_pretrained(str(folder)).eval()

    def features(out: object) -> torch.Tensor:
        tensor = out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]
        return tensor / tensor.norm(dim=-1, keepdim=True)

    with torch.inference_mode():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")
        image = features(model.get_image_features(pixel_values=pixels["pixel_values"]))
        text = []
        for label in labels:
            tokens = processor(text=[p.replace("{}", label) for p in prompts], padding=True, return_tensors="pt")
            mean = features(model.get_text_features(**tokens)).mean(dim=0)
            text.append(mean / mean.norm())
        logits = model.logit_scale.exp() * image @ torch.stack(text).T
    return np.asarray(logits.numpy(), dtype=np.float32)
