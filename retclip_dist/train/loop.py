"""Tripartite RET-CLIP pretraining under Accelerate (DDP or DeepSpeed ZeRO).

Reads top to bottom: ``train`` builds the run and restores it, then calls ``train_step`` until done,
``save_checkpoint`` on a schedule and on a stop signal (runtime/stop_signals.py), ``validate``
(train/validate.py) each epoch, and writes the model with ``save_pretrained``. Backend details (DeepSpeed,
ZeRO-3 gathers) live in train/backend.py, the config checks run before any process starts in
train/preflight.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm import tqdm

from retclip_dist.config import ConfigError, to_dict
from retclip_dist.data.augment import DeviceAugment
from retclip_dist.data.config import sized_for
from retclip_dist.data.loader import TrainLoader, build_train_data
from retclip_dist.data.samples import REPORT_HASH
from retclip_dist.data.validation import build_val_data
from retclip_dist.exit_codes import EXIT_OK, EXIT_STOPPED
from retclip_dist.loss import TripartiteLoss
from retclip_dist.model.config import ModelConfigError
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer
from retclip_dist.model.weights import random_towers, weights_record
from retclip_dist.runtime.env import world_info_from_env
from retclip_dist.runtime.health import Health
from retclip_dist.runtime.stop import StoppedInSetup
from retclip_dist.runtime.watchdog import WAIT, WORK, Limits, Watchdog
from retclip_dist.runtime.workers import worker_context
from retclip_dist.train.backend import (
    build_accelerator,
    clamp_scales,
    configure_deepspeed,
    declare_direct_parameters,
    logit_scales,
    save_final_model,
    to_device,
    uses_deepspeed,
    weights_finite,
    zero_stage,
)
from retclip_dist.train.checkpoint import CHECKPOINTS_DIR, Checkpointer, Restored
from retclip_dist.train.config import RunConfig, TrainSection
from retclip_dist.train.fp8 import convert_fp8_
from retclip_dist.train.metrics_log import MetricsLog, tracker_config
from retclip_dist.train.optim import build_optimizer, freeze_, lr_at, set_lr
from retclip_dist.train.probe import build_probe, run_probe
from retclip_dist.train.run_summary import run_summary
from retclip_dist.train.signals import LongWait, StopRequest, any_rank, sum_over_ranks
from retclip_dist.train.step import LossFn, forward_backward, output_loss
from retclip_dist.train.telemetry import StepClock, process_age_s, slowest, step_timing, wait_share
from retclip_dist.train.validate import total_skipped, validate

log = logging.getLogger("retclip_dist.train")


class NonFiniteLoss(RuntimeError):
    pass


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    device_augment: DeviceAugment,
    loss_fn: LossFn,
    acc: Accelerator,
    cfg: TrainSection,
    lr: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step on one rank's batch: augment on the device, forward/backward, update, clamp."""
    batch = device_augment(to_device(batch, acc.device))
    set_lr(optimizer, lr)
    # The loss reads the batch's report hashes; chunked steps concatenate outputs in batch order.
    loss_of_batch = partial(loss_fn, report_hash=batch[REPORT_HASH])
    loss, parts = forward_backward(model, batch, loss_of_batch, acc, cfg.accum_steps)
    if cfg.grad_clip and not uses_deepspeed(acc):
        acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clamp_scales(acc, model)
    return loss, parts


def prepare_training(
    acc: Accelerator, model: RetClip, cfg: RunConfig
) -> tuple[torch.nn.Module, torch.optim.Optimizer, LossFn]:
    """Lock, convert, optimise, compile and wrap the model in the order training needs, and the loss.

    Locked parts and float8 layers must be in place before the optimiser and DDP/DeepSpeed collect the
    trainable parameters. bench/train.py times exactly this setup.
    """
    if cfg.train.freeze:
        log.info("train.freeze %s: %d parameters locked", cfg.train.freeze, freeze_(model, cfg.train.freeze))
    if cfg.train.fp8:  # check_run_config() checked torchao and the GPU
        log.info("train.fp8: %d tower linears in float8", len(convert_fp8_(model)))
    optimizer = build_optimizer(model, cfg.train, acc.device)
    wrapped = torch.compile(model) if cfg.train.compile else model
    wrapped, optimizer = acc.prepare(wrapped, optimizer)
    declare_direct_parameters(acc, wrapped)
    tripartite = TripartiteLoss(cfg.model.loss, gather=cfg.loss.gather, duplicates=cfg.loss.duplicates)
    return wrapped, optimizer, output_loss(tripartite)


