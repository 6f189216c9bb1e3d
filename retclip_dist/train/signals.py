"""Turn the stop signals into a flag the loop checks between steps; agree on flags across ranks.

The stop signals are SIGTERM (preemption) and the requeue signal the launchers send ahead of a time limit
(SIGUSR2, or SIGUSR1 under ``RETCLIP_REQUEUE_SIGNAL``); ``retclip_dist.launch.stop_signals`` is their one
home. Both mean "save and leave". Acting inside the handler would interrupt a collective half-way, so the
handler only records the request and every rank stops after the same step.
"""

from __future__ import annotations

import signal
import types

import torch
from accelerate import Accelerator

from retclip_dist.launch.stop_signals import stop_signals


class StopRequest:
    def __init__(self, signals: tuple[int, ...] | None = None) -> None:
        self.received: int | None = None
        for sig in stop_signals() if signals is None else signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.received = signum


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
