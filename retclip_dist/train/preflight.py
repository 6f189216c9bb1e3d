"""Check a whole run config before any process group starts: one line naming the field and the reason.

``check_run_config(cfg, world_size)`` raises ``ConfigError`` for the first problem it finds, in this order:
ranges of single fields, rules between fields (partitions and batch, the logit-scale clamp range, image
size and context length against the model), the model built on the meta device as every rank will build
it (weight files strictly checked against the towers, without initialising or holding any weights), then
what lies outside the config (paths, the shard manifest, the probe's table and its splits, the checkpoint
to resume from, the global batch and the data position it was saved with, a live run in the same
output_dir). It only reads, except that it creates ``output_dir`` to prove it writable, as the run would,
and that a resume on another world size sets ``data.batch_size`` (and maybe ``data.partitions``) to keep
the saved global batch.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import accelerate.tracking
import torch
from accelerate.utils import LoggerType

from retclip_dist.config import ConfigError
from retclip_dist.data import position
from retclip_dist.data.config import sized_for
from retclip_dist.data.plan import Layout, LayoutError
from retclip_dist.io import files
from retclip_dist.model.config import ModelConfig, ModelConfigError
from retclip_dist.model.retclip import WEIGHTS_FILE, RetClip
from retclip_dist.model.tokenizer import build_tokenizer
from retclip_dist.model.towers import image_input, text_model_config, vision_input_size
from retclip_dist.runtime.stop_signals import stop_signals
from retclip_dist.shardset import Manifest, read_manifest
from retclip_dist.train import runlock
from retclip_dist.train.checkpoint import CHECKPOINTS_DIR, data_state_files, read_train_state, resume_path
from retclip_dist.train.config import RunConfig, TrainSection
from retclip_dist.train.fp8 import fp8_unavailable_reason
from retclip_dist.train.optim import TOWERS
from retclip_dist.train.probe import METRIC, read_probe_splits

log = logging.getLogger(__name__)
_AT_LEAST_1 = (lambda v: v >= 1, "must be at least 1")
_AT_LEAST_0 = (lambda v: v >= 0, "must be 0 or more")
_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "must be a finite number above 0")
_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "must be a finite number, 0 or more")
_EPOCHS = (lambda v: v >= 1, "must be at least 1 (0 would save an untrained model)")
_TOKENS = (lambda v: v >= 2, "must be at least 2 ([CLS] and [SEP])")
_UNIT_OPEN = (lambda v: 0 <= v < 1, "must be in [0, 1)")
_PROBABILITY = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
_SCALE_RANGE = (lambda v: 0 < v[0] <= v[1] <= 1, "must be (low, high) with 0 < low <= high <= 1")
_RATIO_RANGE = (lambda v: 0 < v[0] <= v[1], "must be (low, high) with 0 < low <= high")


def _fail(field: str, value: Any, reason: str) -> ConfigError:
    return ConfigError(f"{field}={value!r}: {reason}")


def _ranges(cfg: RunConfig) -> None:
    rules: list[tuple[str, Any, tuple[Callable[[Any], bool], str]]] = [
        ("train.epochs", cfg.train.epochs, _EPOCHS),
        ("train.lr", cfg.train.lr, _POSITIVE),
        ("train.weight_decay", cfg.train.weight_decay, _NON_NEGATIVE),
        ("train.eps", cfg.train.eps, _POSITIVE),
        ("train.warmup_steps", cfg.train.warmup_steps, _AT_LEAST_0),
        ("train.accum_steps", cfg.train.accum_steps, _AT_LEAST_1),
        ("data.batch_size", cfg.data.batch_size, _AT_LEAST_1),
        ("data.num_workers", cfg.data.num_workers, _AT_LEAST_0),
        ("data.prefetch_factor", cfg.data.prefetch_factor, _AT_LEAST_1),
        ("data.shuffle_buffer", cfg.data.shuffle_buffer, _AT_LEAST_1),
        ("data.context_length", cfg.data.context_length, _TOKENS),
        ("data.decode_size", cfg.data.decode_size, _AT_LEAST_1),
        ("data.jitter", cfg.data.jitter, _UNIT_OPEN),
        ("data.erase_prob", cfg.data.erase_prob, _PROBABILITY),
        ("data.crop_scale", cfg.data.crop_scale, _SCALE_RANGE),
        ("data.crop_ratio", cfg.data.crop_ratio, _RATIO_RANGE),
        ("model.embed_dim", cfg.model.embed_dim, _AT_LEAST_1),
        ("model.max_logit_scale", cfg.model.max_logit_scale, _POSITIVE),
        ("checkpoint.every_steps", cfg.checkpoint.every_steps, _AT_LEAST_0),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last, _AT_LEAST_1),
        ("log.every_steps", cfg.log.every_steps, _AT_LEAST_1),
        ("val.every_epochs", cfg.val.every_epochs, _AT_LEAST_0),
        ("val.probe.every_epochs", cfg.val.probe.every_epochs, _AT_LEAST_1),
        ("train.stall_timeout_s", cfg.train.stall_timeout_s, _NON_NEGATIVE),
        ("train.collective_timeout_s", cfg.train.collective_timeout_s, _POSITIVE),
        ("train.max_fault_requeues", cfg.train.max_fault_requeues, _AT_LEAST_0),
    ]
    optional = [
        ("train.max_steps", cfg.train.max_steps, _AT_LEAST_1),
        ("train.grad_clip", cfg.train.grad_clip, _POSITIVE),
        ("data.partitions", cfg.data.partitions, _AT_LEAST_1),
        ("data.image_size", cfg.data.image_size, _AT_LEAST_1),
        ("val.max_samples", cfg.val.max_samples, _AT_LEAST_1),
    ]
    rules += [rule for rule in optional if rule[1] is not None]
    for field, value, (ok, reason) in rules:
        if not ok(value):
            raise _fail(field, value, reason)
    if not 0 < cfg.train.layer_decay <= 1:
        raise _fail("train.layer_decay", cfg.train.layer_decay, "must be in (0, 1] (1: no layer-wise decay)")
    for part, scale in cfg.train.lr_scale.items():
        if part not in TOWERS:
            raise _fail(f"train.lr_scale.{part}", scale, f"unknown part; expected one of {list(TOWERS)}")
        if isinstance(scale, bool) or not (
            isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0
        ):
            raise _fail(
                f"train.lr_scale.{part}", scale, "must be a finite number above 0 (use train.freeze to lock)"
            )
    if set(cfg.train.freeze) >= set(TOWERS):
        raise _fail("train.freeze", cfg.train.freeze, "locks every part: nothing would train")
    betas = cfg.train.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise _fail("train.betas", betas, "must be two numbers in [0, 1)")
    stall, collective = cfg.train.stall_timeout_s, cfg.train.collective_timeout_s
    if 0 < collective <= stall:
        # Not an error: every rank still ends, but the stuck one's stacks never reach the log.
        log.warning(
            "train.stall_timeout_s=%g is not below train.collective_timeout_s=%g: ranks waiting for a stuck "
            "rank give up (exit code 6, naming it) before it writes its stacks; raise collective_timeout_s",
            stall,
            collective,
        )
    _logit_scale_range(cfg.model)


def _logit_scale_range(model: ModelConfig) -> None:
    # The clamp after each step would otherwise pin every scale to one bound, or move the configured
    # starting value at the first step, without a word.
    low, high = model.min_logit_scale, model.max_logit_scale
    if low is not None and not math.isfinite(low):
        raise _fail("model.min_logit_scale", low, "must be a finite number (or null: no lower clamp)")
    if low is not None and low > high:
        raise _fail("model.min_logit_scale", low, f"is above model.max_logit_scale={high!r}")
    start = model.resolved_init_logit_scale()
    if not math.isfinite(start) or start > high or (low is not None and start < low):
        raise _fail(
            "model.init_logit_scale",
            start,
            f"is outside [model.min_logit_scale, model.max_logit_scale] = [{low!r}, {high!r}], which the "
            "first step's clamp would move it into",
        )


def _trackers(cfg: RunConfig) -> None:
    # Accelerate drops a tracker whose package is missing with a debug message only: the run would go on
    # without the lab's tracker and nobody would notice until looking for the curves.
    known = [t.value for t in LoggerType if t.value != "all"]
    installed = {LoggerType(t).value for t in accelerate.tracking.get_available_trackers()}
    for name in cfg.log.trackers:
        if name not in known:
            raise _fail(
                "log.trackers", cfg.log.trackers, f"unknown tracker {name!r}; Accelerate knows {known}"
            )
        if name not in installed:
            raise _fail(
                "log.trackers",
                cfg.log.trackers,
                f"{name!r} needs its package, which is not installed here (pip install {name}, or leave it "
                "out of log.trackers)",
            )


def _layout(cfg: RunConfig, world_size: int) -> Layout:
    """The run's data layout, checked by ``Layout`` itself (the loader's check, seen before launch)."""
    try:
        layout = Layout(0, world_size, cfg.data.partitions or world_size, cfg.data.batch_size)
    except LayoutError as exc:
        raise _fail(exc.field, exc.value, exc.reason) from None
    if cfg.data.batch_size % cfg.train.accum_steps:
        raise _fail(
            "train.accum_steps",
            cfg.train.accum_steps,
            f"must divide data.batch_size={cfg.data.batch_size} "
            "(each rank's batch is split into equal chunks)",
        )
    return layout


def _model_fit(cfg: RunConfig) -> int:
    """The model's input side, once every model setting is checked."""
    if cfg.model.init_from is not None:
        if not (Path(cfg.model.init_from) / WEIGHTS_FILE).is_file():
            raise _fail(
                "model.init_from", cfg.model.init_from, f"not a save_pretrained directory (no {WEIGHTS_FILE})"
            )
        if cfg.model.vision_weights is not None:
            raise _fail(
                "model.vision_weights",
                cfg.model.vision_weights,
                "is set together with model.init_from, which overwrites every weight (set it to null)",
            )
    if cfg.model.vision_weights is not None and not Path(cfg.model.vision_weights).is_file():
        raise _fail("model.vision_weights", cfg.model.vision_weights, "no such file")
    if cfg.model.text_path is not None and not (Path(cfg.model.text_path) / "config.json").is_file():
        raise _fail(
            "model.text_path", cfg.model.text_path, "not a Hugging Face model directory (no config.json)"
        )
    try:
        text = text_model_config(cfg.model)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.text_config: {exc}") from exc
    try:
        build_tokenizer(cfg.model)
    except (OSError, ValueError) as exc:
        field = "model.tokenizer_path" if cfg.model.tokenizer_path is not None else "model.text_path"
        raise ConfigError(f"{field}: {exc}") from exc
    positions = getattr(text, "max_position_embeddings", None)
    if positions is not None and cfg.data.context_length > positions:
        raise _fail(
            "data.context_length",
            cfg.data.context_length,
            f"is above the text tower's {positions} positions (max_position_embeddings)",
        )
    try:
        side = vision_input_size(cfg.model)
    except Exception as exc:  # timm raises whatever its constructors raise for bad kwargs
        raise ConfigError(f"model.vision_kwargs: cannot build {cfg.model.vision_name!r}: {exc}") from exc
    try:
        image_input(cfg.model, side)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg.data.image_size is not None and side != cfg.data.image_size:
        raise _fail(
            "data.image_size",
            cfg.data.image_size,
            f"the vision tower {cfg.model.vision_name!r} takes {side} px images "
            "(set model.vision_kwargs.img_size to change it, and leave data.image_size null: it follows the model)",
        )
    for name in ("image_mean", "image_std"):
        value = getattr(cfg.model, name)
        if len(value) != 3 or not all(math.isfinite(v) for v in value):
            raise _fail(f"model.{name}", value, "must be three finite numbers (R, G, B)")
    if min(cfg.model.image_std) <= 0:
        raise _fail("model.image_std", cfg.model.image_std, "must be above 0 in every channel")
    _model_builds(cfg.model)
    return side


