"""Image-only models whose tower is a timm model: shared by the RETFound adapters and the timm adapter."""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from retclip_dist.eval.models.base import BenchModel
from retclip_dist.model.config import ImageInput

log = logging.getLogger(__name__)


def create_tower(arch: str, **kwargs: Any) -> nn.Module:
    """timm.create_model without any download (pretrained=False) and without a classifier."""
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def fit_pos_embed(state: dict[str, Tensor], tower: nn.Module, source: str) -> None:
    """Resample a ViT checkpoint's position embedding to the tower's patch grid (bicubic, as RETFound's
    interpolate_pos_embed), when only the number of positions differs; anything else is left for
    load_strict to report."""
    old = state.get("pos_embed")
    own = getattr(tower, "pos_embed", None)
    if old is None or own is None or old.shape == own.shape or old.shape[-1] != own.shape[-1]:
        return
    prefix = 0 if getattr(tower, "no_embed_class", False) else tower.num_prefix_tokens
    grid = list(tower.patch_embed.grid_size)
    state["pos_embed"] = resample_abs_pos_embed(
        old, new_size=grid, num_prefix_tokens=prefix, interpolation="bicubic", antialias=False
    )
    log.info("%s: position embedding resampled from %s to %s", source, tuple(old.shape), tuple(own.shape))


class TimmTowerModel(BenchModel):
    """An image-only model: the probe feature is the timm tower's pooled output."""

    def __init__(
        self, tower: nn.Module, image_input: ImageInput, features: str, device: torch.device
    ) -> None:
        self.tower = tower.to(device).eval()
        self.image_input = image_input
        self.width = int(tower.num_features)
        self.features = f"{features} ({self.width}-d)"
        self.device = device