def train(
    cfg: RunConfig,
    preset: str | None = None,
    stop: StopRequest | None = None,
    before_exit: Callable[[], None] | None = None,
) -> int:
    """Run (or resume) pretraining as configured; returns the process exit code.

    ``preset``: the YAML file the config started from (``--config``): the model card lists the run's
    changes to it.
    ``stop``: the process's stop request (``runtime/stop.py``), installed by the command line before
    anything else (a new one if None). ``before_exit``: what the watchdog runs before it ends a stalled
    rank from its own thread (the command line's run-lock release).
    """
    stop = stop if stop is not None else StopRequest()
    here = world_info_from_env()
    limits = Limits(cfg.train.stall_timeout_s, cfg.train.collective_timeout_s)
    watchdog = Watchdog(limits, here.rank, here.world_size, Health(cfg.output_dir, here.rank), before_exit)
    watchdog.start()
    try:
        return _train(cfg, preset, stop, watchdog)
    except StoppedInSetup as exc:
        # Nothing was trained yet: the checkpoint a resume starts from (if any) is as it was.
        log.warning("stopped by %s during %s: nothing to save yet, exiting for requeue", exc.name, exc.stage)
        return EXIT_STOPPED
    finally:
        stop.stage = None
        watchdog.stop()


def _setup_stage(stop: StopRequest, stage: str) -> None:
    """The setup stage starting now: a stop signal ends it at once (``runtime/stop.py``)."""
    stop.stage = stage
    log.info("setting up: %s", stage)


