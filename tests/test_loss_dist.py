"""Proof that the all-gather losses are exact: N gloo processes versus one process on the global batch.

Every rank builds the same global batch and the same single-process reference from fixed seeds, runs its
own shard through the distributed path, and asserts agreement itself; a failed assertion in any rank
fails the spawn and so the test. float64 throughout, so agreement is checked to 1e-10.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from retclip_dist.loss import TripartiteLoss, gather_features

LOCAL_ROWS = 3
DIM = 8
ATOL = 1e-10


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _local(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[rank * LOCAL_ROWS : (rank + 1) * LOCAL_ROWS]


def _check_features(rank: int, world: int, kind: str, solo: dist.ProcessGroup) -> None:
    """Loss values and feature/scale/bias gradients of all three levels."""
    rows = world * LOCAL_ROWS
    image = F.normalize(_randn(rows, 3, DIM, seed=1), dim=-1)
    text = F.normalize(_randn(rows, 3, DIM, seed=2), dim=-1)
    scales = torch.tensor([20.0, 5.0, 1.0], dtype=torch.float64)
    biases = torch.tensor([-10.0, -3.0, 0.5], dtype=torch.float64)

    def run(img: torch.Tensor, txt: torch.Tensor, loss_fn: TripartiteLoss):
        img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s, b = scales.clone().requires_grad_(), biases.clone().requires_grad_()
        bias = b.unbind() if kind == "sigmoid" else None
        total, parts = loss_fn(img.unbind(1), txt.unbind(1), s.unbind(), bias)
        total.backward()
        return total.detach(), parts, img.grad, txt.grad, s.grad, b.grad

    # The one-rank group makes the reference the plain single-process computation on the whole batch.
    ref_total, ref_parts, ref_img_g, ref_txt_g, ref_s_g, ref_b_g = run(
        image, text, TripartiteLoss(kind, solo)
    )
    total, parts, img_g, txt_g, s_g, b_g = run(_local(image, rank), _local(text, rank), TripartiteLoss(kind))
    assert ref_total.item() > 0.1
    _close(_mean_over_ranks(total), ref_total, f"{kind} total loss")
    for level, value in parts.items():
        _close(_mean_over_ranks(value), ref_parts[level], f"{kind} {level} loss")
    # Feature gradients come back world-size times the global ones (see the retclip_dist.loss docstring).
    _close(img_g / world, _local(ref_img_g, rank), f"{kind} image feature grad")
    _close(txt_g / world, _local(ref_txt_g, rank), f"{kind} text feature grad")
    _close(_mean_over_ranks(s_g), ref_s_g, f"{kind} logit scale grad")
    if kind == "sigmoid":
        _close(_mean_over_ranks(b_g), ref_b_g, "sigmoid logit bias grad")


class LinearClip(nn.Module):
    """Linear image and text encoders with three projection levels and learnable scales and biases."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.image = nn.Linear(5, 3 * DIM)
        self.text = nn.Linear(7, 3 * DIM)
        self.log_scale = nn.Parameter(torch.tensor([2.0, 1.0, 0.5]))
        # Only created when used: DDP never reduces a bucket holding a parameter without a gradient.
        self.bias = nn.Parameter(torch.tensor([-4.0, -1.0, 0.0])) if kind == "sigmoid" else None

    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        image = F.normalize(self.image(images).view(-1, 3, DIM), dim=-1)
        text = F.normalize(self.text(texts).view(-1, 3, DIM), dim=-1)
        bias = None if self.bias is None else self.bias.unbind()
        return image.unbind(1), text.unbind(1), self.log_scale.exp().unbind(), bias


def _assert_ddp_matches_reference(
    model: nn.Module, inputs: tuple, local_inputs: tuple, loss_fn, solo: dist.ProcessGroup, what: str
) -> None:
    """Parameter gradients of DDP on the shards equal those of one process on the global batch."""
    reference = copy.deepcopy(model)
    ref_loss = loss_fn(reference(*inputs), solo)
    ref_loss.backward()
    ddp = DistributedDataParallel(model)
    loss = loss_fn(ddp(*local_inputs), None)
    loss.backward()
    _close(_mean_over_ranks(loss), ref_loss.detach(), f"{what} loss")
    params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        _close(param.grad, params[name].grad, f"{what} grad of {name}")


