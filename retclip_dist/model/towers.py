"""The two encoders: a timm vision tower shared by both eyes and a transformers text tower.

The vision tower is built random and filled by ``load_vision_weights`` together with the model's shared
image projection (CLIP's ``visual.proj``); the text builder returns the tower and, when local weights were
requested, the LoadReport saying what was loaded. Both loads are strict (model/weights.py): what may stay
out is named below, with the reason, or by the user in ``model.vision_weights_ignore`` /
``model.text_weights_ignore``.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from timm.layers import QuickGELU
from torch import nn
from transformers import MODEL_MAPPING, AutoConfig, PretrainedConfig, PreTrainedModel

from retclip_dist.model.config import CLIP_QUICKGELU_TAG, ImageInput, ModelConfig, ModelConfigError
from retclip_dist.model.weights import (
    LoadReport,
    load_strict,
    load_weights_file,
    read_state_dict,
    strict_fit,
    unwrap_state_dict,
)

# Any of these in a HF model dir means it carries weights (the first found is read, in this order, as
# transformers does); a config-only dir means random init. The index files name the shards.
_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# The shared projection's name in load reports and in model.vision_weights_ignore.
PROJECTION = "image_proj.weight"
# Tensors of a vision file that the tower has no place for by design, by their (timm) names: an ImageNet
# classifier (the tower is built without one) and the decoder and mask token of an MAE (RETFound) or
# DINOv2 checkpoint, used only in their pretraining.
VISION_UNUSED = ("head.*", "decoder_*", "mask_token")
# Tensors of a text file that the tower has no place for by design: BERT's pretraining heads (masked LM,
# next sentence) and a masked-LM head of other architectures. Tensors that may be missing or extra: the
# pooler (built without where the architecture allows; our heads read the [CLS] state, and the release
# drops it too), and the position and token-type id buffers, which some transformers versions save.
_TEXT_EITHER_WAY = ("pooler.*", "embeddings.position_ids", "embeddings.token_type_ids")
TEXT_UNUSED = ("cls.*", "lm_head.*", *_TEXT_EITHER_WAY)


class VisionInit(NamedTuple):
    """What a vision weights file gave besides the tower: CLIP's projection and temperature, if present."""

    report: LoadReport  # tower and shared projection, as one report
    logit_scale: torch.Tensor | None  # CLIP's learned log-scale (top-level ``logit_scale``), if any


def build_vision_tower(cfg: ModelConfig) -> nn.Module:
    """timm model without classifier: pooled [W] features out, randomly initialised."""
    try:
        return timm.create_model(cfg.vision_name, pretrained=False, num_classes=0, **cfg.vision_kwargs)
    except RuntimeError:
        if torch.get_default_device().type != "meta":
            raise
        # timm 1.0.3 reads a drop-path schedule with .item(), which meta tensors cannot give: build it on
        # the CPU, then move it where it was asked for.
        with torch.device("cpu"):
            tower = timm.create_model(cfg.vision_name, pretrained=False, num_classes=0, **cfg.vision_kwargs)
        return tower.to("meta")


def tower_activation(tower: nn.Module) -> str:
    """The first block's MLP activation: "quick_gelu", "gelu", or its class name for anything else."""
    blocks = getattr(tower, "blocks", None)
    act = getattr(getattr(blocks[0], "mlp", None), "act", None) if blocks else None
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, (nn.GELU, timm.layers.GELU)):
        return "gelu"
    return type(act).__name__


def _clip_projection(state: dict[str, torch.Tensor], width: int, embed_dim: int) -> torch.Tensor | None:
    """CLIP's image projection as a bias-free Linear weight [D, W], from any of the three CLIP layouts."""
    if "visual.proj" in state:  # OpenAI CLIP and open_clip's own ViT: a [W, D] parameter, x @ proj
        return state["visual.proj"].T.contiguous()
    if "visual.head.proj.weight" in state:  # open_clip with a timm trunk: an nn.Linear [D, W]
        return state["visual.head.proj.weight"]
    # timm's own CLIP weights (vit_base_patch16_clip_224.openai, ...) hold the projection as the tower's
    # head: a [D, W] Linear whose bias timm's converter wrote as zeros. An ImageNet classifier head has a
    # trained bias (and rarely exactly D classes), so it is not taken for one.
    head, bias = state.get("head.weight"), state.get("head.bias")
    if (
        head is not None
        and tuple(head.shape) == (embed_dim, width)
        and (bias is None or (tuple(bias.shape) == (embed_dim,) and not bias.any()))
    ):
        return head
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
    raise ModelConfigError(
        "model.vision_name",
        f"{source}: these CLIP weights were trained with {expected} but model.vision_name "
        f"{cfg.vision_name!r} uses {actual}{hint} (or set model.vision_weights_act if the weights used {actual})",
    )