def _train(cfg: RunConfig, preset: str | None, stop: StopRequest, watchdog: Watchdog) -> int:
    stop.enter_setup("the start of the process group")
    if cfg.data.num_workers:
        worker_context()  # the loader workers' fork server imports the data stack meanwhile
    watchdog.set_phase("starting the process group", WAIT)
    acc = build_accelerator(cfg)
    watchdog.set_phase("setting up", WORK)
    out_dir = Path(cfg.output_dir)
    logging.basicConfig(
        level=logging.INFO if acc.is_main_process else logging.WARNING,
        format=f"%(asctime)s [rank {acc.process_index}] %(name)s: %(message)s",
    )
    if torch.cuda.is_available() and cfg.train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    configure_deepspeed(acc, cfg)
    probe = build_probe(cfg.val.probe, acc, zero_stage(acc))  # None without val.probe.table
    # Same seed everywhere: every rank must start from identical weights.
    set_seed(cfg.train.seed)

    _setup_stage(stop, "the model build")
    try:
        model = RetClip(cfg.model)
    except ModelConfigError as exc:  # pre-flight found it already, unless a file changed since
        raise ConfigError(f"{exc.field}: {exc}") from exc
    loaded = weights_record(model.load_reports)
    tokenizer = build_tokenizer(cfg.model)
    image = model.image_input  # both augmentation paths resize and normalise as the model states
    # data.image_size follows the model; config.json and the data position record the side it took.
    cfg = dataclasses.replace(cfg, data=sized_for(cfg.data, image.size))
    rank, world = acc.process_index, acc.num_processes
    _setup_stage(stop, "the data setup")
    try:
        data = build_train_data(cfg.data, tokenizer, rank, world, cfg.train.seed, image)
    except ValueError as exc:  # a split too small for one step, a layout the plan refuses
        raise ConfigError(f"data: {exc}") from exc
    val_data = build_val_data(cfg.data, tokenizer, rank, world, image)
    device_augment = data.device_augment(acc.device)
    total_steps = sum(data.steps_in_epoch(e) for e in range(cfg.train.epochs))
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    _setup_stage(stop, "the model's preparation")
    model, optimizer, loss_fn = prepare_training(acc, model, cfg)

    # Ranks wait here while the main process alone writes or probes: no collective timeout applies.
    solo_wait = LongWait(acc, watchdog.limits.long_wait_s)
    # check_run_config() refused a fresh run over existing checkpoints, before any rank started.
    _setup_stage(stop, "the checkpoint load")
    checkpointer = Checkpointer(
        acc, out_dir / CHECKPOINTS_DIR, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best, solo_wait
    )
    restored = checkpointer.load(cfg.checkpoint.resume)
    step, epoch = (restored.step, restored.epoch) if restored else (0, 0)
    if restored:
        restore_data(data, restored, cfg.checkpoint.reset_data)

    stop.end_setup()
    if any_rank(acc, stop.received is not None)[0]:  # a signal on another rank, or after setup here
        log.warning(
            "stop requested by signal before the first step: nothing to save yet, exiting for requeue"
        )
        return EXIT_STOPPED

    config_dict = to_dict(cfg)
    acc.init_trackers(cfg.log.project, config=tracker_config(config_dict))  # main process only
    metrics = MetricsLog(out_dir, acc.log) if acc.is_main_process else None
    if metrics is not None and not restored:  # a resume's weights come from its checkpoint
        metrics.write("weights", step, loaded)
        for field, tower in random_towers(cfg.model, loaded):
            # Legitimate for a from-scratch run, but the paper and the release start both towers from
            # pretrained weights: a preset whose path was left null would otherwise train a random tower.
            log.warning("%s is not set: the %s tower starts from random weights", field, tower)
    if acc.is_main_process:
        (out_dir / "config.json").write_text(json.dumps(config_dict, indent=1, sort_keys=True))
        log.info(
            "%d processes x %d patients per step, %d steps per epoch, %d steps in all%s",
            acc.num_processes,
            cfg.data.batch_size,
            data.steps_per_epoch,
            total_steps,
            f", resuming at step {step}" if restored else "",
        )
    last_validated = -1

    def stopping() -> bool:
        """Progress and a look at the stop flag, between validation and probe batches."""
        watchdog.beat()
        return stop.received is not None

    alone = WORK if acc.is_main_process else WAIT  # rank 0 writes and probes, the others wait for it
    bar = tqdm(total=total_steps, initial=step, disable=not (acc.is_main_process and cfg.log.progress))
    window_start, window_steps = time.perf_counter(), 0
    clock = StepClock()
    model.train()
    exit_code = EXIT_OK
    # A resume's cost, what every GPU of a requeued job idles through: from the process's start to the
    # first batch in hand, the slowest rank's; the first step's train record carries it.
    resume_s: float | None = None
    bad_since: torch.Tensor | None = None  # a non-finite loss since the ranks last agreed, on the device

    while step < total_steps and exit_code == EXIT_OK:
        watchdog.set_phase(f"waiting for training data (epoch {epoch}, step {step + 1})", WORK)
        for batch in clock.batches(data):
            watchdog.set_phase(f"training step {step + 1}", WAIT)
            first_after_resume = bool(restored) and resume_s is None
            if first_after_resume:
                resume_s = process_age_s()
            lr = lr_at(step, total_steps, cfg.train)
            loss, parts = train_step(model, optimizer, batch, device_augment, loss_fn, acc, cfg.train, lr)
            step += 1
            window_steps += 1
            bar.update(1)

            # Every rank must agree to stop, or one would wait forever in the next all-gather; the agreement
            # (a collective and a host sync) runs every train.check_every_steps steps and wherever a
            # step logs or saves. In between, a non-finite loss is remembered on the device, unsynced.
            bad = ~torch.isfinite(loss.detach())
            bad_since = bad if bad_since is None else bad_since | bad
            every = cfg.checkpoint.every_steps
            logs = step % cfg.log.every_steps == 0 or step == total_steps or first_after_resume
            saves = bool(every) and step % every == 0 and step < total_steps
            signalled = False
            if logs or saves or step % max(cfg.train.check_every_steps, 1) == 0 or step == total_steps:
                nonfinite, signalled = any_rank(acc, bool(bad_since.item()), stop.received is not None)
                bad_since = None
                if nonfinite:
                    raise nonfinite_loss(step, loss, lr, checkpointer.root)
            clock.step_done()
            if logs:
                elapsed = time.perf_counter() - window_start
                timing = step_timing(acc, clock)
                if first_after_resume:
                    timing["resume_s"] = slowest(acc, resume_s)
                mean_loss = log_train_step(
                    acc,
                    metrics,
                    model,
                    loss,
                    parts,
                    data.skipped,
                    step,
                    epoch,
                    lr,
                    window_steps / elapsed,
                    cfg,
                    timing,
                )
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                window_start, window_steps = time.perf_counter(), 0
            if signalled or saves:
                with watchdog.phase(f"saving the checkpoint of step {step}", alone):
                    save_checkpoint(acc, model, checkpointer, step, epoch, config_dict, data)
            if signalled:
                log.warning("stop requested by signal; saved step %d, exiting for requeue", step)
                exit_code = EXIT_STOPPED
                break
            if step >= total_steps:
                break
            watchdog.set_phase(f"waiting for training data (epoch {epoch}, step {step + 1})", WORK)
        if exit_code == EXIT_OK and bad_since is not None:
            # The epoch's last steps since the ranks last agreed (every rank ran the same steps, so all
            # get here together): checked before the epoch's validation, probe and save can use them.
            if any_rank(acc, bool(bad_since.item()))[0]:
                raise nonfinite_loss(step, loss, lr, checkpointer.root)
            bad_since = None
        # A run stopped on an epoch's last step leaves the epoch's record and validation to the resumed
        # run, whose checkpoint is at that same point: written here too, they would appear twice.
        if exit_code == EXIT_OK and data.epoch_done():
            watchdog.set_phase(f"the end of epoch {epoch}", WAIT)
            log_epoch(acc, metrics, data, epoch, step)
            epoch += 1
            data.set_epoch(epoch)
            if cfg.val.every_epochs and epoch % cfg.val.every_epochs == 0:
                with watchdog.phase(f"validation after epoch {epoch}", WORK):
                    validate(
                        model,
                        val_data,
                        acc,
                        device_augment,
                        cfg.val.max_samples,
                        metrics,
                        step,
                        epoch,
                        stopping,
                    )
                last_validated = step
            # A new best is saved now, unless this is the last step, whose checkpoint follows the loop.
            with watchdog.phase(f"the probe after epoch {epoch}", alone):
                best = (
                    probe is not None
                    and probe.due(epoch)
                    and run_probe(probe, model, acc, metrics, checkpointer, step, epoch, stopping, solo_wait)
                )
            # A stop signal during validation or the probe: save now rather than after another step.
            stopped = step < total_steps and any_rank(acc, stop.received is not None)[0]
            if (best or stopped) and step < total_steps:
                with watchdog.phase(f"saving the checkpoint of step {step}", alone):
                    save_checkpoint(acc, model, checkpointer, step, epoch, config_dict, data)
            if stopped:
                log.warning("stop requested by signal; saved step %d, exiting for requeue", step)
                exit_code = EXIT_STOPPED
    bar.close()

    if exit_code == EXIT_OK:
        if probe is not None and probe.last_step != step:
            # A new best: the save below.
            with watchdog.phase("the final probe", alone):
                run_probe(probe, model, acc, metrics, checkpointer, step, epoch, stopping, solo_wait)
        with watchdog.phase(f"saving the checkpoint of step {step}", alone):
            save_checkpoint(acc, model, checkpointer, step, epoch, config_dict, data)
        # A stop signal from here on leaves the final validation and model to the resumed run, which
        # starts from the checkpoint just saved and does only them.
        if any_rank(acc, stop.received is not None)[0]:
            log.warning("stop requested by signal; saved step %d, exiting for requeue", step)
            exit_code = EXIT_STOPPED
        elif cfg.val.every_epochs and last_validated != step:
            with watchdog.phase("the final validation", WORK):
                completed = validate(
                    model, val_data, acc, device_augment, cfg.val.max_samples, metrics, step, epoch, stopping
                )
            if not completed:
                log.warning("stop requested by signal; saved step %d, exiting for requeue", step)
                exit_code = EXIT_STOPPED
    if exit_code == EXIT_OK:
        with watchdog.phase("writing the final model", alone):
            summary = (
                run_summary(cfg, preset, out_dir, acc.num_processes, step) if acc.is_main_process else None
            )
            save_final_model(acc, model, out_dir / "model", summary, solo_wait)
    watchdog.set_phase("finishing", WAIT)
    skipped = total_skipped(acc, data.skipped)
    share = wait_share(acc, clock)
    if metrics is not None:
        log.info(
            "waiting for data: %.1f%% of the training-step time (most: rank %d, %.1f%%)",
            100 * share["data_wait_share"],
            share["data_wait_share_max_rank"],
            100 * share["data_wait_share_max"],
        )
        metrics.write("end", step, {"exit_code": exit_code, "skipped_samples": skipped, **share})
        metrics.close()
    acc.wait_for_everyone()
    acc.end_training()
    return exit_code


