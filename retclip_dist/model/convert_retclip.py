"""Convert a checkpoint of the public RET-CLIP release (sStonemason/RET-CLIP) to our save_pretrained format.

The release is Chinese-CLIP-shaped: ``visual.*`` is an OpenAI-CLIP VisualTransformer (QuickGELU, a
bias-free patch conv, ``visual.proj`` [W, D] after ``ln_post``), ``bert.*`` is a BERT with Hugging Face
layer names plus an unused pooler, ``text_projection{,_left,_right}`` are the three text MLPs,
``{global,left,right}_feature_mapping`` are bias-free Linear heads applied *after* ``visual.proj``, and
``logit_scale{,_left,_right}`` are the temperatures. Our image heads read the tower's un-projected [W]
output, so ``visual.proj`` is folded into each mapping head (a product of two linear maps is exact).
Shapes are read from the tensors, so scaled-down checkpoints with the same names convert too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor

from retclip_dist.model.config import ModelConfig
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.weights import read_state_dict

# The release's VisualTransformer and BERT both use 64-dimensional attention heads.
HEAD_WIDTH = 64
# timm's OpenAI-CLIP ViT with the QuickGELU activation the release's ResidualAttentionBlock uses;
# vision_kwargs override its sizes, so the name also fits other patch sizes and depths.
VISION_NAME = "vit_base_patch16_clip_quickgelu_224"
_TEXT_HEADS = {
    "text_projection": "text_patient",
    "text_projection_left": "text_left",
    "text_projection_right": "text_right",
}
_SCALES = {"logit_scale": "patient", "logit_scale_left": "left", "logit_scale_right": "right"}


class ConversionError(ValueError):
    """The checkpoint is not a RET-CLIP release checkpoint this converter understands."""


def _count(state: dict[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _need(state: dict[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state:
        raise ConversionError(f"{source}: no tensor {key!r}; is this a RET-CLIP ViT checkpoint?")
    return state[key]


def infer_config(state: dict[str, Tensor], vocab: str, source: str = "checkpoint") -> ModelConfig:
    """The ModelConfig whose shapes match the release tensors in ``state`` (names without 'module.')."""
    if any(k.startswith("visual.attnpool.") for k in state):
        raise ConversionError(f"{source}: a ResNet vision tower; only the released ViT towers are supported")
    conv = _need(state, "visual.conv1.weight", source)
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((_need(state, "visual.positional_embedding", source).shape[0] - 1) ** 0.5)
    words = _need(state, "bert.embeddings.word_embeddings.weight", source)
    hidden = words.shape[1]
    return ModelConfig(
        vision_name=VISION_NAME,
        vision_kwargs={
            "img_size": grid * patch,
            "patch_size": patch,
            "embed_dim": width,
            "depth": _count(state, r"visual\.transformer\.resblocks\.(\d+)\."),
            "num_heads": width // HEAD_WIDTH,
        },
        text_config={
            "model_type": "bert",
            "vocab_size": words.shape[0],
            "hidden_size": hidden,
            "num_hidden_layers": _count(state, r"bert\.encoder\.layer\.(\d+)\."),
            "num_attention_heads": hidden // HEAD_WIDTH,
            "intermediate_size": _need(state, "bert.encoder.layer.0.intermediate.dense.weight", source).shape[
                0
            ],
            "max_position_embeddings": _need(
                state, "bert.embeddings.position_embeddings.weight", source
            ).shape[0],
            "type_vocab_size": _need(state, "bert.embeddings.token_type_embeddings.weight", source).shape[0],
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
        },
        tokenizer_path=vocab,
        embed_dim=_need(state, "visual.proj", source).shape[1],
    )


def _fold_heads(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Image heads on the un-projected tower output: mapping.weight @ proj.T (in float64, then float32)."""
    proj = _need(state, "visual.proj", source).double()  # [W, D]
    dim = proj.shape[1]

    def fold(weight: Tensor) -> Tensor:
        return (weight.double() @ proj.T).float()  # [D, D] @ [D, W] -> [D, W]

    mapping = _need(state, "global_feature_mapping.weight", source)  # [D, 2D] over cat(left, right)
    return {
        "image_patient.weight": torch.cat([fold(mapping[:, :dim]), fold(mapping[:, dim:])], dim=1),
        "image_left.weight": fold(_need(state, "left_feature_mapping.weight", source)),
        "image_right.weight": fold(_need(state, "right_feature_mapping.weight", source)),
    }


def convert_state_dict(
    state: dict[str, Tensor], model: RetClip, source: str = "checkpoint"
) -> tuple[dict[str, Tensor], list[str]]:
    """Our state dict from a release one; also returns the release keys deliberately dropped."""
    state = {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in state.items()}
    # timm's own OpenAI-CLIP converter: conv1/class_embedding/resblocks/ln_* -> timm names; it also turns
    # visual.proj into head.weight, which is dropped here because the proj is folded into our heads.
    vision = checkpoint_filter_fn({k: v for k, v in state.items() if k.startswith("visual.")}, model.visual)
    out = {f"visual.{k}": v for k, v in vision.items() if not k.startswith("head.")}
    dropped = []
    for key, value in state.items():
        if key.startswith("bert.pooler."):
            dropped.append(key)  # BERT's pooler is never used: the heads read the [CLS] hidden state
        elif key.startswith("bert."):
            out["text." + key.removeprefix("bert.")] = value
        elif (head := key.split(".", 1)[0]) in _TEXT_HEADS:
            out[f"{_TEXT_HEADS[head]}.{key.split('.', 1)[1]}"] = value
        elif key in _SCALES:
            out[f"logit_scale.{_SCALES[key]}"] = value.reshape(1)
    out.update(_fold_heads(state, source))
    own = model.state_dict()
    missing = sorted(set(own) - set(out))
    if missing:
        raise ConversionError(f"{source}: the conversion leaves {len(missing)} tensors unset: {missing[:8]}")
    known = (
        "visual.",
        "bert.",
        *_TEXT_HEADS,
        *_SCALES,
        "global_feature_mapping",
        "left_feature_mapping",
        "right_feature_mapping",
    )
    unknown = sorted(k for k in state if not k.startswith(known))
    if unknown:
        raise ConversionError(f"{source}: tensors this converter does not know: {unknown[:8]}")
    wrong = [(k, tuple(out[k].shape), tuple(v.shape)) for k, v in own.items() if out[k].shape != v.shape]
    if wrong:
        raise ConversionError(f"{source}: converted shapes differ from the model: {wrong[:8]}")
    return {k: out[k] for k in own}, dropped


def convert_release(checkpoint: str | Path, vocab: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Read the release .pt (training checkpoint dict or bare state dict), write a save_pretrained dir."""
    source = str(checkpoint)
    state = read_state_dict(checkpoint)
    cfg = infer_config(state, str(vocab), source)
    model = RetClip(cfg)
    converted, dropped = convert_state_dict(state, model, source)
    model.load_state_dict(converted, strict=True)
    model.save_pretrained(out_dir)
    return {
        "source": source,
        "out": str(out_dir),
        "vision": {"name": cfg.vision_name, **cfg.vision_kwargs},
        "text": {k: cfg.text_config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers")},
        "embed_dim": cfg.embed_dim,
        "tensors": len(converted),
        "dropped": sorted(dropped),
    }
