"""``timm``: any timm architecture (``arch``) with a local state dict; image-only.

The file must hold exactly the architecture's tensors (its classifier, named by the model's pretrained
config, is dropped: the benchmark adds its own heads). Preprocessing is what timm states for the model
(resolve_data_config: mean, std, filter, crop_pct), at the tower's own input size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config

from retclip_dist.config import ConfigError
from retclip_dist.eval.benchmark.suite import ModelSpec
from retclip_dist.eval.models.base import REMEDY, weights_file
from retclip_dist.eval.models.timm_tower import TimmTowerModel, create_tower
from retclip_dist.model.config import ImageInput
from retclip_dist.model.towers import tower_input_size
from retclip_dist.model.weights import load_strict, read_state_dict

# timm's crop_mode -> ImageInput.resize ("border" crops inside a border and has no counterpart).
_CROP_MODES = {"center": "shortest", "squash": "squash"}


@dataclass
class TimmOptions:
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (img_size...)


def timm_input(tower: torch.nn.Module, source: str) -> ImageInput:
    """The model's preprocessing as timm states it, at the size the built tower takes."""
    cfg = resolve_data_config({}, model=tower)
    size = tower_input_size(tower) or int(cfg["input_size"][-1])
    mode = cfg.get("crop_mode", "center")
    if mode not in _CROP_MODES or cfg["interpolation"] not in ("bicubic", "bilinear"):
        raise ValueError(
            f"{source}: timm preprocessing crop_mode {mode!r} / interpolation {cfg['interpolation']!r} "
            f"is not supported (crop modes {sorted(_CROP_MODES)}, bicubic or bilinear)"
        )
    return ImageInput(
        size,
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        cfg["interpolation"],
        resize=_CROP_MODES[mode],
        crop_pct=float(cfg["crop_pct"]),
    )


class TimmModel(TimmTowerModel):
    kind = "timm"
    Options = TimmOptions

    @classmethod
    def files(cls, spec: ModelSpec, options: Any, where: str) -> list[Path]:
        if not spec.arch:
            raise ConfigError(
                f"{where}.arch: empty; the timm kind needs a timm model name (timm.list_models())"
            )
        if not timm.is_model(spec.arch):
            raise ConfigError(f"{where}.arch: {spec.arch!r} is not a timm model name")
        return [weights_file(spec, where)]

    @classmethod
    def load(cls, spec: ModelSpec, options: Any, device: torch.device) -> TimmModel:
        tower = create_tower(spec.arch, **options.kwargs)
        classifier = tower.pretrained_cfg.get("classifier") or ()
        unused = [f"{c}.*" for c in ([classifier] if isinstance(classifier, str) else classifier)]
        state = read_state_dict(spec.path)
        layout = f"timm {spec.arch}"
        load_strict(
            tower, state, tower=layout, source=spec.path, field="path", may_leave=unused, remedy=REMEDY
        )
        return cls(tower, timm_input(tower, spec.path), f"timm {spec.arch} pooled features", device)
