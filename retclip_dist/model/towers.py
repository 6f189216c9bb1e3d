"""The two encoders: a timm vision tower shared by both eyes and a transformers text tower.

The vision tower is built random and filled by ``load_vision_weights`` together with the model's shared
image projection (CLIP's ``visual.proj``); the text builder returns the tower and, when local weights were
requested, the LoadReport saying what was loaded.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from timm.layers import QuickGELU
from torch import nn
from transformers import MODEL_MAPPING, AutoConfig, PretrainedConfig, PreTrainedModel

from retclip_dist.model.config import CLIP_QUICKGELU_TAG, ImageInput, ModelConfig
from retclip_dist.model.weights import LoadReport, load_into, raise_on_shape_mismatch, read_state_dict

# Any of these in a HF model dir means it carries weights; a config-only dir means random init.
_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class VisionInit(NamedTuple):
    """What a vision weights file gave besides the tower: CLIP's projection and temperature, if present."""

    report: LoadReport  # tower and shared projection, as one report
    logit_scale: torch.Tensor | None  # CLIP's learned log-scale (top-level ``logit_scale``), if any


def build_vision_tower(cfg: ModelConfig) -> nn.Module:
    """timm model without classifier: pooled [W] features out, randomly initialised."""
    return timm.create_model(cfg.vision_name, pretrained=False, num_classes=0, **cfg.vision_kwargs)


def tower_activation(tower: nn.Module) -> str:
    """The first block's MLP activation: "quick_gelu", "gelu", or its class name for anything else."""
    blocks = getattr(tower, "blocks", None)
    act = getattr(getattr(blocks[0], "mlp", None), "act", None) if blocks else None
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, (nn.GELU, timm.layers.GELU)):
        return "gelu"
    return type(act).__name__


