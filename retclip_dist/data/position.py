"""What a checkpoint's data position records, and whether a run may continue from it.

A rank's loader state (``TrainLoader.state_dict``, saved as ``data_rankN.json``) is a position (epoch, step,
the raw samples each stream consumed, the epoch's earlier segments on other layouts, the patients trained
on so far this epoch) and, under ``layout``, the record built here: everything that decides which patient
comes when and what a sample holds. A run continues from a position only where the record still holds:

- handled exactly: the rank, world size, partitions, loader workers, per-rank batch (the global batch
  stays) and the shuffle buffer. The rest of the epoch is re-planned over the patients not used yet
  (data/reshape.py), each segment replayed with the buffer it was read with.
- refused, naming the field and both values: the training shards (name, sample count and sha256 of each,
  from manifest.json: a rebuilt set with other content has other digests, a copied one the same), the
  seed, the settings that change a sample (``SAMPLE_FIELDS``) and, mid-epoch, the plan format. A position
  written before a field was recorded is refused as "saved not recorded": it cannot be checked.

A refusal says how to go on anyway: ``--checkpoint.reset_data true`` starts the checkpoint's epoch from its
first patient with the settings as they are now (patients already used in that epoch are read again).
``retclip-train --check`` and every rank before training read the checkpoint and refuse with the same
words (train/preflight.py); the loader checks again when it loads the position.
"""

from __future__ import annotations

import hashlib
from typing import Any

from retclip_dist.data.config import DataConfig
from retclip_dist.data.plan import LEGACY_PLAN_FORMAT, PLAN_FORMAT, Layout
from retclip_dist.shardset import ShardInfo

# Data settings that change what a sample holds (its tokens, its pixels): a resume keeps them. Where the
# same augmentation runs (augment_on, decode_size) and how text is padded (same loss) may change.
SAMPLE_FIELDS = (
    "eye_reports",
    "context_length",
    "image_size",
    "crop_scale",
    "crop_ratio",
    "jitter",
    "erase_prob",
    "hflip",
)
# Handled exactly by re-planning the rest of the epoch (data/reshape.py).
RESHAPED = ("rank", "world_size", "partitions", "workers", "batch_size", "shuffle_buffer")
# Refused when they change, in the order they are checked; the plan only matters mid-epoch (at an epoch's
# first step every position is zero under any plan).
FIXED = ("shards", "seed", *SAMPLE_FIELDS)
MID_EPOCH = ("plan",)
# The config field behind each record key, as refusals name it.
FIELD = {
    "shards": "data.shards",
    "seed": "train.seed",
    "plan": "data plan",
    "workers": "data.num_workers",
    "world_size": "processes",
    **{k: f"data.{k}" for k in ("partitions", "batch_size", "shuffle_buffer", *SAMPLE_FIELDS)},
}
_NOT_RECORDED = "not recorded"


class PositionError(ValueError):
    """A saved data position this run cannot continue from; ``reason`` names the field and both values."""

    def __init__(self, reason: str, epoch: int) -> None:
        super().__init__(f"cannot continue the data position: {reason}; {way_out(epoch)}")
        self.reason = reason


def way_out(epoch: int) -> str:
    """What a refusal offers instead."""
    return (
        f"resume with the saved value, or pass --checkpoint.reset_data true to start epoch {epoch}'s data "
        "from its first patient (patients it already used are read again)"
    )


def shard_record(shards: list[ShardInfo]) -> list[dict[str, Any]]:
    """Name, sample count and manifest sha256 of each training shard, in the split's (sorted) order."""
    return [{"name": s.name, "count": s.count, "sha256": s.sha256} for s in shards]


def layout_record(cfg: DataConfig, shards: list[ShardInfo], layout: Layout, workers: int, seed: int) -> dict:
    """The ``layout`` entry of a loader state: the data layout and what decides the order and the samples."""
    record: dict[str, Any] = {
        "rank": layout.rank,
        "world_size": layout.world_size,
        "partitions": layout.partitions,
        "batch_size": layout.batch_size,
        "workers": workers,
        "shuffle_buffer": cfg.shuffle_buffer,
        "seed": seed,
        "shards": shard_record(shards),
        "plan": PLAN_FORMAT,
    }
    for name in SAMPLE_FIELDS:
        value = getattr(cfg, name)
        record[name] = list(value) if isinstance(value, tuple) else value  # as JSON reads it back
    return record


def patient_id(key: str) -> int:
    """A signed 64-bit digest of a sample key: what the epoch's tally keeps (no identifier in checkpoints)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def mid_epoch(state: dict[str, Any]) -> bool:
    return bool(state["step"] or state.get("history"))


def _saved(state: dict[str, Any], key: str) -> Any:
    layout = state["layout"]
    if key == "plan":
        # Positions without a plan record come from the shard-per-stream plan.
        return layout.get("plan", LEGACY_PLAN_FORMAT)
    if key == "shards" and not isinstance(layout.get("shards"), list):
        return _NOT_RECORDED  # an earlier version recorded only how many
    return layout.get(key, _NOT_RECORDED)


def _shard_difference(then: list[dict[str, Any]], now: list[dict[str, Any]]) -> str:
    """The first difference between two shard records, in a few words."""
    for old, new in zip(then, now, strict=False):
        if old["name"] != new["name"]:
            return f"saved {old['name']}, now {new['name']} in its place"
        if old != new:
            return (
                f"{old['name']} saved with {old['count']} samples (sha256 {str(old['sha256'])[:12]}), now "
                f"{new['count']} (sha256 {str(new['sha256'])[:12]})"
            )
    counts = (sum(s["count"] for s in then), sum(s["count"] for s in now))
    return f"saved {len(then)} shards ({counts[0]} samples), now {len(now)} ({counts[1]} samples)"


def changed(state: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Record keys whose saved value differs from ``now``, with (saved, now)."""
    keys = [k for k in now if k in FIXED or k in RESHAPED or (k in MID_EPOCH and mid_epoch(state))]
    return {k: (_saved(state, k), now[k]) for k in keys if _saved(state, k) != now[k]}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    """``changed``'s result in words: "data.num_workers: saved 2, now 1, ..."."""
    return ", ".join(f"{FIELD.get(k, k)}: saved {old}, now {new}" for k, (old, new) in changes.items())


def refusal(state: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why a run that records ``now`` cannot continue from a saved rank's ``state`` (field and both values);
    None if it can.

    Any saved rank's state does (they record the same but their rank); ``now`` is this run's
    ``layout_record``. What remains is exact or re-planned (``changed``, data/reshape.py).
    """
    diff = changed(state, now)
    for key in (*FIXED, *MID_EPOCH):
        if key not in diff:
            continue
        then, new = diff[key]
        if key == "shards" and then != _NOT_RECORDED:
            return f"{FIELD[key]}: the training shards changed ({_shard_difference(then, new)})"
        if key == "shards":
            new = f"{len(new)} shards named with their sha256"
        return f"{FIELD[key]}: saved {then}, now {new}"
    saved = state["layout"]
    global_then = saved["batch_size"] * saved["world_size"]
    global_now = now["batch_size"] * now["world_size"]
    if global_then != global_now:
        return (
            f"data.batch_size: saved {saved['batch_size']} on {saved['world_size']} processes (global batch "
            f"{global_then}), now {now['batch_size']} on {now['world_size']} (global batch {global_now})"
        )
    return None


def check(state: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise ``PositionError`` with ``refusal``'s reason, if any."""
    reason = refusal(state, now)
    if reason is not None:
        raise PositionError(reason, state["epoch"])