def _model_builds(cfg: ModelConfig) -> None:
    """Build the model on the meta device (no memory, no initialisation), as every rank will: the weight
    files are read and strictly checked against the towers, the CLIP activation and logit_scale, selective
    checkpointing and model.init_from, each refused as ``{field}: {reason}``."""
    with warnings.catch_warnings():
        # Loading into meta parameters copies nothing, and torch says so once per tensor.
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
        try:
            with torch.device("meta"):
                RetClip(cfg)
        except ModelConfigError as exc:
            raise ConfigError(f"{exc.field}: {exc}") from exc


def _shards(cfg: RunConfig) -> Manifest:
    try:
        manifest = read_manifest(cfg.data.shards, cfg.data.storage_options)
    except ValueError as exc:
        raise ConfigError(f"data.shards: {exc}") from exc
    if not manifest.has_split(cfg.data.train_split):
        have = sorted({s.split for s in manifest.shards})
        raise _fail("data.train_split", cfg.data.train_split, f"{manifest.location} has only splits {have}")
    return manifest


def _probe(cfg: RunConfig) -> None:
    """The probe's table and images, read and split as the probe will (a few seconds for thousands of
    rows): a missing column or a split without both outcomes fails now, not after the first epoch."""
    probe = cfg.val.probe
    if cfg.checkpoint.keep_best == METRIC and not probe.table:
        raise _fail("checkpoint.keep_best", METRIC, "is only produced by val.probe: set val.probe.table")
    if not probe.table:
        if probe.images:
            raise _fail("val.probe.images", probe.images, "is set but val.probe.table is not")
        return
    if not probe.images:
        raise _fail("val.probe.images", probe.images, "must name the image root of val.probe.table")
    for field, value in (("val.probe.table", probe.table), ("val.probe.images", probe.images)):
        if not files.exists(value):
            raise _fail(field, value, "no such file or directory")
    try:
        read_probe_splits(probe)
    except ValueError as exc:  # LabelError: names the table row
        raise ConfigError(f"val.probe: {exc}") from exc


