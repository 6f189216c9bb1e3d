"""Where each rank's time goes, and which rank holds the others up.

A run is as fast as its slowest rank: every collective waits for it. ``StepClock`` splits one rank's loop
into time blocked on its loader (``data_wait``) and time in the step (``step``: from the batch in hand to
the end of the per-step agreement, which syncs the device). A rank that waits in a collective for a
slower one counts that wait as step time: a slow loader shows as its rank's large ``data_wait`` and the
other ranks' large ``step`` (they wait for it in the gradient all-reduce), a slow device as a large
``step`` everywhere. So read ``data_wait_ms_max_rank`` first. ``step_timing`` is the one small all-gather
per logged step; every rank must call it at the same steps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from accelerate import Accelerator

T = TypeVar("T")
_IMPORTED = time.monotonic()  # where the process's own start time cannot be read


def process_age_s() -> float:
    """Seconds since this process started: Linux's own count (interpreter start and imports included),
    elsewhere since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            # Fields after the command name (which may hold spaces); starttime is field 22 of the whole.
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def slowest(acc: Accelerator, seconds: float) -> float:
    """The largest of every rank's ``seconds`` (an all-gather: every rank must call it)."""
    return float(gather_rows(acc, [seconds]).max())


class StepClock:
    """One rank's data wait and step time: per window (since the last ``window()``) and since the start."""

    def __init__(self) -> None:
        self._batch_at: float | None = None
        self._wait = self._step = 0.0  # seconds in the current window
        self._steps = 0  # steps in the current window
        self.total_wait = self.total_step = 0.0  # seconds since the clock started

    def batches(self, loader: Iterable[T]) -> Iterator[T]:
        """``loader``'s items, timing how long each one kept this rank waiting (the end of the loader not
        included: that wait brings no batch)."""
        it = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self._batch_at = time.perf_counter()
            self._wait += self._batch_at - start
            self.total_wait += self._batch_at - start
            yield item

    def step_done(self) -> None:
        """The step on the last batch is over (call after the device sync, or the time is only queued)."""
        if self._batch_at is None:
            raise RuntimeError("step_done() without a batch from batches()")
        took = time.perf_counter() - self._batch_at
        self._step += took
        self.total_step += took
        self._steps += 1
        self._batch_at = None

    def window(self) -> tuple[float, float]:
        """Mean data wait and step time per step, in ms, since the last call; starts a new window."""
        n = max(self._steps, 1)
        means = (1e3 * self._wait / n, 1e3 * self._step / n)
        self._wait = self._step = 0.0
        self._steps = 0
        return means


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak memory allocated by tensors on ``device`` since the process started, in GB (1e9 bytes);
    None off CUDA, where PyTorch keeps no such count."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def gather_rows(acc: Accelerator, row: list[float]) -> torch.Tensor:
    """Every rank's ``row`` as one [world, len(row)] float64 table, rank order (one all-gather: every
    rank must call it)."""
    mine = torch.tensor([row], dtype=torch.float64, device=acc.device)
    if acc.num_processes == 1:
        return mine
    parts = [torch.empty_like(mine) for _ in range(acc.num_processes)]
    torch.distributed.all_gather(parts, mine)
    return torch.cat(parts).cpu()


def _mean_max_rank(name: str, column: torch.Tensor) -> dict[str, Any]:
    top = int(column.argmax())  # the first maximal rank on a tie
    return {name: column.mean().item(), f"{name}_max": column[top].item(), f"{name}_max_rank": top}


def step_timing(acc: Accelerator, clock: StepClock) -> dict[str, Any]:
    """The timing fields of a ``train`` record, a collective: this window's mean data wait and step time
    per step (``data_wait_ms``, ``step_ms``: means over ranks; ``_max``, ``_max_rank``: the slowest rank)
    and ``peak_mem_gb``, the largest over ranks (None off CUDA)."""
    wait_ms, step_ms = clock.window()
    peak = peak_memory_gb(acc.device)  # the same device type on every rank: None on all or on none
    table = gather_rows(acc, [wait_ms, step_ms, 0.0 if peak is None else peak])
    return {
        **_mean_max_rank("data_wait_ms", table[:, 0]),
        **_mean_max_rank("step_ms", table[:, 1]),
        "peak_mem_gb": None if peak is None else table[:, 2].max().item(),
    }


def wait_share(acc: Accelerator, clock: StepClock) -> dict[str, Any]:
    """The share of training-step time spent waiting for data since the clock started, a collective:
    ``data_wait_share`` over all ranks together, ``_max`` and ``_max_rank`` for the rank that waited most."""
    table = gather_rows(acc, [clock.total_wait, clock.total_step])
    wait, busy = table[:, 0], table[:, 0] + table[:, 1]
    shares = torch.where(busy > 0, wait / busy.clamp_min(1e-12), 0.0)
    top = int(shares.argmax())
    total = busy.sum().item()
    return {
        "data_wait_share": wait.sum().item() / total if total > 0 else 0.0,
        "data_wait_share_max": shares[top].item(),
        "data_wait_share_max_rank": top,
    }
