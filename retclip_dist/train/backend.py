"""What the trainer needs from its backend (Accelerate with DDP or DeepSpeed ZeRO) beyond the plain loop.

Everything here hides one difference between the backends: DeepSpeed needs the batch sizes that
Accelerate cannot infer and does its own gradient clipping; under ZeRO its optimiser steps a float32 master
copy of each parameter (the model's copy is overwritten from it after every step), and under ZeRO-3 each
rank holds only a shard of every parameter, so whatever reads or changes parameters outside the step
(the logged logit scales, their clamp, the finite check, the final ``save_pretrained``) goes through here.
Forwards outside the step (validation, the probe) gather parameters from every rank under ZeRO-3: every
rank must run the same number of them (``same_forwards``).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from retclip_dist.config import ConfigError
from retclip_dist.model.card import TrainingSummary
from retclip_dist.runtime.env import accelerator_placement, world_info_from_env
from retclip_dist.runtime.lifetime import exit_with_parent
from retclip_dist.train.config import RunConfig

TRACKER_DIR = "tensorboard"  # under output_dir: the files of the trackers that write locally


def build_accelerator(cfg: RunConfig) -> Accelerator:
    if world_info_from_env().launched:
        # torchrun starts ranks in their own sessions: killing the launcher's process group would leave
        # them training beside the next run in the same output_dir.
        exit_with_parent()
    cuda = torch.cuda.is_available()
    # fp16 autocast needs a GPU; bf16 runs (slowly) on CPU too, so only fp16 falls back to float32.
    precision = cfg.train.precision if cuda or cfg.train.precision != "fp16" else "no"
    # Trackers that keep files (TensorBoard, Aim) keep them under output_dir/tensorboard, where TensorBoard's
    # event files always were; check_run_config() refused names this Accelerate cannot start.
    trackers = cfg.log.trackers
    project = ProjectConfiguration(
        project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / TRACKER_DIR)
    )
    placement = accelerator_placement(cuda)
    # The process group's timeout (gloo's default is 30 minutes, NCCL's watchdog 10): a collective waiting
    # for a dead or frozen node fails after train.collective_timeout_s (cli.py turns that into exit 6).
    timeout = datetime.timedelta(seconds=cfg.train.collective_timeout_s)
    handlers = placement.pop("kwargs_handlers", [])
    groups = [h for h in handlers if isinstance(h, InitProcessGroupKwargs)] or [InitProcessGroupKwargs()]
    groups[0].timeout = timeout
    handlers = [*(h for h in handlers if h is not groups[0]), groups[0]]
    return Accelerator(
        mixed_precision=precision,
        log_with=trackers or None,  # an empty list makes Accelerate warn that nothing is installed
        project_config=project,
        kwargs_handlers=handlers,
        **placement,
    )


def uses_deepspeed(acc: Accelerator) -> bool:
    return acc.state.deepspeed_plugin is not None


def zero_stage(acc: Accelerator) -> int:
    return acc.state.deepspeed_plugin.zero_stage if uses_deepspeed(acc) else 0


def configure_deepspeed(acc: Accelerator, cfg: RunConfig) -> None:
    """Fill in what DeepSpeed needs that Accelerate cannot infer (we do not hand it a DataLoader)."""
    if not uses_deepspeed(acc):
        return
    if cfg.train.accum_steps != 1:
        raise ConfigError(
            "train.accum_steps > 1 is not supported under DeepSpeed: its engine steps the optimiser inside "
            "backward, which the chunked contrastive step calls once per chunk"
        )
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["train_batch_size"] = cfg.data.batch_size * acc.num_processes
    ds["gradient_clipping"] = cfg.train.grad_clip or 0.0


def declare_direct_parameters(acc: Accelerator, model: torch.nn.Module) -> None:
    """Under ZeRO-3, declare the parameters ``RetClip.forward`` reads itself (the logit scales and biases,
    which no submodule's forward uses) before the first forward. DeepSpeed otherwise finds them during a
    forward and adds them to the top module then, so a run whose first forwards differ from another's (a
    resumed run validating after one step) fetches against a parameter trace that lacks them and stops
    with "tracing error"."""
    if zero_stage(acc) != 3:
        return
    import deepspeed

    inner = acc.unwrap_model(model)
    for group in (inner.logit_scale, inner.logit_bias):
        for param in group.parameters() if group is not None else ():
            deepspeed.zero.register_external_parameter(inner, param)


def same_forwards(acc: Accelerator) -> bool:
    """Whether a forward is a collective (ZeRO-3 gathers each layer's shards from every rank)."""
    return zero_stage(acc) == 3


def clamp_scales(acc: Accelerator, model: torch.nn.Module) -> None:
    """The model's logit-scale clamp; under DeepSpeed on what its optimiser steps too (every rank calls it).

    DeepSpeed copies its float32 master weights into the model after each step: clamping the model's copy
    alone would let a scale held at the cap grow without bound underneath.
    """
    inner = acc.unwrap_model(model)
    if not uses_deepspeed(acc):
        inner.clamp_logit_scales_()
        return
    import deepspeed
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    low, high = inner.config.min_logit_scale, inner.config.max_logit_scale
    params = list(inner.logit_scale.parameters())
    if zero_stage(acc) == 3:
        # The clamp is element-wise: each rank clamps its own shard of the master. (The full-tensor setter
        # cannot take a tensor padded across ranks, as a 1-element scale is: DeepSpeed 0.19.)
        get, put = safe_get_local_fp32_param, safe_set_local_fp32_param
    else:
        # ZeRO-1/2: the full getter is a collective, the setter writes the part this rank's optimiser holds.
        get, put = safe_get_full_fp32_param, safe_set_full_fp32_param
    for param in params:
        master = get(param)  # None where it is not trained (train.freeze)
        if master is not None:
            put(param, master.clamp(min=low, max=high))
    if zero_stage(acc) == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            inner.clamp_logit_scales_()
    else:
        inner.clamp_logit_scales_()


def logit_scales(acc: Accelerator, model: torch.nn.Module) -> dict[str, float]:
    """exp of each level's logit scale, gathered under ZeRO-3 (every rank calls it)."""
    inner = acc.unwrap_model(model)
    params = dict(inner.logit_scale.items())
    if zero_stage(acc) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {k: p.exp().item() for k, p in params.items()}
    return {k: p.exp().item() for k, p in params.items()}


def weights_finite(acc: Accelerator, model: torch.nn.Module) -> bool:
    """Whether this rank's weights are finite. Under ZeRO-3 a rank holds a shard of each parameter (the
    model's are empty tensors between forwards): its shard of the float32 master weights is checked, and
    the ranks' shards together cover every weight. Every rank must ask, and agree (``any_rank``)."""
    if zero_stage(acc) != 3:
        return all(torch.isfinite(p).all() for p in model.parameters())
    from deepspeed.utils import safe_get_local_fp32_param

    shards = (safe_get_local_fp32_param(p) for p in model.parameters())
    return all(torch.isfinite(t).all() for t in shards if t is not None)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def save_final_model(
    acc: Accelerator,
    model: torch.nn.Module,
    directory: Path,
    summary: TrainingSummary | None = None,
    wait: Callable[[], None] | None = None,
) -> None:
    """``save_pretrained`` from the main process, with full weights gathered first under ZeRO-3; ``summary``
    goes into the model card.

    ``wait``: the barrier the other ranks wait at while the main process writes (default
    ``acc.wait_for_everyone``; the trainer's ``LongWait``, which a slow write cannot time out)."""
    if zero_stage(acc) == 3:
        state = acc.get_state_dict(model)  # a collective: the whole state on the main process
        if acc.is_main_process:
            acc.unwrap_model(model).save_pretrained(directory, summary, state_dict=state)
    elif acc.is_main_process:
        acc.unwrap_model(model).save_pretrained(directory, summary)
    (wait or acc.wait_for_everyone)()
