"""The vision tower as a timm checkpoint, and as the ``{"model": state_dict}`` file RETFound fine-tunes from.

timm's own layout for a hub model: ``config.json`` (architecture, ``model_args`` for the constructor,
``pretrained_cfg`` with the input size, mean, std, interpolation and crop) beside ``model.safetensors``.
The tower's keys are timm's already (RetClip.visual is a timm model built with ``num_classes=0``). With
``head="projection"`` the shared image projection becomes timm's classifier head (bias zero), as timm
ships OpenAI CLIP's ``visual.proj`` for its ``*_clip_*`` ViTs; without it the tower ends at the pooled
feature (``num_classes=0``).

Preprocessing: retclip-eval resizes a photo to the square input with PIL bicubic, no crop
(eval/data.py ``model_input``); timm's ``crop_mode="squash"`` with ``crop_pct=1.0`` is that resize.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from retclip_dist.export.check import check_close, check_input
from retclip_dist.model.retclip import RetClip

TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"
# RETFound's main_finetune.py reads torch.load(path)["model"]; named apart from timm's own files.
RETFOUND_CHECKPOINT = "retfound_checkpoint.pth"
TimmHead = Literal["none", "projection"]
TIMM_HEADS: tuple[str, ...] = ("none", "projection")


def classifier_name(tower: nn.Module) -> str:
    """The module timm calls the classifier of this architecture ('head' for ViTs)."""
    name = tower.pretrained_cfg.get("classifier", "head")
    return name[0] if isinstance(name, (list, tuple)) else name


def timm_state_dict(model: RetClip, head: TimmHead) -> dict[str, Tensor]:
    """The tower's tensors under timm's names, plus the projection as ``<classifier>.weight/.bias``."""
    state = {k: v.detach().clone().contiguous() for k, v in model.visual.state_dict().items()}
    if head == "projection":
        weight = model.image_proj.weight.detach().clone().contiguous()
        classifier = classifier_name(model.visual)
        state[f"{classifier}.weight"] = weight
        state[f"{classifier}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return state


def timm_config(model: RetClip, head: TimmHead) -> dict[str, Any]:
    """timm's hub ``config.json``: what ``timm.create_model`` needs to rebuild and preprocess for the tower."""
    spec = model.image_input
    num_classes = model.config.embed_dim if head == "projection" else 0
    own = model.visual.pretrained_cfg
    pretrained_cfg = {
        "input_size": [3, spec.size, spec.size],
        "fixed_input_size": True,
        "interpolation": spec.interpolation,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "num_classes": num_classes,
        "classifier": classifier_name(model.visual),
        "first_conv": own.get("first_conv", "patch_embed.proj"),
    }
    return {
        "architecture": model.config.vision_name,
        "num_classes": num_classes,
        "num_features": model.visual.num_features,
        "model_args": dict(model.config.vision_kwargs),
        "pretrained_cfg": pretrained_cfg,
    }


def write_timm(model: RetClip, directory: Path, head: TimmHead) -> list[str]:
    """Write config.json, model.safetensors and RETFound's checkpoint into ``directory``; returns the names."""
    state = timm_state_dict(model, head)
    (directory / TIMM_CONFIG).write_text(json.dumps(timm_config(model, head), indent=2) + "\n")
    save_file(state, str(directory / TIMM_WEIGHTS), metadata={"format": "pt"})
    torch.save({"model": state}, directory / RETFOUND_CHECKPOINT)
    return [TIMM_CONFIG, TIMM_WEIGHTS, RETFOUND_CHECKPOINT]


def load_timm(directory: str | Path, **kwargs: Any) -> nn.Module:
    """The exported tower through timm's own pretrained path, on any timm version this project supports
    (timm with ``local-dir:`` names, e.g. 1.0.31, also takes ``timm.create_model("local-dir:DIR", pretrained=True)``)."""
    directory = Path(directory)
    cfg = json.loads((directory / TIMM_CONFIG).read_text())
    overlay = {**cfg["pretrained_cfg"], "file": str(directory / TIMM_WEIGHTS)}
    args = {**cfg["model_args"], **kwargs}
    return timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **args)


@torch.no_grad()
def verify_timm(model: RetClip, directory: Path, head: TimmHead) -> float:
    """Build the export through timm and compare its output with RetClip's on ``check_input``; returns the
    largest difference, raises ExportMismatch beyond float32 rounding (1e-5)."""
    tower = load_timm(directory).eval()
    x = check_input(model.image_input.size)
    ours = model.project_eye(x) if head == "projection" else model.embed_eye(x)
    return check_close("timm", tower(x), ours)


def timm_usage(model: RetClip, head: TimmHead) -> list[str]:
    """How to load this export, for its README (paths relative to the export folder)."""
    arch, args = model.config.vision_name, model.config.vision_kwargs
    extra = "".join(f", {k}={v!r}" for k, v in args.items())
    out = (
        "the pooled tower output"
        if head == "none"
        else f"the shared image projection ({model.config.embed_dim})"
    )
    return [
        f"The vision tower of a RET-CLIP model as a timm `{arch}`; it outputs {out}. `config.json` holds the",
        "architecture, its arguments and the preprocessing (input size, mean, std, bicubic, the whole photo",
        "resized to the square input: `crop_mode: squash`, `crop_pct: 1.0`).",
        "",
        "```python",
        "import json, timm",
        'cfg = json.load(open("DIR/config.json"))',
        'overlay = {**cfg["pretrained_cfg"], "file": "DIR/model.safetensors"}',
        'tower = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **cfg["model_args"])',
        "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=tower))",
        "```",
        "",
        'timm with `local-dir:` names (1.0.31, not 1.0.3) also reads the folder: `timm.create_model("local-dir:DIR", pretrained=True)`.',
        "",
        f"RETFound's fine-tuning (`main_finetune.py --finetune DIR/{RETFOUND_CHECKPOINT}`) reads",
        '`torch.load(path)["model"]`, drops a head of another shape, interpolates the position embeddings to',
        "its input size and loads the rest with `strict=False`; its model must be this architecture, e.g.",
        f'`timm.create_model("{arch}", num_classes=NB_CLASSES, global_pool="avg"{extra})` for its default',
        'global pooling (then `fc_norm` and the head are the new weights), or `global_pool="token"` for the',
        "class token the tower was trained with.",
    ]