def restore_data(data: TrainLoader, restored: Restored, reset: bool) -> None:
    """Continue the checkpoint's data position (data/position.py says what it must match). One that cannot be
    continued is refused (check_run_config() did so before any process started), or with ``reset`` its
    epoch starts again from the first patient. A position that can be continued always is: the flag may
    stay on for every requeue of a run."""
    if restored.data_state is None:
        problem = "no data_rank*.json"
        if not reset:
            raise ConfigError(
                f"checkpoint.resume: {restored.path} has no data position (data_rank*.json): pass "
                f"--checkpoint.reset_data true to start epoch {restored.epoch}'s data from its first patient"
            )
    else:
        try:
            data.load_state_dict(restored.data_state)
            return
        except ValueError as exc:
            if not reset:
                raise ConfigError(f"checkpoint.resume: {restored.path}: {exc}") from exc
            problem = getattr(exc, "reason", str(exc))
    data.set_epoch(restored.epoch)
    if data.layout.rank == 0:
        log.warning(
            "checkpoint.reset_data: the data position of %s cannot be continued (%s); epoch %d starts again "
            "from its first patient at step %d (patients it used before step %d are read again)",
            restored.path,
            problem,
            restored.epoch,
            restored.step,
            restored.step,
        )


def save_checkpoint(
    acc: Accelerator,
    model: torch.nn.Module,
    checkpointer: Checkpointer,
    step: int,
    epoch: int,
    config_dict: dict[str, Any],
    data: TrainLoader,
) -> None:
    """A complete checkpoint of every rank, unless the weights are non-finite on any rank (a collective)."""
    # A finite loss can still come with weights the update just broke; such a state is never saved,
    # so the newest checkpoint is always one that can be resumed from.
    if any_rank(acc, not weights_finite(acc, model))[0]:
        raise NonFiniteLoss(
            f"weights became non-finite at step {step}; not saving them. The last complete checkpoint "
            f"under {checkpointer.root} is the last good state: resume from it with a lower lr"
        )
    checkpointer.save(step, epoch, config_dict, data.state_dict())