def _check_linear_model(rank: int, world: int, kind: str, solo: dist.ProcessGroup) -> None:
    torch.manual_seed(0)
    model = LinearClip(kind).double()
    images, texts = _randn(world * LOCAL_ROWS, 5, seed=3), _randn(world * LOCAL_ROWS, 7, seed=4)

    def loss_fn(out, group):
        return TripartiteLoss(kind, group)(*out)[0]

    local = (_local(images, rank), _local(texts, rank))
    _assert_ddp_matches_reference(model, (images, texts), local, loss_fn, solo, f"linear {kind}")


def _check_retclip(rank: int, world: int, vocab: str, solo: dist.ProcessGroup) -> None:
    from conftest import tiny_model_config

    from retclip_dist.model.retclip import RetClip

    torch.manual_seed(0)
    model = RetClip(tiny_model_config(vocab, image_size=16)).double()
    rows = world * LOCAL_ROWS
    gen = torch.Generator().manual_seed(5)
    batch = {
        "left": _randn(rows, 3, 16, 16, seed=6),
        "right": _randn(rows, 3, 16, 16, seed=7),
        "input_ids": torch.randint(5, 12, (rows, 6), generator=gen),
        "attention_mask": torch.ones(rows, 6, dtype=torch.long),
        "left_input_ids": torch.randint(5, 12, (rows, 6), generator=gen),
        "left_attention_mask": torch.ones(rows, 6, dtype=torch.long),
    }
    local = {k: _local(v, rank) for k, v in batch.items()}

    def loss_fn(out, group):
        return TripartiteLoss("infonce", group)(*out)[0]

    _assert_ddp_matches_reference(model, (batch,), (local,), loss_fn, solo, "RetClip")


def _check_unequal_rows_rejected(rank: int) -> None:
    with pytest.raises(ValueError, match=r"local batch sizes differ across ranks \[3, 2"):
        gather_features(torch.zeros(3 if rank == 0 else 2, DIM))


def _check_rows_compared_where_they_change(rank: int) -> None:
    # The loss compares the ranks' row counts at its first call and when the count changes, not per step.
    import retclip_dist.loss as loss_module

    real, calls = loss_module._check_equal_rows, []

    def counted(*args):
        calls.append(args[0].shape[0])
        real(*args)

    loss_module._check_equal_rows = counted
    try:
        loss_fn = TripartiteLoss("infonce")
        scales = [torch.tensor(10.0, dtype=torch.float64)] * 3
        for rows in (4, 4, 4, 2, 2):
            feats = [_randn(rows, DIM, seed=rank * 10 + i) for i in range(6)]
            loss_fn(feats[:3], feats[3:], scales)
        assert calls == [4, 2], calls
        with pytest.raises(ValueError, match=r"local batch sizes differ across ranks"):
            rows = 3 if rank == 0 else 1
            feats = [_randn(rows, DIM, seed=i) for i in range(6)]
            loss_fn(feats[:3], feats[3:], scales)
    finally:
        loss_module._check_equal_rows = real


def _worker(rank: int, world: int, port: int, vocab: str | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    solo, _ = dist.new_subgroups(group_size=1)
    try:
        for kind in ("infonce", "sigmoid"):
            _check_features(rank, world, kind, solo)
            _check_linear_model(rank, world, kind, solo)
        if vocab is not None:
            _check_retclip(rank, world, vocab, solo)
        _check_unequal_rows_rejected(rank)
        _check_rows_compared_where_they_change(rank)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, vocab: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Children read these at start-up; one thread each keeps N processes from oversubscribing the CPU.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    mp.spawn(_worker, args=(world, free_port(), vocab), nprocs=world, join=True)


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_match_single_process_including_tiny_retclip(tmp_path, monkeypatch):
    from retclip_dist.model.vocab import write_vocab

    vocab = write_vocab(tmp_path / "vocab.txt", ["left", "right", "eye", "normal", "retina", "cup", "disc"])
    _spawn(2, str(vocab), monkeypatch)


@pytest.mark.dist
@pytest.mark.slow
def test_four_ranks_match_single_process(monkeypatch):
    _spawn(4, None, monkeypatch)
