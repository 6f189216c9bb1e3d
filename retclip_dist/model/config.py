"""Model configuration: which towers to build, where their local weights live, and the head/scale setup.

Defaults reproduce the paper: a ViT-B/16 at 224 px for both eyes, a BERT-base-shaped Chinese text
encoder (RoBERTa-wwm-ext-base-chinese has BERT's architecture and a 21,128-token vocabulary), D = 512.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# The three contrastive levels, in the order every per-level tuple uses.
LEVELS = ("patient", "left", "right")

# BERT-base shape with the Chinese vocabulary, used when no local text checkpoint is given.
BERT_BASE_CHINESE: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 21128,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}

# The public release starts all three InfoNCE temperatures at 1/90; SigLIP starts its sigmoid at 10.
INFONCE_INIT_LOGIT_SCALE = math.log(90)
SIGMOID_INIT_LOGIT_SCALE = math.log(10)


@dataclass
class ModelConfig:
    vision_name: str = "vit_base_patch16_224"  # timm architecture name of the eye encoder
    vision_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs (img_size, depth...)
    vision_weights: str | None = None  # local vision state dict (.safetensors/.bin/.pt/.pth); None = random
    text_path: str | None = None  # local HF model dir (config.json, optional weights, tokenizer)
    text_config: dict = field(default_factory=lambda: dict(BERT_BASE_CHINESE))  # HF config w/o text_path
    tokenizer_path: str | None = None  # vocab .txt or HF tokenizer dir; None = text_path
    embed_dim: int = 512  # D, the shared image-text embedding width
    init_logit_scale: float | None = None  # ln(1/temperature); None = ln 90 (infonce), ln 10 (sigmoid)
    max_logit_scale: float = math.log(100)  # clamp applied by clamp_logit_scales_() after each step
    init_logit_bias: float = -10.0  # sigmoid loss only: initial learnable bias (SigLIP's value)
    loss: Literal["infonce", "sigmoid"] = "infonce"  # which contrastive objective the scales serve
    grad_checkpointing: bool = False  # recompute tower activations in backward to save memory

    def resolved_init_logit_scale(self) -> float:
        """The initial logit scale, falling back to the published value for the chosen loss."""
        if self.init_logit_scale is not None:
            return self.init_logit_scale
        return SIGMOID_INIT_LOGIT_SCALE if self.loss == "sigmoid" else INFONCE_INIT_LOGIT_SCALE


def write_vocab(path: str | Path, words: list[str]) -> Path:
    """Write a WordPiece vocab.txt: BERT's five special tokens followed by ``words``, one per line."""
    path = Path(path)
    path.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n", encoding="utf-8"
    )
    return path


def tiny_model_config(vocab_path: str | Path, image_size: int = 32, embed_dim: int = 16) -> ModelConfig:
    """A seconds-fast model for tests: 2-layer ViT (width 32, patch 8) and 2-layer BERT (hidden 32).

    Dropout is off so that forward passes are deterministic in training mode too.
    """
    vocab_size = sum(1 for line in Path(vocab_path).read_text(encoding="utf-8").splitlines() if line)
    return ModelConfig(
        vision_kwargs={"img_size": image_size, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        text_config={
            "model_type": "bert",
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 128,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        tokenizer_path=str(vocab_path),
        embed_dim=embed_dim,
    )
