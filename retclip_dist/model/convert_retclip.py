"""Convert a checkpoint of the public RET-CLIP release (sStonemason/RET-CLIP) to our save_pretrained format.

The release is Chinese-CLIP-shaped: ``visual.*`` is an OpenAI-CLIP VisualTransformer (QuickGELU, a
bias-free patch conv, ``visual.proj`` [W, D] after ``ln_post``), ``bert.*`` is a BERT with Hugging Face
layer names and no pooler (a rebuilt checkpoint that carries HF's pooler has it dropped and reported),
``text_projection{,_left,_right}`` are the three text MLPs, ``{global,left,right}_feature_mapping`` are
bias-free Linear heads applied *after* ``visual.proj``, and ``logit_scale{,_left,_right}`` are the
temperatures. Our model has the same structure, so every release
tensor has exactly one home (``visual.proj`` -> ``image_proj.weight``, transposed; the mappings -> the
image heads), nothing is folded, and the conversion is refused unless it fills every tensor of our model.
Shapes are read from the tensors, so scaled-down checkpoints with the same names convert too.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor

from retclip_dist.model.config import RELEASE_LOGIT_SCALE_RANGE, ModelConfig
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.vocab import read_vocab
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
        # The release's clamp after each step, should the converted model be trained further.
        min_logit_scale=RELEASE_LOGIT_SCALE_RANGE[0],
        max_logit_scale=RELEASE_LOGIT_SCALE_RANGE[1],
    )


# OpenAI-CLIP VisualTransformer names -> timm VisionTransformer names (inside ``visual.``).
_VISION_RENAMES = (
    (r"conv1\.weight", "patch_embed.proj.weight"),
    (r"ln_pre\.(weight|bias)", r"norm_pre.\1"),
    (r"ln_post\.(weight|bias)", r"norm.\1"),
    (r"transformer\.resblocks\.(\d+)\.ln_([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
)
_IMAGE_HEADS = {
    "global_feature_mapping.weight": "image_patient.weight",
    "left_feature_mapping.weight": "image_left.weight",
    "right_feature_mapping.weight": "image_right.weight",
}


def _vision_home(name: str, value: Tensor) -> tuple[str, Tensor] | None:
    """Our name and layout for one ``visual.*`` release tensor (name without the prefix)."""
    if name == "proj":
        return "image_proj.weight", value.T.contiguous()  # x @ proj == Linear(weight=proj.T)
    if name == "class_embedding":
        return "visual.cls_token", value.reshape(1, 1, -1)
    if name == "positional_embedding":
        return "visual.pos_embed", value.unsqueeze(0)
    for pattern, target in _VISION_RENAMES:
        if re.fullmatch(pattern, name):
            return "visual." + re.sub(pattern, target, name), value
    return None


def _home(key: str, value: Tensor) -> tuple[str, Tensor] | None:
    """Where one release tensor goes in our state dict; None for a key this converter does not know."""
    if key.startswith("visual."):
        return _vision_home(key.removeprefix("visual."), value)
    if key.startswith("bert."):
        return "text." + key.removeprefix("bert."), value
    head, _, rest = key.partition(".")
    if head in _TEXT_HEADS:
        return f"{_TEXT_HEADS[head]}.{rest}", value
    if key in _SCALES:
        return f"logit_scale.{_SCALES[key]}", value.reshape(1)
    if key in _IMAGE_HEADS:
        return _IMAGE_HEADS[key], value
    return None


def convert_state_dict(
    state: dict[str, Tensor], model: RetClip, source: str = "checkpoint"
) -> tuple[dict[str, Tensor], list[str]]:
    """Our state dict from a release one; also returns the release keys deliberately dropped.

    Strict: every release tensor has exactly one home in ``model`` (BERT's pooler, which the release never
    uses, is the only thing dropped), and every tensor of ``model`` is filled with its exact shape.
    """
    state = {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in state.items()}
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    dropped, unknown = [], []
    for key, value in state.items():
        if key.startswith("bert.pooler."):
            dropped.append(key)  # the release's BERT has no pooler; some rebuilt checkpoints carry HF's
            continue
        home = _home(key, value)
        if home is None or home[0] not in own:
            unknown.append(key)
            continue
        if home[0] in out:
            raise ConversionError(f"{source}: {origin[home[0]]!r} and {key!r} both map to {home[0]!r}")
        out[home[0]], origin[home[0]] = home[1], key
    if unknown:
        raise ConversionError(f"{source}: tensors this converter does not know: {sorted(unknown)[:8]}")
    missing = sorted(set(own) - set(out))
    if missing:
        raise ConversionError(f"{source}: the conversion leaves {len(missing)} tensors unset: {missing[:8]}")
    wrong = [(k, tuple(out[k].shape), tuple(v.shape)) for k, v in own.items() if out[k].shape != v.shape]
    if wrong:
        raise ConversionError(f"{source}: converted shapes differ from the model: {wrong[:8]}")
    return {k: out[k] for k in own}, dropped


def convert_release(checkpoint: str | Path, vocab: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Read the release .pt (training checkpoint dict or bare state dict), write a save_pretrained dir.

    The directory appears only when complete: it is written under a temporary name beside ``out_dir`` and
    renamed at the end, so a failure leaves no half-written output behind. An existing ``out_dir`` is
    refused rather than mixed with.
    """
    source, out_dir = str(checkpoint), Path(out_dir)
    if out_dir.exists():
        raise ConversionError(f"output {out_dir} already exists; choose a new directory")
    read_vocab(vocab)  # a bad vocab fails now, not after the weights were converted
    state = read_state_dict(checkpoint)
    cfg = infer_config(state, str(vocab), source)
    model = RetClip(cfg)
    converted, dropped = convert_state_dict(state, model, source)
    model.load_state_dict(converted, strict=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model.save_pretrained(partial)
        partial.rename(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {
        "source": source,
        "out": str(out_dir),
        "vision": {"name": cfg.vision_name, **cfg.vision_kwargs},
        "text": {k: cfg.text_config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers")},
        "embed_dim": cfg.embed_dim,
        "tensors": len(converted),
        "dropped": sorted(dropped),
    }
