"""The two encoders: a timm vision tower shared by both eyes and a transformers text tower.

Each builder returns the tower and, when local pretrained weights were requested, the LoadReport saying
what was loaded; with no weights configured the tower is randomly initialised and the report is None.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import timm
import torch
from torch import nn
from transformers import MODEL_MAPPING, AutoConfig, PretrainedConfig, PreTrainedModel

from retclip_dist.model.config import ModelConfig
from retclip_dist.model.weights import LoadReport, load_into, raise_on_shape_mismatch, read_state_dict

# Any of these in a HF model dir means it carries weights; a config-only dir means random init.
_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def build_vision_tower(cfg: ModelConfig) -> tuple[nn.Module, LoadReport | None]:
    """timm model without classifier (pooled features out), optionally initialised from cfg.vision_weights."""
    tower = timm.create_model(cfg.vision_name, pretrained=False, num_classes=0, **cfg.vision_kwargs)
    if cfg.vision_weights is None:
        return tower, None
    state_dict = read_state_dict(cfg.vision_weights)
    # timm's own converter for this architecture turns OpenAI-CLIP / open_clip layouts into timm names and
    # resamples position embeddings to the configured image size, exactly as timm does for hub weights.
    convert = getattr(sys.modules[type(tower).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        state_dict = convert(state_dict, tower)
    return tower, load_into(tower, state_dict, "vision", cfg.vision_weights)


def vision_input_size(cfg: ModelConfig) -> int | None:
    """Side of the square image the vision tower takes, or None when it takes any size.

    Built on the meta device (no memory, no weights): the tower itself knows its input, whatever mix of
    architecture name and ``vision_kwargs`` set it.
    """
    with torch.device("meta"):
        tower = timm.create_model(cfg.vision_name, pretrained=False, num_classes=0, **cfg.vision_kwargs)
    patch_embed = getattr(tower, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None or getattr(tower, "dynamic_img_size", False) or size[0] != size[1]:
        return None
    return int(size[0])


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
