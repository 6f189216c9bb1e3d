"""What the trainer needs from its backend (Accelerate with DDP or DeepSpeed ZeRO) beyond the plain loop.

Everything here hides one difference between the backends: DeepSpeed needs the batch sizes that
Accelerate cannot infer, does its own gradient clipping, and under ZeRO-3 holds each parameter in shards,
so the logit-scale clamp and the final ``save_pretrained`` gather the full tensors first.
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
from retclip_dist.launch.env import accelerator_placement, world_info_from_env
from retclip_dist.launch.lifetime import exit_with_parent
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
    trackers = cfg.log.active_trackers()
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


def clamp_scales(acc: Accelerator, model: torch.nn.Module) -> None:
    """The model's logit-scale clamp, on gathered parameters under ZeRO-3."""
    inner = acc.unwrap_model(model)
    if zero_stage(acc) == 3:
        import deepspeed

        params = list(inner.logit_scale.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            inner.clamp_logit_scales_()
    else:
        inner.clamp_logit_scales_()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def save_final_model(
    acc: Accelerator, model: torch.nn.Module, directory: Path, wait: Callable[[], None] | None = None
) -> None:
    """``save_pretrained`` from the main process, with full weights gathered first under ZeRO-3.

    ``wait``: the barrier the other ranks wait at while the main process writes (default
    ``acc.wait_for_everyone``; the trainer's ``LongWait``, which a slow write cannot time out)."""
    if zero_stage(acc) == 3:
        state = acc.get_state_dict(model)
        if acc.is_main_process:
            inner = acc.unwrap_model(model)
            inner.load_state_dict(state)
            inner.save_pretrained(directory)
    elif acc.is_main_process:
        acc.unwrap_model(model).save_pretrained(directory)
    (wait or acc.wait_for_everyone)()