def _clip_projection(state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """CLIP's image projection as a bias-free Linear weight [D, W], from either open_clip layout."""
    if "visual.proj" in state:  # OpenAI CLIP and open_clip's own ViT: a [W, D] parameter, x @ proj
        return state["visual.proj"].T.contiguous()
    if "visual.head.proj.weight" in state:  # open_clip with a timm trunk: an nn.Linear [D, W]
        return state["visual.head.proj.weight"]
    return None


def _check_activation(
    cfg: ModelConfig, tower: nn.Module, state: dict[str, torch.Tensor], source: str
) -> None:
    expected = cfg.vision_weights_act
    if expected == "auto":
        # OpenAI-CLIP layout: OpenAI's ViTs and the release were all trained with QuickGELU.
        expected = "quick_gelu" if "visual.class_embedding" in state else None
    actual = tower_activation(tower)
    if expected is None or actual == expected:
        return
    hint = ""
    if expected == "quick_gelu" and "_clip_" in cfg.vision_name and CLIP_QUICKGELU_TAG not in cfg.vision_name:
        hint = f"; use model.vision_name {cfg.vision_name.replace('_clip_', CLIP_QUICKGELU_TAG)!r}"
    raise ValueError(
        f"{source}: these CLIP weights were trained with {expected} but model.vision_name "
        f"{cfg.vision_name!r} uses {actual}{hint} (or set model.vision_weights_act if the weights used {actual})"
    )


def load_vision_weights(cfg: ModelConfig, tower: nn.Module, projection: nn.Linear) -> VisionInit:
    """Fill the tower (and the shared projection, when the file has CLIP's) from cfg.vision_weights.

    Report names are the model's own (``visual.*``, ``image_proj.weight``).
    """
    source = str(cfg.vision_weights)
    state = read_state_dict(cfg.vision_weights)
    _check_activation(cfg, tower, state, source)
    proj = _clip_projection(state)
    # timm's own converter for this architecture turns OpenAI-CLIP / open_clip layouts into timm names and
    # resamples position embeddings to the configured image size, exactly as timm does for hub weights.
    convert = getattr(sys.modules[type(tower).__module__], "checkpoint_filter_fn", None)
    tower_state = convert(state, tower) if convert is not None else state
    if proj is not None:
        # timm renders CLIP's projection as a classifier head (plus a zero bias); it lives in image_proj.
        tower_state = {k: v for k, v in tower_state.items() if not k.startswith("head.")}
    named = {f"visual.{k}": v for k, v in tower_state.items()}
    if proj is not None:
        named["image_proj.weight"] = proj
    holder = nn.Module()
    holder.visual, holder.image_proj = tower, projection
    report = load_into(holder, named, "vision", source)
    return VisionInit(report, state.get("logit_scale"))


def vision_input_size(cfg: ModelConfig) -> int | None:
    """Side of the square image the vision tower takes, or None when it takes any size.

    Built on the meta device (no memory, no weights): the tower itself knows its input, whatever mix of
    architecture name and ``vision_kwargs`` set it.
    """
    try:
        with torch.device("meta"):
            tower = timm.create_model(cfg.vision_name, pretrained=False, num_classes=0, **cfg.vision_kwargs)
    except RuntimeError:
        # timm 1.0.3 reads a drop-path schedule with .item(), which meta tensors cannot give: build it.
        tower = timm.create_model(cfg.vision_name, pretrained=False, num_classes=0, **cfg.vision_kwargs)
    return tower_input_size(tower)


def tower_input_size(tower: nn.Module) -> int | None:
    """Side of the square image a built vision tower takes, or None when it takes any size."""
    patch_embed = getattr(tower, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None or getattr(tower, "dynamic_img_size", False) or size[0] != size[1]:
        return None
    return int(size[0])


def image_input(cfg: ModelConfig, side: int | None) -> ImageInput:
    """The model's input: the tower's side ``side`` (see tower_input_size) and the config's normalisation."""
    if side is None:
        raise ValueError(
            f"model.vision_name {cfg.vision_name!r} takes images of any size; RetClip needs a fixed square "
            "input (set model.vision_kwargs.img_size)"
        )
    return ImageInput(side, tuple(cfg.image_mean), tuple(cfg.image_std))


def text_model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The transformers config of the text tower: from cfg.text_path if set, else from cfg.text_config."""
    if cfg.text_path is not None:
        return AutoConfig.from_pretrained(cfg.text_path, local_files_only=True)
    fields = dict(cfg.text_config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ValueError(
            "model.text_config needs a 'model_type' (e.g. 'bert') when model.text_path is not set"
        )
    return AutoConfig.for_model(model_type, **fields)


def _pooler_free_kwargs(model_cls: type[PreTrainedModel]) -> dict[str, bool]:
    # The [CLS] hidden state is projected by our own heads, so BERT's pooler would be dead weight that
    # DDP flags as unused; only some architectures have the switch.
    takes_flag = "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters
    return {"add_pooling_layer": False} if takes_flag else {}


def build_text_tower(cfg: ModelConfig) -> tuple[PreTrainedModel, LoadReport | None]:
    """transformers base model (no pooler), from local weights in cfg.text_path when the dir has them."""
    config = text_model_config(cfg)
    try:
        model_cls = MODEL_MAPPING[type(config)]
    except KeyError as exc:
        raise ValueError(
            f"text model_type {config.model_type!r} has no transformers AutoModel class"
        ) from exc
    kwargs = _pooler_free_kwargs(model_cls)
    path = cfg.text_path
    if path is None or not any((Path(path) / name).is_file() for name in _HF_WEIGHT_FILES):
        return model_cls(config, **kwargs), None
    model, info = model_cls.from_pretrained(
        path, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
    )
    raise_on_shape_mismatch("text", path, sorted(info["mismatched_keys"]))
    expected = len(model.state_dict())
    report = LoadReport(
        tower="text",
        source=path,
        loaded=expected - len(info["missing_keys"]),
        missing=sorted(info["missing_keys"]),
        unexpected=sorted(info["unexpected_keys"]),
    )
    report.log()
    return model, report
