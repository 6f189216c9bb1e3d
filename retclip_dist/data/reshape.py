"""The rest of an interrupted epoch on another data layout (ranks, partitions or workers).

A stream's resume position counts the raw samples its shuffle buffer has emitted. The buffer draws its
random numbers from the stream's seed and the number of items only, never from their content, so
replaying it over sample identities (shard URL, sample number) gives exactly the samples the
interrupted run used, without reading a tar. The epoch's tail is every sample of the split not used
yet, in the epoch's shard order and each tar's own order, cut into the new layout's P x W streams by
sample ranges exactly as ``plan_epoch`` cuts a whole epoch (fewer than one global batch stays unused);
each tail stream has its own seeded shuffle buffer, seeded by ``stream_seed(..., generation)`` where
the generation counts the reshapes within the epoch. A run stopped again during a tail and resumed on
yet another layout replays every earlier segment the same way, so a segment record is
(partitions, workers, micro-batch, every stream's position, the shuffle buffer it was read with): a new
buffer size is a new layout like any other.

What the replay cannot see: samples a damaged tar lost (the manifest's count is replayed). Samples of
such a tar may then be used twice or not at all in that epoch; the loss itself was counted when read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retclip_dist.data.plan import (
    EpochPlan,
    cut_ranges,
    epoch_shards,
    plan_epoch,
    round_robin,
    stream_seed,
    worker_caps,
)
from retclip_dist.data.streams import emission_order
from retclip_dist.shardset import ShardInfo

Sample = tuple[str, int]  # (shard URL, sample number in the tar)


@dataclass(frozen=True)
class Segment:
    partitions: int  # P of the layout that read this part of the epoch
    workers: int  # logical workers W
    micro_batch: int  # patients per partition per step
    positions: tuple[tuple[int, ...], ...]  # positions[p][w]: raw samples stream (p, w) emitted
    buffer: int  # samples each stream's shuffle buffer held (data.shuffle_buffer)

    def record(self) -> dict[str, Any]:
        return {
            "partitions": self.partitions,
            "workers": self.workers,
            "micro_batch": self.micro_batch,
            "positions": [list(row) for row in self.positions],
            "buffer": self.buffer,
        }

    @staticmethod
    def from_record(rec: dict[str, Any]) -> Segment:
        positions = tuple(tuple(r) for r in rec["positions"])
        return Segment(rec["partitions"], rec["workers"], rec["micro_batch"], positions, rec["buffer"])


def used_by(plan: EpochPlan, segment: Segment, seed: int, epoch: int, generation: int) -> set[Sample]:
    """The samples the streams of ``plan`` emitted up to ``segment``'s positions."""
    used: set[Sample] = set()
    for p, row in enumerate(plan.streams):
        for w, ranges in enumerate(row):
            position = segment.positions[p][w]
            if not position:
                continue
            items = [(r.shard.url, i) for r in ranges for i in r.indices()]
            order = emission_order(len(items), segment.buffer, stream_seed(seed, epoch, p, w, generation))
            used.update(items[j] for j in order[:position])
    return used


def plan_rest(
    shards: list[ShardInfo],
    order: list[ShardInfo],
    used: set[Sample],
    partitions: int,
    workers: int,
    micro: int,
) -> EpochPlan:
    """Plan the samples of ``order`` (the epoch's shard order) not in ``used`` for a layout."""
    left = [[i for i in range(s.count) if (s.url, i) not in used] for s in order]
    remaining = sum(len(ix) for ix in left)
    steps = remaining // (micro * partitions)
    caps = worker_caps(steps, workers)
    pieces = cut_ranges(order, [caps[w] * micro for _ in range(partitions) for w in range(workers)], left)
    return EpochPlan(
        streams=tuple(tuple(pieces[p * workers : (p + 1) * workers]) for p in range(partitions)),
        caps=caps,
        order=tuple(round_robin(caps)),
        samples=sum(s.count for s in shards),
        unused=remaining - steps * micro * partitions,
    )


def replan(
    shards: list[ShardInfo],
    seed: int,
    epoch: int,
    history: list[Segment],
    partitions: int,
    workers: int,
    micro_batch: int,
) -> EpochPlan:
    """The plan for the rest of ``epoch`` after the segments of ``history``, on a new layout."""
    order = epoch_shards(shards, seed, epoch)
    used: set[Sample] = set()
    for generation, seg in enumerate(history):
        if generation == 0:
            plan = plan_epoch(shards, seg.partitions, seg.workers, seg.micro_batch, seed, epoch)
        else:
            plan = plan_rest(shards, order, used, seg.partitions, seg.workers, seg.micro_batch)
        used |= used_by(plan, seg, seed, epoch, generation)
    return plan_rest(shards, order, used, partitions, workers, micro_batch)
