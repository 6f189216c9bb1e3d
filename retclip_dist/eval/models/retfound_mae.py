"""``retfound_mae``: RETFound's MAE checkpoints (rmaphoh/RETFound_MAE), read as its fine-tuning code does.

The checkpoint is MAE's ``{"model": state_dict, ...}`` of a ViT-L/16 (embed 1024, 24 blocks, 16 heads,
qkv bias, LayerNorm eps 1e-6: timm's vit_large_patch16_224). RETFound's models_vit with global_pool (its
default) averages the patch tokens (not the class token) and normalises them with ``fc_norm``, a norm
its fine-tuning creates fresh; the MAE decoder, mask token and final ``norm`` are not used. Its
evaluation transform (util/datasets.py): ImageNet mean/std, for inputs up to 224 px the shorter side
resized to input/0.875 (bicubic) and centre-cropped.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from retclip_dist.eval.benchmark.suite import ModelSpec
from retclip_dist.eval.models.base import REMEDY, TowerOptions
from retclip_dist.eval.models.timm_tower import TimmTowerModel, create_tower, fit_pos_embed
from retclip_dist.model.config import ImageInput
from retclip_dist.model.weights import load_strict, read_state_dict

ARCH = "vit_large_patch16_224"  # RETFound_mae in models_vit.py
SIZE = 224  # the input size of RETFound's README fine-tuning command
UNUSED = ("mask_token", "decoder_*", "norm.*", "head.*")  # MAE's decoder and final norm; a task head
FRESH = ("fc_norm.*",)  # created by RETFound's fine-tuning, never in the pretrained checkpoint


def eval_input(size: int) -> ImageInput:
    """RETFound's evaluation transform (util/datasets.py build_transform)."""
    return ImageInput(
        size,
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        "bicubic",
        resize="shortest",
        crop_pct=224 / 256 if size <= 224 else 1.0,
    )


class RetFoundMae(TimmTowerModel):
    kind = "retfound_mae"
    Options = TowerOptions

    @classmethod
    def load(cls, spec: ModelSpec, options: Any, device: torch.device) -> RetFoundMae:
        size = options.img_size or SIZE
        tower = create_tower(ARCH, global_pool="avg", img_size=size, **options.timm_kwargs)
        state = read_state_dict(spec.path)
        fit_pos_embed(state, tower, spec.path)
        load_strict(
            tower, state, tower="RETFound MAE (ViT encoder)", source=spec.path, field="path",
            may_leave=UNUSED, may_lack=FRESH, remedy=REMEDY,
        )  # fmt: skip
        return cls(
            tower, eval_input(size), "mean of the patch tokens + fc_norm (RETFound's global pool)", device
        )
