"""``retfound_dinov2``: RETFound's DINOv2 checkpoints (RETFound_dinov2_meh, _shanghai), read as its
fine-tuning code does.

The checkpoint is DINOv2's ``{"teacher": state_dict}``: ``backbone.``-prefixed ViT-L/14 weights (layer
scale, no registers) beside the DINO and iBOT heads. RETFound strips the prefix, renames a SwiGLU MLP's
``w12``/``w3`` to ``fc1``/``fc2``, loads it into timm's vit_large_patch14_dinov2 at 224 px (position
embedding resampled) and classifies the class token after the final norm. Its evaluation transform is
the MAE one: ImageNet mean/std, shorter side to 256 (bicubic), centre crop 224. DINOv2 trained with
block_chunks (its default configs) names block i of chunk c ``blocks.c.i``; those are read as block i
too, where RETFound's non-strict load would leave them at random without a word.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from retclip_dist.eval.benchmark.suite import ModelSpec
from retclip_dist.eval.models.base import REMEDY, TowerOptions
from retclip_dist.eval.models.retfound_mae import SIZE, eval_input
from retclip_dist.eval.models.timm_tower import TimmTowerModel, create_tower, fit_pos_embed
from retclip_dist.model.weights import load_strict, read_state_dict

ARCH = "vit_large_patch14_dinov2"  # RETFound_dinov2 in models_vit.py (timm, img_size=224)
WRAPPERS = ("teacher", "model", "state_dict")  # DINOv2 saves the teacher; a re-saved file may not wrap it
UNUSED = ("mask_token", "dino_head.*", "ibot_head.*", "head.*")  # DINOv2's masking token and its heads
RENAMES = (("mlp.w12.", "mlp.fc1."), ("mlp.w3.", "mlp.fc2."))  # DINOv2's SwiGLU names -> timm's


# DINOv2 trained with block_chunks > 0 (its default configs) saves block i of chunk c as blocks.c.i.
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RETFound's renaming (prefix, SwiGLU names), and chunked blocks flattened to blocks.i, which
    RETFound's non-strict load would leave at their random initialisation without a word."""
    out = {}
    for key, value in state.items():
        key = _CHUNKED.sub(r"blocks.\1.", key.removeprefix("backbone."))
        for old, new in RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


class RetFoundDinov2(TimmTowerModel):
    kind = "retfound_dinov2"
    Options = TowerOptions

    @classmethod
    def load(cls, spec: ModelSpec, options: Any, device: torch.device) -> RetFoundDinov2:
        size = options.img_size or SIZE
        tower = create_tower(ARCH, img_size=size, **options.timm_kwargs)
        state = _timm_names(read_state_dict(spec.path, WRAPPERS))
        fit_pos_embed(state, tower, spec.path)
        layout = "RETFound DINOv2 (teacher backbone)"
        load_strict(
            tower, state, tower=layout, source=spec.path, field="path", may_leave=UNUSED, remedy=REMEDY
        )
        return cls(tower, eval_input(size), "class token after the final norm", device)
