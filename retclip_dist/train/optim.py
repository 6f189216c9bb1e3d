"""AdamW with CLIP's parameter groups, locked towers and per-tower/per-layer lr, and the lr schedule.

Every parameter belongs to one part of the model (``TOWERS``): "vision" is the timm tower with the shared
projection ``image_proj`` (CLIP's ``visual.proj``, loaded with the tower's weights), "text" the BERT, and
"heads" the six projection heads and the logit scales/biases. A parameter's learning rate is

    lr(step) * lr_scale[part] * layer_decay ** (depth_part + 1 - layer)

where ``layer`` counts as BEiT and RETFound do: 0 for the embeddings (patch/position/class tokens, the
pre-norm; BERT's embeddings), i + 1 for block i, depth + 1 for what sits on top (final norm, projection,
BERT's pooler). Heads have no layers (exponent 0). Frozen parts are set to ``requires_grad=False`` and
left out of the optimiser, so they get neither updates, weight decay nor optimiser state.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from torch import nn

from retclip_dist.train.config import TrainSection

# The vision tower's LayerNorm gains under timm names (norm_pre, blocks.N.norm1/norm2, norm): the ones the
# release's filter exempts through their OpenAI names ln_pre, ln_1, ln_2, ln_post.
_VISION_NORM = re.compile(r"visual\.(blocks\.\d+\.)?norm[^.]*\.weight")
_VISION_BLOCK = re.compile(r"visual\.blocks\.(\d+)\.")
_TEXT_LAYER = re.compile(r"text\.encoder\.layer\.(\d+)\.")
# What comes before the first block in timm's ViTs: tokens, positions, patch embedding, CLIP's pre-norm.
_VISION_EMBED = re.compile(r"visual\.(cls_token|reg_token|pos_embed|patch_embed\.|norm_pre\.)")


def exempt_from_decay(name: str, param: nn.Parameter, rule: Literal["1d", "release"] = "1d") -> bool:
    """Whether a parameter skips weight decay under the rule (TrainSection.no_decay says why each exists)."""
    if "logit_" in name or name.endswith(".bias"):
        return True
    if rule == "release":
        return _VISION_NORM.fullmatch(name) is not None
    return param.ndim < 2


# The parts train.freeze and train.lr_scale name.
TOWERS = ("vision", "text", "heads")


def tower_of(name: str) -> str:
    """Which of TOWERS a RetClip parameter name belongs to."""
    if name.startswith(("visual.", "image_proj.")):
        return "vision"
    if name.startswith("text."):
        return "text"
    return "heads"


def _depths(names: list[str]) -> dict[str, int]:
    """Blocks per tower, read off the parameter names (timm's blocks.N, BERT's encoder.layer.N)."""
    depths = {"vision": 0, "text": 0, "heads": 0}
    for name in names:
        block = _VISION_BLOCK.match(name) or _TEXT_LAYER.match(name)
        if block:
            tower = tower_of(name)
            depths[tower] = max(depths[tower], int(block.group(1)) + 1)
    return depths


def layer_of(name: str, depth: int) -> int:
    """BEiT/RETFound layer id inside a tower of ``depth`` blocks: 0 embeddings, i + 1 block i, depth + 1 top."""
    block = _VISION_BLOCK.match(name) or _TEXT_LAYER.match(name)
    if block:
        return int(block.group(1)) + 1
    if _VISION_EMBED.match(name) or name.startswith("text.embeddings."):
        return 0
    return depth + 1


def lr_multiplier(name: str, depths: dict[str, int], lr_scale: dict[str, float], layer_decay: float) -> float:
    """The factor on the scheduled lr for one parameter (the formula in the module docstring)."""
    tower = tower_of(name)
    exponent = 0 if tower == "heads" else depths[tower] + 1 - layer_of(name, depths[tower])
    return lr_scale.get(tower, 1.0) * layer_decay**exponent


def freeze_(model: nn.Module, towers: list[str]) -> int:
    """Lock the named parts (``requires_grad=False``) before the optimiser and DDP see the model."""
    frozen = 0
    for name, param in model.named_parameters():
        if tower_of(name) in towers:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def param_groups(
    model: nn.Module,
    weight_decay: float,
    rule: Literal["1d", "release"] = "1d",
    lr_scale: dict[str, float] | None = None,
    layer_decay: float = 1.0,
) -> list[dict]:
    """AdamW groups of the trainable parameters, one per (weight decay, lr multiplier).

    With neither ``lr_scale`` nor ``layer_decay`` that is two groups: decayed parameters and the exempt
    ones (biases, scales, and norms per ``rule``). Each group's ``lr_scale`` is applied by ``set_lr``.
    """
    named = list(model.named_parameters())
    depths = _depths([name for name, _ in named])
    groups: dict[tuple[float, float], dict] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        decay = 0.0 if exempt_from_decay(name, param, rule) else weight_decay
        scale = lr_multiplier(name, depths, lr_scale or {}, layer_decay)
        group = groups.setdefault((-decay, -scale), {"params": [], "weight_decay": decay, "lr_scale": scale})
        group["params"].append(param)
    # Decayed before exempt, then by falling multiplier: a fixed order keeps optimiser state dicts stable.
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: TrainSection, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel is CUDA-only; on CPU it would raise, so it is chosen by where the weights live.
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.no_decay, cfg.lr_scale, cfg.layer_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=device.type == "cuda",
    )


def lr_at(step: int, total_steps: int, cfg: TrainSection) -> float:
    """Linear warmup to ``cfg.lr``, then cosine to zero (or constant). ``step`` counts from 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr times each group's multiplier (train.lr_scale, train.layer_decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