def log_train_step(
    acc: Accelerator,
    metrics: MetricsLog | None,
    model: torch.nn.Module,
    loss: torch.Tensor,
    parts: dict[str, torch.Tensor],
    skipped: int,
    step: int,
    epoch: int,
    lr: float,
    steps_per_s: float,
    cfg: RunConfig,
    timing: dict[str, Any],
) -> float:
    """Reduce this step's losses over ranks (every rank joins) and write the ``train`` record with the
    ``timing`` fields; returns the global-batch loss."""
    # Each rank's loss is the mean over its own rows: their mean is the global-batch loss.
    local = torch.stack([loss, *parts.values(), torch.tensor(float(skipped), device=loss.device)])
    summed = sum_over_ranks(acc, local).tolist()
    world = acc.num_processes
    losses = {"total": summed[0] / world, **{k: v / world for k, v in zip(parts, summed[1:-1], strict=True)}}
    scales = logit_scales(acc, model)  # gathered under ZeRO-3: every rank joins
    if metrics is not None:
        patients_per_s = steps_per_s * cfg.data.batch_size * world
        metrics.train_step(step, epoch, lr, losses, scales, patients_per_s, int(summed[-1]), timing)
    return losses["total"]


def nonfinite_loss(step: int, loss: torch.Tensor, lr: float, root: Path) -> NonFiniteLoss:
    """The error that ends a run whose loss became NaN or inf at or before ``step`` (exit code 4)."""
    return NonFiniteLoss(
        f"loss became non-finite by step {step} (last {loss.item()}, lr {lr:.3g}); the last complete "
        f"checkpoint under {root} is the last good state: resume from it with a lower lr"
    )


def read_twice_count(rows: list[str], reused: int) -> int:
    """Rows beyond each patient's first that no short stream's refill accounts for: 0 unless the data order
    itself went wrong (a position that re-reads patients also leaves others out). A refill can also read a
    sample that a transient error lost in the first pass (counted reused, yet its patient's first row):
    refills never make the count negative."""
    return max(0, len(rows) - len(set(rows)) - reused)


def log_epoch(acc: Accelerator, metrics: MetricsLog | None, data: TrainLoader, epoch: int, step: int) -> None:
    """Account for every patient of the split in the finished epoch, counted from the batches every rank
    trained on: used once, unused (past the last whole global batch, or damaged), or read twice."""
    # Every rank joins: one sum for the damaged and refilled rows, one gather of the rows' patients.
    local = [data.epoch_skipped, data.epoch_skip_counts["reused"]]
    skipped, reused = sum_over_ranks(acc, torch.tensor(local, dtype=torch.int64, device=acc.device)).tolist()
    rows = gather_object(data.epoch_patients) if acc.num_processes > 1 else data.epoch_patients
    used = len(set(rows))
    read_twice = read_twice_count(rows, reused)
    unused = data.samples_per_epoch - used
    if metrics is None:
        return
    metrics.epoch_end(step, epoch, used, unused, skipped, read_twice, reused)
    log.info(
        "epoch %d done: %d of %d patients used, %d unused (%d past the last whole global batch, %d skipped "
        "as damaged)",
        epoch,
        used,
        data.samples_per_epoch,
        unused,
        data.unused_per_epoch,
        skipped,
    )
    if read_twice:
        log.error(
            "epoch %d: %d rows repeated a patient already trained on in this epoch (patients_read_twice, "
            "expected 0) and %d patients were not used although the plan reads them: the data order went "
            "wrong, e.g. a resume that did not continue where its checkpoint stopped",
            epoch,
            read_twice,
            unused - data.unused_per_epoch - skipped,
        )
