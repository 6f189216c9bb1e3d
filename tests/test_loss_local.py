"""``loss.gather: false`` (the release's --skip-aggregate) on 2 gloo ranks: each rank scores only its own
batch, and DDP's gradient average optimises the mean of the per-rank local losses.

Each rank computes every rank's local loss itself in one process (no collective), so the expectation is
independent of the code under test's distributed path. float64, checked to 1e-10. One spawn, two
processes, one thread each: a few seconds.
"""

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from retclip_dist.loss import TripartiteLoss

WORLD, LOCAL_ROWS, DIM, ATOL = 2, 4, 8, 1e-10


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _levels(x: torch.Tensor) -> list[torch.Tensor]:
    return [F.normalize(x[:, i], dim=-1) for i in range(3)]


def _check(rank: int, kind: str, solo: dist.ProcessGroup) -> None:
    inputs = _randn(WORLD * LOCAL_ROWS, 2, 3, DIM, seed=1)  # [rows, image/text, level, DIM]
    scales = [torch.tensor(s, dtype=torch.float64) for s in (20.0, 5.0, 1.0)]
    biases = [torch.tensor(b, dtype=torch.float64) for b in (-10.0, -3.0, 0.5)] if kind == "sigmoid" else None
    torch.manual_seed(0)
    model = nn.Linear(DIM, DIM, dtype=torch.float64)
    reference = copy.deepcopy(model)

    def loss_of(net: nn.Module, rows: torch.Tensor, loss_fn: TripartiteLoss) -> torch.Tensor:
        out = net(rows)
        return loss_fn(_levels(out[:, 0]), _levels(out[:, 1]), scales, biases)[0]

    # Expected: every rank's local loss, computed here without any collective (a one-process group).
    slices = [inputs[k * LOCAL_ROWS : (k + 1) * LOCAL_ROWS] for k in range(WORLD)]
    per_rank = [loss_of(reference, s, TripartiteLoss(kind, solo)) for s in slices]
    mean = torch.stack(per_rank).mean()
    mean.backward()

    ddp = DistributedDataParallel(model)
    local = loss_of(ddp, slices[rank], TripartiteLoss(kind, gather=False))
    torch.testing.assert_close(local.detach(), per_rank[rank].detach(), rtol=0, atol=ATOL)
    summed = local.detach().clone()
    dist.all_reduce(summed)
    torch.testing.assert_close(summed / WORLD, mean.detach(), rtol=0, atol=ATOL)
    local.backward()  # DDP averages: the gradient of the mean of the per-rank local losses
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=ATOL)
    # And it is a different objective from the global batch's (which gather=True computes exactly).
    global_loss = loss_of(reference, inputs, TripartiteLoss(kind, solo))
    assert abs(global_loss.item() - mean.item()) > 1e-3


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    solo, _ = dist.new_subgroups(group_size=1)
    try:
        for kind in ("infonce", "sigmoid"):
            _check(rank, kind, solo)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_local_negatives_on_two_ranks_equal_the_mean_of_per_rank_losses(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # fork, not spawn: the children inherit the imported torch instead of importing it again (seconds each).
    mp.start_processes(_worker, args=(port,), nprocs=WORLD, join=True, start_method="fork")


def test_local_negatives_in_one_process_use_no_collective_and_no_offset():
    image = [F.normalize(_randn(4, DIM, seed=i), dim=-1) for i in range(3)]
    text = [F.normalize(_randn(4, DIM, seed=10 + i), dim=-1) for i in range(3)]
    scales = [torch.tensor(10.0, dtype=torch.float64)] * 3
    total, parts = TripartiteLoss("infonce", gather=False)(image, text, scales)
    exact, _ = TripartiteLoss("infonce")(image, text, scales)
    assert torch.equal(total, exact)  # one process: local and global negatives are the same batch
    assert set(parts) == {"patient", "left", "right"}
