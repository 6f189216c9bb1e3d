"""The one place that reads launcher environment variables (torchrun, accelerate launch, Slurm).

The requeue signal's ``RETCLIP_REQUEUE_SIGNAL`` is read beside its signal list, in ``stop_signals.py``
(stdlib only, so the shell launchers can ask it quickly).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from accelerate.utils import InitProcessGroupKwargs


@dataclass(frozen=True)
class WorldInfo:
    rank: int  # global rank of this process
    local_rank: int  # rank within this node
    world_size: int  # processes in the job
    launched: bool  # True when a launcher started several processes (torchrun, srun)


def world_info_from_env() -> WorldInfo:
    """Read torchrun's variables, falling back to Slurm's for processes started directly by srun."""
    for rank_var, local_var, size_var in (
        ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
        ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
    ):
        if rank_var in os.environ and size_var in os.environ:
            return WorldInfo(
                rank=int(os.environ[rank_var]),
                local_rank=int(os.environ.get(local_var, 0)),
                world_size=int(os.environ[size_var]),
                launched=True,
            )
    return WorldInfo(rank=0, local_rank=0, world_size=1, launched=False)


def slurm_job() -> str | None:
    """``JOBID.RESTARTS`` of the Slurm job this process belongs to, or None outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else None


def accelerator_placement(cuda_available: bool) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator`` that place a run launched on machines without GPUs.

    ``accelerate launch`` only starts several CPU processes through its multi-GPU (torchrun) launcher,
    so CPU runs use a multi-GPU config and each process asks for CPU placement here. DeepSpeed is the
    exception: under ``cpu=True`` Accelerate skips DeepSpeed's initialisation, so instead the gloo
    backend is named explicitly; without it Accelerate lets DeepSpeed start gloo but counts one process,
    and DeepSpeed's batch-size check fails on every rank.
    """
    if cuda_available:
        return {}
    if "LOCAL_RANK" in os.environ and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}
