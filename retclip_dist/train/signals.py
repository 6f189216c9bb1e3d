"""Agree on flags across ranks: a stop signal, a non-finite loss, a long wait for one rank's work.

The stop signals are SIGTERM (preemption) and the requeue signal the launchers send ahead of a time limit
(SIGUSR2, or SIGUSR1 under ``RETCLIP_REQUEUE_SIGNAL``); ``retclip_dist.runtime.stop_signals`` is their one
home. Both mean "save and leave". Acting inside the handler would interrupt a collective half-way, so
outside setup the handler (``runtime/stop.py``) only records the request and every rank stops after the
same step.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from accelerate import Accelerator

from retclip_dist.runtime.stop import StopRequest

__all__ = ["LongWait", "StopRequest", "any_rank", "sum_over_ranks"]


def any_rank(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """For each flag, whether it is set on at least one rank (one small collective for all of them)."""
    t = torch.tensor([float(f) for f in flags], device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def sum_over_ranks(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over all ranks (for logging global means and totals)."""
    out = values.detach().clone()
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


class LongWait:
    """A barrier for ranks that wait while one rank works alone: rank 0 probing, writing a checkpoint or
    the final model. Its own gloo group waits ``timeout_s`` (stall plus collective timeout, as the
    watchdog of a waiting rank does), so such a wait never runs into the process group's shorter
    ``train.collective_timeout_s``; the working rank's own watchdog bounds the work itself."""

    def __init__(self, accelerator: Accelerator, timeout_s: float) -> None:
        self.group = None
        if accelerator.num_processes > 1:
            timeout = datetime.timedelta(seconds=timeout_s)
            self.group = dist.new_group(backend="gloo", timeout=timeout)

    def __call__(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)
