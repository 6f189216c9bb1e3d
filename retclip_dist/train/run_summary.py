"""What the model card says about a finished run, gathered from what the run already keeps.

The shard manifest gives the data as counts, ``metrics.jsonl`` the time in training steps and the last
validation recall (every resumed segment appends to it), and the run config the recipe: its headline
settings and every setting that differs from the preset the run named (only the project's own presets
are named; a run on another preset is compared with the defaults, so no file name of the user's reaches
the card). A changed setting whose value is free text (a path, a tracker or project name) is listed by
key only; the split names shown are the shard manifest's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import fsspec

from retclip_dist.config import load_config, to_dict
from retclip_dist.model.card import SplitCount, TrainingSummary
from retclip_dist.shardset import PSEUDONYMISED_FIELD, manifest_url, read_manifest
from retclip_dist.train.config import RunConfig
from retclip_dist.train.metrics_log import read_metrics

log = logging.getLogger(__name__)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The presets shipped in configs/: a run that names one of these is described as changes to it.
PROJECT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """{dotted key: declared type} of every leaf field of a config dataclass tree."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_types(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def _choices(tp: Any) -> set[Any]:
    """The closed choices a field's type allows (Literal values, also inside Optional, list, tuple)."""
    origin = get_origin(tp)
    if origin is Literal:
        return set(get_args(tp))
    if origin in (Union, types.UnionType, list, tuple):
        return set().union(*(_choices(arg) for arg in get_args(tp)))
    return set()


def _shown(value: Any, choices: set[Any]) -> bool:
    """Whether a value holds no free text: numbers, booleans, None and closed choices only."""
    if isinstance(value, str):
        return value in choices
    if isinstance(value, dict):
        # Keys of a settings mapping (lr_scale, vision_kwargs) are names of parts or arguments.
        keys_plain = all(isinstance(k, str) and _IDENTIFIER.fullmatch(k) for k in value)
        return keys_plain and all(_shown(v, choices) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_shown(v, choices) for v in value)
    return value is None or isinstance(value, (bool, int, float))


def _leaves(cfg: RunConfig) -> dict[str, Any]:
    types_ = _leaf_types(RunConfig)
    flat: dict[str, Any] = {}

    def walk(data: dict[str, Any], prefix: str) -> None:
        for key, value in data.items():
            name = f"{prefix}{key}"
            if name in types_:
                flat[name] = value
            else:
                walk(value, f"{name}.")

    walk(to_dict(cfg), "")
    return flat