def _output_dir(cfg: RunConfig) -> None:
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise _fail("output_dir", cfg.output_dir, f"not writable ({exc.strerror or exc})") from exc


def _same_param_groups(cfg: RunConfig, path: Path, saved: dict[str, Any]) -> None:
    # The optimiser state is saved per parameter group: other groups cannot be matched to it, and a
    # restored group would bring back its saved lr multiplier regardless of the config.
    defaults = TrainSection()
    for key in ("freeze", "lr_scale", "layer_decay"):
        then, now = saved.get(key, getattr(defaults, key)), getattr(cfg.train, key)
        if then != now:
            raise ConfigError(
                f"checkpoint.resume: {path} was saved with train.{key}={then!r}, now {now!r}; the optimiser "
                "state belongs to its parameter groups: resume with the saved value, or start a new "
                "--output_dir with --model.init_from"
            )


def _resume(cfg: RunConfig, world_size: int, manifest: Manifest, side: int) -> None:
    root = Path(cfg.output_dir) / CHECKPOINTS_DIR
    path = resume_path(root, cfg.checkpoint.resume)
    if path is None:
        latest = resume_path(root, "auto")
        if cfg.checkpoint.resume is None and latest is not None:
            # Starting over in place would interleave two runs' checkpoints and metrics.
            raise ConfigError(
                f"output_dir: {cfg.output_dir} already holds checkpoints (newest {latest.name}): pass "
                "--checkpoint.resume auto to continue that run, or choose another --output_dir"
            )
        return
    state = read_train_state(path)
    _same_param_groups(cfg, path, state.get("config", {}).get("train", {}))
    _same_global_batch(cfg, world_size, path, state)
    _same_data_position(cfg, world_size, path, state, manifest, side)


