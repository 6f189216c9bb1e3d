"""Single-process checks of the contrastive maths; the multi-process proof is in test_loss_dist.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from retclip_dist.loss import (
    TripartiteLoss,
    contrastive_loss,
    gather_features,
    infonce_local,
    sigmoid_local,
    sigmoid_loss,
)

IMAGE_2X2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
TEXT_2X2 = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def _full_infonce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(image.shape[0])
    logits = scale * image @ text.T
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_infonce_2x2_matches_hand_computation():
    # logits = 2 * [[1, .6], [0, .8]]: each CE row is log(1 + e^-(margin)) with margins .8, 1.6 (images)
    # and 2, .4 (texts); the loss is their mean.
    loss = contrastive_loss(IMAGE_2X2, TEXT_2X2, torch.tensor(2.0, dtype=torch.float64))
    expected = sum(math.log1p(math.exp(-m)) for m in (0.8, 1.6, 2.0, 0.4)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(0.2987361675697604, abs=1e-12)


def test_sigmoid_2x2_matches_hand_computation():
    # logits = 2 * [[1, .6], [0, .8]] - 1 = [[1, .2], [-1, .6]]; diagonal positive, rest negative.
    loss = sigmoid_loss(
        IMAGE_2X2, TEXT_2X2, torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    )
    softplus_neg = [math.log1p(math.exp(-z)) for z in (1.0, -0.2, 1.0, 0.6)]
    assert loss.item() == pytest.approx(sum(softplus_neg) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.9310750974519615, abs=1e-12)


def test_gather_without_process_group_is_identity():
    x = torch.randn(3, 4)
    assert gather_features(x) is x


def test_batch_of_one():
    image, text = _unit(1, 8, seed=0), _unit(1, 8, seed=1)
    scale = torch.tensor(90.0, dtype=torch.float64)
    # A single column leaves nothing to contrast against: the softmax is 1 and the loss exactly 0.
    assert contrastive_loss(image, text, scale).item() == 0.0
    bias = torch.tensor(-10.0, dtype=torch.float64)
    expected = -F.logsigmoid(scale * (image @ text.T).squeeze() + bias)
    assert sigmoid_loss(image, text, scale, bias).item() == pytest.approx(expected.item(), abs=1e-12)


def test_local_rows_reassemble_the_global_infonce_loss_and_gradient():
    # Simulate 4 ranks in one process: the mean of the per-rank local losses is the full-matrix loss,
    # and the summed per-rank gradients are world_size times the full-matrix gradient (DDP divides).
    world, b, dim = 4, 3, 8
    image = _unit(world * b, dim, seed=2).requires_grad_()
    text = _unit(world * b, dim, seed=3).requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64)
    full = _full_infonce(image, text, scale)
    full_grad = torch.autograd.grad(full, (image, text))
    local = [
        infonce_local(image[k * b : (k + 1) * b], text[k * b : (k + 1) * b], image, text, scale, k * b)
        for k in range(world)
    ]
    assert torch.stack(local).mean().item() == pytest.approx(full.item(), abs=1e-12)
    summed_grad = torch.autograd.grad(sum(local), (image, text))
    for got, want in zip(summed_grad, full_grad, strict=True):
        torch.testing.assert_close(got / world, want, rtol=0, atol=1e-12)


def test_local_rows_reassemble_the_global_sigmoid_loss():
    world, b, dim = 3, 2, 8
    image, text = _unit(world * b, dim, seed=4), _unit(world * b, dim, seed=5)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    full = sigmoid_local(image, text, scale, bias, 0)
    local = [sigmoid_local(image[k * b : (k + 1) * b], text, scale, bias, k * b) for k in range(world)]
    assert torch.stack(local).mean().item() == pytest.approx(full.item(), abs=1e-12)


def test_tripartite_sums_levels_each_with_its_own_scale():
    image = [_unit(5, 8, seed=10 + i) for i in range(3)]
    text = [_unit(5, 8, seed=20 + i) for i in range(3)]
    scales = [torch.tensor(s, dtype=torch.float64) for s in (90.0, 10.0, 1.0)]
    total, parts = TripartiteLoss("infonce")(image, text, scales)
    expected = {
        level: _full_infonce(image[i], text[i], scales[i])
        for i, level in enumerate(("patient", "left", "right"))
    }
    for level, value in expected.items():
        assert parts[level].item() == pytest.approx(value.item(), abs=1e-12)
    assert total.item() == pytest.approx(sum(v.item() for v in expected.values()), abs=1e-12)
    assert len({round(v.item(), 6) for v in parts.values()}) == 3


def test_tripartite_sigmoid_uses_biases():
    image = [_unit(4, 8, seed=30 + i) for i in range(3)]
    text = [_unit(4, 8, seed=40 + i) for i in range(3)]
    scales = [torch.tensor(10.0, dtype=torch.float64)] * 3
    biases = [torch.tensor(b, dtype=torch.float64) for b in (-10.0, -5.0, 0.0)]
    total, parts = TripartiteLoss("sigmoid")(image, text, scales, biases)
    for i, level in enumerate(("patient", "left", "right")):
        want = sigmoid_loss(image[i], text[i], scales[i], biases[i])
        assert parts[level].item() == pytest.approx(want.item(), abs=1e-12)
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()), abs=1e-12)


def test_tripartite_rejects_bad_setup():
    with pytest.raises(ValueError, match="unknown kind 'clip'"):
        TripartiteLoss("clip")
    features = [_unit(2, 4, seed=i) for i in range(3)]
    with pytest.raises(ValueError, match="needs logit_bias"):
        TripartiteLoss("sigmoid")(features, features, [torch.tensor(1.0)] * 3)
