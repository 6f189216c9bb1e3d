"""The all-gather in the fast suite: two gloo ranks, its rows, their order, its gradient and the offsets.

tests/test_loss_dist.py proves the whole loss exact on 2 and 4 ranks but is ``slow``/``dist``, so
``make test-fast`` would let a detached or missing gather through. This test is neither: two processes,
a file store, a few tensors of known values, a 30 s timeout, forked processes, and each rank asserts on its own numbers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_gloo_ranks

from retclip_dist.loss import TripartiteLoss, contrastive_loss, gather_features

WORLD = 2
ROWS = 2  # local rows per rank
DIM = 4
TIMEOUT_S = 30


def _rows(rank: int) -> torch.Tensor:
    # Rank r holds the values 100 r + 10 i + j: every global row is recognisable after the gather.
    i = torch.arange(ROWS, dtype=torch.float64)[:, None]
    j = torch.arange(DIM, dtype=torch.float64)[None, :]
    return 100.0 * rank + 10.0 * i + j


def _check_gather(rank: int) -> None:
    x = _rows(rank).requires_grad_()
    out = gather_features(x)
    # Rank-ordered rows of both ranks, on both ranks.
    assert torch.equal(out.detach(), torch.cat([_rows(0), _rows(1)])), out
    # Each rank weights the gathered rows differently; rank r's rows then receive the sum of both ranks'
    # weights for them: rows of rank r get (1 + 2) times the weights w[r-th block].
    weights = torch.arange(WORLD * ROWS * DIM, dtype=torch.float64).view(WORLD * ROWS, DIM)
    (out * weights * (rank + 1)).sum().backward()
    mine = weights[rank * ROWS : (rank + 1) * ROWS]
    assert x.grad is not None, "the gather's output does not reach the local rows"
    assert torch.equal(x.grad, 3.0 * mine), (x.grad, mine)


def _features(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(WORLD * ROWS, DIM, generator=g, dtype=torch.float64), dim=-1)


def _check_loss_offsets(rank: int) -> None:
    """Local rows against the global batch: labels at the rank's offset, gradients N times the global."""
    image, text, scale = _features(1), _features(2), torch.tensor(7.0, dtype=torch.float64)
    # Single-process reference on the whole batch, written out: mean of both directions' cross-entropy.
    ref_img, ref_txt = image.clone().requires_grad_(), text.clone().requires_grad_()
    logits = scale * ref_img @ ref_txt.T
    labels = torch.arange(WORLD * ROWS)
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    ref.backward()

    local = slice(rank * ROWS, (rank + 1) * ROWS)
    img, txt = image[local].clone().requires_grad_(), text[local].clone().requires_grad_()
    loss = contrastive_loss(img, txt, scale)
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    torch.testing.assert_close(mean / WORLD, ref.detach(), rtol=0, atol=1e-12)
    # Without the gather's backward the other rank's loss would not reach these rows: half the gradient.
    torch.testing.assert_close(img.grad / WORLD, ref_img.grad[local], rtol=0, atol=1e-12)
    torch.testing.assert_close(txt.grad / WORLD, ref_txt.grad[local], rtol=0, atol=1e-12)

    # The tripartite loss (one stacked gather for all levels) agrees level by level.
    levels_img = [img.detach().clone().requires_grad_() for _ in range(3)]
    levels_txt = [txt.detach().clone() for _ in range(3)]
    total, parts = TripartiteLoss()(levels_img, levels_txt, [scale] * 3)
    total.backward()
    for level, value in parts.items():
        torch.testing.assert_close(value, loss.detach(), rtol=0, atol=1e-12, msg=level)
    for grad in (t.grad for t in levels_img):
        torch.testing.assert_close(grad, img.grad, rtol=0, atol=1e-12)


def _check_gather_and_offsets(rank: int) -> None:
    _check_gather(rank)
    _check_loss_offsets(rank)


def test_gather_rows_gradient_and_offsets_on_two_ranks(tmp_path):
    run_gloo_ranks(_check_gather_and_offsets, WORLD, tmp_path, TIMEOUT_S)
