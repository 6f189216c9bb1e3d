"""One optimiser step's forward and backward, with or without splitting the batch into chunks.

Plain gradient accumulation would shrink the contrastive batch: each micro-batch would only see its own
negatives. With ``chunks > 1`` we keep every negative the way GradCache does: embed every chunk without a
graph, compute the loss once on all the features, then re-run each chunk with a graph and push the
feature gradients through it. The result equals the gradient of one big batch; only activations for
one chunk are alive at a time. Dropout and other randomness replay exactly because each chunk's RNG
state is recorded on the first pass and restored on the second.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils._pytree import tree_flatten, tree_unflatten

from retclip_dist.loss import TripartiteLoss
from retclip_dist.model.retclip import RetClipOutput

# The model's output in, (total loss, {level: detached loss}) out.
LossFn = Callable[[RetClipOutput], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def output_loss(loss: TripartiteLoss) -> LossFn:
    """The model-to-loss contract, field by field: each field of RetClipOutput is the loss argument of
    the same name, so reordering either side cannot silently swap features and scales."""

    def loss_of(
        out: RetClipOutput, report_hash: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return loss(
            image=out.image,
            text=out.text,
            logit_scale=out.logit_scale,
            logit_bias=out.logit_bias,
            report_hash=report_hash,
        )

    return loss_of


def split_batch(batch: dict[str, Any], chunks: int) -> list[dict[str, Any]]:
    """Split every per-sample entry of a batch along dim 0 into ``chunks`` equal parts."""
    size = len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
    if size % chunks:
        raise ValueError(f"batch of {size} does not split into {chunks} equal chunks (train.accum_steps)")
    step = size // chunks
    parts: list[dict[str, Any]] = [{} for _ in range(chunks)]
    for key, value in batch.items():
        for i in range(chunks):
            parts[i][key] = value[i * step : (i + 1) * step] if len(value) == size else value
    return parts


@contextlib.contextmanager
def _replay_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _is_per_sample(t: Any) -> bool:
    # Features are [batch, dim]; logit scales and biases are scalars or one value per level.
    return isinstance(t, torch.Tensor) and t.ndim >= 2


def forward_backward(
    model: torch.nn.Module, batch: dict[str, Any], loss_fn: LossFn, accelerator: Accelerator, chunks: int = 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, loss and backward for one rank's batch; returns the detached loss and its parts."""
    if chunks == 1:
        with accelerator.autocast():
            out = model(batch)
        total, parts = loss_fn(out)
        accelerator.backward(total)
        return total.detach(), {k: v.detach() for k, v in parts.items()}

    device = accelerator.device
    pieces = split_batch(batch, chunks)
    states, flat_outs = [], []
    spec = None
    with torch.no_grad():
        for piece in pieces:
            states.append(_rng_state(device))
            with accelerator.autocast():
                leaves, spec = tree_flatten(model(piece))
            flat_outs.append(leaves)
    cached: list[Any] = []
    for i, first in enumerate(flat_outs[0]):
        if not isinstance(first, torch.Tensor):
            cached.append(first)
            continue
        joined = torch.cat([o[i] for o in flat_outs]) if _is_per_sample(first) else first
        # The loss runs in at least float32 even when the towers ran in bf16 under autocast.
        cached.append(
            joined.detach().to(torch.promote_types(joined.dtype, torch.float32)).requires_grad_(True)
        )
    total, parts = loss_fn(tree_unflatten(cached, spec))
    total.backward()
    grads = [
        (c.grad if c.grad is not None else torch.zeros_like(c)) if isinstance(c, torch.Tensor) else None
        for c in cached
    ]

    rows = len(flat_outs[0][next(i for i, t in enumerate(flat_outs[0]) if _is_per_sample(t))])
    for n, piece in enumerate(pieces):
        last = n == chunks - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync, _replay_rng(states[n], device):
            with accelerator.autocast():
                leaves, _ = tree_flatten(model(piece))
            surrogate = torch.zeros((), device=device)
            for leaf, grad in zip(leaves, grads, strict=True):
                if grad is None:
                    continue
                if _is_per_sample(leaf):
                    surrogate = surrogate + (leaf.to(grad.dtype) * grad[n * rows : (n + 1) * rows]).sum()
                elif last:
                    # Scales are shared by every chunk; their gradient enters once.
                    surrogate = surrogate + (leaf.to(grad.dtype) * grad).sum()
            accelerator.backward(surrogate)
    return total.detach(), {k: v.detach() for k, v in parts.items()}
