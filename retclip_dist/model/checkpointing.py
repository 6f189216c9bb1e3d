"""Selective activation checkpointing: recompute only chosen transformer blocks of the towers in backward.

A chosen block's instance ``forward`` is replaced by one that runs the class forward under
``torch.utils.checkpoint`` (non-reentrant). Module names, parameters and state dicts stay exactly as they
were, so optimiser groups, layer-wise decay, freezing and checkpoints see the same model.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward
    # Outside training (evaluation, no_grad) there is nothing to recompute: run the block as it is.
    if not (self.training and torch.is_grad_enabled()):
        return forward(self, *args, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def set_block_checkpointing(block: nn.Module, enable: bool) -> None:
    """Recompute ``block`` in backward (enable) or keep its activations (disable); idempotent."""
    if enable:
        # A bound method (not a closure) survives copy.deepcopy and pickling with its own module.
        block.forward = types.MethodType(_checkpointed_forward, block)
    else:
        block.__dict__.pop("forward", None)


def is_block_checkpointed(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _checkpointed_forward


def tower_blocks(tower: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a tower: timm ViT ``blocks`` or a HF BERT-like ``encoder.layer``;
    empty for a tower without either."""
    blocks = getattr(tower, "blocks", None)
    if blocks is None:
        blocks = getattr(getattr(tower, "encoder", None), "layer", None)
    return list(blocks) if blocks is not None else []


def selected(index: int) -> bool:
    """Selective mode's choice: every other block, starting with the first."""
    return index % 2 == 0
