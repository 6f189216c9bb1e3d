"""AdamW with the usual CLIP parameter groups, and the learning-rate schedule as a pure function."""

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


def exempt_from_decay(name: str, param: nn.Parameter, rule: Literal["1d", "release"] = "1d") -> bool:
    """Whether a parameter skips weight decay under the rule (TrainSection.no_decay says why each exists)."""
    if "logit_" in name or name.endswith(".bias"):
        return True
    if rule == "release":
        return _VISION_NORM.fullmatch(name) is not None
    return param.ndim < 2


def param_groups(model: nn.Module, weight_decay: float, rule: Literal["1d", "release"] = "1d") -> list[dict]:
    """Two AdamW groups: decayed parameters and the exempt ones (biases, scales, and norms per ``rule``)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if exempt_from_decay(name, param, rule) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainSection, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel is CUDA-only; on CPU it would raise, so it is chosen by where the weights live.
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.no_decay),
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
    for group in optimizer.param_groups:
        group["lr"] = lr
