"""``retfound_green``: RETFound-Green (justinengelmann/RETFound_Green, retfoundgreen_statedict.pth).

The weights are a plain state dict of timm's vit_small_patch14_reg4_dinov2 at 392 px without a classifier;
its README switches the pooling to the average of the patch tokens (after the final norm) and feeds images
resized to 392 x 392 (torchvision v2, bilinear with antialias) normalised with mean and std 0.5.
"""

from __future__ import annotations

from typing import Any

import torch

from retclip_dist.eval.benchmark.suite import ModelSpec
from retclip_dist.eval.models.base import REMEDY, TowerOptions
from retclip_dist.eval.models.timm_tower import TimmTowerModel, create_tower
from retclip_dist.model.config import ImageInput
from retclip_dist.model.weights import load_strict, read_state_dict

ARCH = "vit_small_patch14_reg4_dinov2"
SIZE = 392


class RetFoundGreen(TimmTowerModel):
    kind = "retfound_green"
    Options = TowerOptions

    @classmethod
    def load(cls, spec: ModelSpec, options: Any, device: torch.device) -> RetFoundGreen:
        size = options.img_size or SIZE
        tower = create_tower(ARCH, img_size=size, **options.timm_kwargs)
        layout = f"RETFound-Green (timm {ARCH})"
        state = read_state_dict(spec.path)
        load_strict(tower, state, tower=layout, source=spec.path, field="path", remedy=REMEDY)
        tower.reset_classifier(0, "avg")  # built with the class-token pooling its weights were saved from
        image = ImageInput(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", resize="squash")
        return cls(tower, image, "mean of the patch tokens after the final norm", device)