def config_changes(cfg: RunConfig, reference: RunConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """(shown changes, withheld keys): every leaf setting of ``cfg`` that differs from ``reference``."""
    types_ = _leaf_types(RunConfig)
    ours, theirs = _leaves(cfg), _leaves(reference)
    shown, withheld = [], []
    for key in sorted(ours):
        if ours[key] == theirs[key]:
            continue
        if _shown(ours[key], _choices(types_[key])):
            shown.append((key, json.dumps(ours[key])))
        else:
            withheld.append(key)
    return shown, withheld


def reference_config(preset: str | None) -> tuple[RunConfig, str]:
    """The config a run is compared with, and how the card names it."""
    if preset is not None:
        path = Path(preset).resolve()
        if path.parent == PROJECT_CONFIGS and path.is_file():
            return load_config(RunConfig, path), f"the project preset `configs/{path.name}`"
    return RunConfig(), "retclip-dist's defaults (`retclip-train --print-config` without a preset)"


def split_counts(shards: str, storage_options: dict[str, Any]) -> tuple[list[SplitCount], bool]:
    """Patients and shards per split, and whether the set is pseudonymised, from its manifest."""
    manifest = read_manifest(shards, storage_options)
    counts: dict[str, list[int]] = {}
    for shard in manifest.shards:
        entry = counts.setdefault(shard.split, [0, 0])
        entry[0] += shard.count
        entry[1] += 1
    url, _ = manifest_url(shards)
    with fsspec.open(url, "rt", encoding="utf-8", **storage_options) as fh:
        pseudonymised = json.load(fh).get(PSEUDONYMISED_FIELD) is True
    return [SplitCount(name, p, n) for name, (p, n) in sorted(counts.items())], pseudonymised


def step_seconds(records: list[dict[str, Any]]) -> float | None:
    """Time in training steps from the ``train`` records: each record's mean data wait + step time times
    the steps since the record before it. A step logged twice (a resume replayed it) counts once."""
    by_step = {r["step"]: r for r in records if "step_ms" in r and "data_wait_ms" in r}
    if not by_step:
        return None
    total_ms, previous = 0.0, 0
    for step in sorted(by_step):
        record = by_step[step]
        total_ms += (step - previous) * (record["step_ms"] + record["data_wait_ms"])
        previous = step
    return total_ms / 1e3


def _recipe(cfg: RunConfig, processes: int) -> list[tuple[str, str]]:
    data, train = cfg.data, cfg.train
    negatives = "the global batch (all processes)" if cfg.loss.gather else "each process's own batch"
    length = f"{train.epochs} epochs" + (f", at most {train.max_steps} steps" if train.max_steps else "")
    return [
        ("trained on split", f"`{data.train_split}`"),
        ("global batch", f"{data.batch_size * processes} patients ({processes} x {data.batch_size})"),
        ("length", length),
        ("optimiser", f"AdamW, lr {train.lr:g}, weight decay {train.weight_decay:g}, {train.schedule} after "
         f"{train.warmup_steps} warmup steps"),
        ("precision", "float32" if train.precision == "no" else train.precision),
        ("loss", f"{cfg.model.loss}, negatives from {negatives}, identical reports: {cfg.loss.duplicates}"),
        ("text", f"context {data.context_length} tokens, per-eye reports {'on' if data.eye_reports else 'off'}"),
        ("augmentation", f"crop scale {list(data.crop_scale)}, jitter {data.jitter:g}, erase {data.erase_prob:g}, "
         f"flip {'on' if data.hflip else 'off'}"),
        ("frozen parts", ", ".join(train.freeze) or "none"),
    ]  # fmt: skip


def run_summary(
    cfg: RunConfig, preset: str | None, out_dir: Path, processes: int, step: int
) -> TrainingSummary | None:
    """The card's training facts for a run that ended at ``step`` (main process, after validation), or
    None with a warning when they cannot be read: the card then says so, and the model is saved anyway."""
    try:
        return _gather(cfg, preset, out_dir, processes, step)
    except Exception as exc:
        # Whatever goes wrong reading the manifest or the records, a finished run must still save its model.
        log.warning("model card: no training summary (%s: %s)", type(exc).__name__, exc)
        return None


def _gather(cfg: RunConfig, preset: str | None, out_dir: Path, processes: int, step: int) -> TrainingSummary:
    splits, pseudonymised = split_counts(cfg.data.shards, cfg.data.storage_options)
    metrics = out_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    epochs = [r for r in records if r["kind"] == "epoch"]
    val = [r for r in records if r["kind"] == "val"]
    reference, named = reference_config(preset)
    shown, withheld = config_changes(cfg, reference)
    last = max(val, key=lambda r: r["step"]) if val else None
    return TrainingSummary(
        splits=splits,
        pseudonymised=pseudonymised,
        processes=processes,
        steps=step,
        epochs=len({r["epoch"] for r in epochs}),
        patients_seen=step * cfg.data.batch_size * processes,
        step_seconds=step_seconds([r for r in records if r["kind"] == "train"]),
        recipe=_recipe(cfg, processes),
        changes_from=named,
        changes=shown,
        withheld=withheld,
        validation=None if last is None else {k: v for k, v in last.items() if "/" in k or k == "samples"},
        validation_step=None if last is None else last["step"],
    )