def load_vision_weights(cfg: ModelConfig, tower: nn.Module, projection: nn.Linear) -> VisionInit:
    """Fill the tower (and the shared projection, when the file has CLIP's) from cfg.vision_weights.

    Strict (model/weights.py ``strict_fit``). Report names are the tower's own timm names (``norm.bias``)
    for what the file lacks, the file's names after timm's conversion for what the tower has no place for,
    and ``image_proj.weight`` for the shared projection, which only a file without any CLIP (``visual.*``)
    layout may lack: a plain tower file then starts it random.
    """
    source = str(cfg.vision_weights)
    try:
        state = read_state_dict(cfg.vision_weights)
    except (OSError, ValueError) as exc:
        raise ModelConfigError("model.vision_weights", str(exc)) from None
    _check_activation(cfg, tower, state, source)
    proj = _clip_projection(state, projection.in_features, projection.out_features)
    # timm's own converter for this architecture turns OpenAI-CLIP / open_clip layouts into timm names and
    # resamples position embeddings to the configured image size, exactly as timm does for hub weights.
    convert = getattr(sys.modules[type(tower).__module__], "checkpoint_filter_fn", None)
    tower_state = convert(dict(state), tower) if convert is not None else state
    if proj is not None:
        # timm renders CLIP's projection as a classifier head (plus a zero bias); it lives in image_proj.
        tower_state = {k: v for k, v in tower_state.items() if not k.startswith("head.")}
    tower_own = tower.state_dict()
    given = dict(tower_state) if proj is None else {**tower_state, PROJECTION: proj}
    clip_layout = proj is not None or any(k.startswith("visual.") for k in state)
    report = strict_fit(
        {**tower_own, PROJECTION: projection.weight},
        given,
        tower="vision",
        source=source,
        field="model.vision_weights",
        may_lack=[*cfg.vision_weights_ignore, *(() if clip_layout else (PROJECTION,))],
        may_leave=[*VISION_UNUSED, *cfg.vision_weights_ignore],
        remedy="name those that may stay out in model.vision_weights_ignore",
    )
    tower.load_state_dict({k: v for k, v in given.items() if k in tower_own}, strict=False)
    if proj is not None:
        projection.load_state_dict({"weight": proj})
    report.log()
    return VisionInit(report, state.get("logit_scale"))


def vision_input_size(cfg: ModelConfig) -> int | None:
    """Side of the square image the vision tower takes, or None when it takes any size.

    Built on the meta device (no memory, no weights): the tower itself knows its input, whatever mix of
    architecture name and ``vision_kwargs`` set it.
    """
    with torch.device("meta"):
        return tower_input_size(build_vision_tower(cfg))


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


# TF-converted BERT checkpoints name LayerNorm's parameters gamma and beta (transformers renames them too).
_LEGACY_SUFFIXES = ((".gamma", ".weight"), (".beta", ".bias"))


def _text_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str] | None:
    """The tensors of a HF model dir's weights (all shards of a sharded one) and the file they came
    from, or None for a config-only dir."""
    found = next((directory / name for name in _HF_WEIGHT_FILES if (directory / name).is_file()), None)
    if found is None:
        return None
    try:
        if not found.name.endswith(".index.json"):
            return read_state_dict(found), str(found)
        try:
            shards = sorted(set(json.loads(found.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{found}: not a weight index with a 'weight_map' ({exc!r})") from None
        merged: dict[str, object] = {}
        for shard in shards:
            merged.update(load_weights_file(directory / shard))
        return unwrap_state_dict(merged, str(found)), str(found)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelConfigError("model.text_path", str(exc)) from None


def _tower_names(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], prefix: str, source: str
) -> dict[str, torch.Tensor]:
    """A HF file's names as the base model has them: a model saved with heads (BertForMaskedLM) keeps the
    base model under its ``base_model_prefix`` ("bert."), and old files spell LayerNorm gamma/beta."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix(f"{prefix}.") if prefix else key
        for old, new in _LEGACY_SUFFIXES:
            if name.endswith(old) and name not in own and name[: -len(old)] + new in own:
                name = name[: -len(old)] + new
        if name in out:
            raise ModelConfigError(
                "model.text_path", f"{source}: two tensors of the file are the text tower's {name!r}"
            )
        out[name] = value
    return out


def build_text_tower(cfg: ModelConfig) -> tuple[PreTrainedModel, LoadReport | None]:
    """transformers base model (no pooler), filled strictly from cfg.text_path's weights when it has them.

    The weights are read and checked here (model/weights.py ``strict_fit``) rather than by
    ``from_pretrained``, which warns about what it could not place and goes on, names keys differently
    across transformers versions, and keeps a half-precision file in half precision: the tower is built in
    float32 and the file's tensors are copied into it.
    """
    config = text_model_config(cfg)
    try:
        model_cls = MODEL_MAPPING[type(config)]
    except KeyError:
        field = "model.text_path" if cfg.text_path is not None else "model.text_config"
        raise ModelConfigError(
            field, f"text model_type {config.model_type!r} has no transformers AutoModel class"
        ) from None
    model = model_cls(config, **_pooler_free_kwargs(model_cls))
    found = None if cfg.text_path is None else _text_weights(Path(cfg.text_path))
    if found is None:
        return model, None
    state, source = found
    own = model.state_dict()
    report = load_strict(
        model,
        _tower_names(state, own, model.base_model_prefix, source),
        tower="text",
        source=source,
        field="model.text_path",
        may_lack=[*_TEXT_EITHER_WAY, *cfg.text_weights_ignore],
        may_leave=[*TEXT_UNUSED, *cfg.text_weights_ignore],
        remedy="name those that may stay out in model.text_weights_ignore",
    )
    return model, report