def _same_global_batch(cfg: RunConfig, world_size: int, path: Path, state: dict[str, Any]) -> None:
    """A resume keeps the saved global batch; on another world size the per-rank batch follows it.

    Workers and partitions may change (the loader re-plans the rest of the epoch). ``data.batch_size``
    equal to the saved per-rank value (the config file's, unchanged) becomes global / N' with a warning;
    any other value than global / N' is refused. Explicit ``data.partitions`` that the new world size does
    not divide fall back to one partition per rank, with a warning.
    """
    saved = state.get("config", {}).get("data", {})
    saved_world, saved_batch = state.get("world_size"), saved.get("batch_size")
    if saved_world is None or saved_batch is None:
        return
    total = saved_world * saved_batch
    accum = cfg.train.accum_steps
    if total % world_size or (total // world_size) % accum:
        fits = [n for n in range(1, total + 1) if total % n == 0 and (total // n) % accum == 0]
        raise ConfigError(
            f"checkpoint.resume: {path} was saved with a global batch of {total} patients ({saved_batch} x "
            f"{saved_world} processes), which {world_size} processes cannot share equally"
            f"{f' in chunks of train.accum_steps={accum}' if accum > 1 else ''}; resume on "
            f"{', '.join(map(str, fits))} processes"
        )
    per_rank = total // world_size
    if cfg.data.batch_size != per_rank:
        if world_size == saved_world or cfg.data.batch_size != saved_batch:
            raise _fail(
                "data.batch_size",
                cfg.data.batch_size,
                f"{path} was saved with a global batch of {total} patients; a resume on {world_size} "
                f"processes keeps it with data.batch_size={per_rank} (or start a new --output_dir)",
            )
        log.warning(
            "resuming %s (saved by %d processes) on %d: data.batch_size %d -> %d, keeping the global batch of %d",
            path,
            saved_world,
            world_size,
            cfg.data.batch_size,
            per_rank,
            total,
        )
        cfg.data.batch_size = per_rank
    partitions = cfg.data.partitions
    if partitions is not None and partitions % world_size:
        log.warning(
            "data.partitions=%d is not a multiple of %d processes: using one partition per process",
            partitions,
            world_size,
        )
        cfg.data.partitions = None
    _layout(cfg, world_size)


def _same_data_position(
    cfg: RunConfig, world_size: int, path: Path, state: dict[str, Any], manifest: Manifest, side: int
) -> None:
    """The checkpoint's data position continues on this run (data/position.py), or the user allows its epoch
    to start again where it cannot (``checkpoint.reset_data``); every rank's loader checks again."""
    saved = data_state_files(path, state["world_size"])
    missing = [f.name for f in saved if not f.exists()]
    if missing and len(missing) < len(saved):
        raise ConfigError(
            f"checkpoint.resume: {path} lacks {', '.join(missing)} (saved by {state['world_size']} ranks)"
        )
    if cfg.checkpoint.reset_data:
        return  # the run continues what it can and says what it restarts
    if missing:
        raise ConfigError(
            f"checkpoint.resume: {path} has no data position ({missing[0]}): pass --checkpoint.reset_data "
            f"true to start epoch {state['epoch']}'s data from its first patient (patients it already used "
            "are read again)"
        )
    try:
        first = json.loads(saved[0].read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint.resume: cannot read {saved[0]}: {exc}") from exc
    layout = _layout(cfg, world_size)
    shards = manifest.split(cfg.data.train_split)
    data = sized_for(cfg.data, side)  # what the loader records: the model's side
    now = position.layout_record(data, shards, layout, max(cfg.data.num_workers, 1), cfg.train.seed)
    reason = position.refusal(first, now)
    if reason is not None:
        raise ConfigError(f"checkpoint.resume: {path}: {reason}; {position.way_out(state['epoch'])}")


def _fp8(cfg: RunConfig) -> None:
    # Checked where the run starts: a --check on a host without the training GPU refuses it as well.
    if cfg.train.fp8:
        reason = fp8_unavailable_reason()
        if reason is not None:
            raise _fail("train.fp8", True, reason)


def _stop_signals() -> None:
    # Read from the environment (RETCLIP_REQUEUE_SIGNAL, NCCL_PROXY_DUMP_SIGNAL), not the config, but a bad
    # one would otherwise surface only when the loop installs its handlers, as a traceback on every rank.
    try:
        stop_signals()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def check_run_config(cfg: RunConfig, world_size: int, check_lock: bool = False) -> None:
    """Raise ``ConfigError`` (one line: field and reason) for the first problem in ``cfg``.

    ``check_lock``: also refuse when a live run holds ``output_dir`` (pre-flight only: inside a run, the
    main process may already hold it).
    """
    if world_size < 1:
        raise _fail("world size", world_size, "must be at least 1")
    _stop_signals()
    _ranges(cfg)
    _trackers(cfg)
    if cfg.checkpoint.resume is None:
        _layout(cfg, world_size)  # else after _resume, which may set the batch for a new world size
    side = _model_fit(cfg)
    _fp8(cfg)
    manifest = _shards(cfg)
    _probe(cfg)
    _output_dir(cfg)
    if check_lock:
        try:
            runlock.check(cfg.output_dir)
        except runlock.RunLocked as exc:
            raise ConfigError(str(exc)) from exc
    _resume(cfg, world_size, manifest, side)
    _layout(cfg, world_size)
