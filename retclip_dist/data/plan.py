"""Which samples each partition and worker reads in an epoch, and which worker serves each step.

An epoch shuffles the split's shards (seeded by (seed, epoch)), lays their samples end to end in that
order and cuts the sequence into P x W streams by sample ranges: stream (p, w) is the
``p * W + w``-th piece, a run of whole micro-batches that may start and end inside a shard. With
S = N // (P x micro_batch) steps in the epoch, worker w serves ``S // W + (w < S % W)`` of them, so
every sample is read by exactly one stream and fewer than one global batch stays unused, whatever the
shard sizes, ranks or workers.

The plan depends on the shard list, the partition count P, the logical worker count W, the micro-batch
size and (seed, epoch), never on the world size: a rank of N serves partitions {p : p % N == rank}, so a
run with N ranks and one with a single rank (same P) see the same global batches. Every rank computes
the whole plan from the manifest, so all ranks agree on the step count without talking to each other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from retclip_dist.seeds import derive_seed
from retclip_dist.shardset import ShardInfo

# Recorded with a loader's position: a checkpoint's stream positions only mean something under the plan
# that wrote them. The shard-per-stream plan before this one wrote no record.
PLAN_FORMAT = "ranges/1"
LEGACY_PLAN_FORMAT = "shards/1"


class LayoutError(ValueError):
    """A layout that cannot serve the batch: ``field=value: reason`` (the config key it comes from)."""

    def __init__(self, field: str, value: int, reason: str) -> None:
        super().__init__(f"{field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


@dataclass(frozen=True)
class Layout:
    rank: int  # this process's rank
    world_size: int  # number of ranks
    partitions: int  # data partitions P; a multiple of world_size
    batch_size: int  # patients per rank per step

    def __post_init__(self) -> None:
        """The one check of a layout: the loader builds one per rank, preflight one for the whole run."""
        if not 0 <= self.rank < self.world_size:
            raise LayoutError("rank", self.rank, f"outside world size {self.world_size}")
        if self.partitions % self.world_size:
            raise LayoutError(
                "data.partitions", self.partitions, f"must be a multiple of the world size {self.world_size}"
            )
        per_rank = self.partitions // self.world_size
        if self.batch_size % per_rank:
            raise LayoutError(
                "data.batch_size",
                self.batch_size,
                f"must split evenly over the {per_rank} partitions of each rank "
                f"(data.partitions={self.partitions}, {self.world_size} processes)",
            )

    @property
    def local_partitions(self) -> list[int]:
        return list(range(self.rank, self.partitions, self.world_size))

    @property
    def micro_batch(self) -> int:
        """Patients each partition contributes to a rank's batch."""
        return self.batch_size // (self.partitions // self.world_size)


@dataclass(frozen=True)
class ShardRange:
    shard: ShardInfo  # the tar
    start: int  # first sample read, counted in the tar's own order
    stop: int  # one past the last sample read
    holes: frozenset[int] = frozenset()  # samples in [start, stop) passed over (used before a reshape)

    @property
    def count(self) -> int:
        return self.stop - self.start - len(self.holes)

    def indices(self) -> list[int]:
        """The tar's sample numbers this range reads, in order."""
        return [i for i in range(self.start, self.stop) if i not in self.holes]


@dataclass(frozen=True)
class EpochPlan:
    streams: tuple[tuple[tuple[ShardRange, ...], ...], ...]  # streams[p][w]: sample ranges, read in order
    caps: tuple[int, ...]  # batches each logical worker yields this epoch
    order: tuple[int, ...]  # logical worker that serves each step
    samples: int  # samples of the split, as the manifest counts them
    unused: int  # samples no stream reads this epoch: fewer than one global batch

    @property
    def steps(self) -> int:
        return len(self.order)


def stream_seed(seed: int, epoch: int, p: int, w: int, generation: int = 0) -> int:
    """Seed of stream (p, w)'s shuffle buffer; ``generation`` counts the reshapes within the epoch."""
    return derive_seed(seed, epoch, p, w) if generation == 0 else derive_seed(seed, epoch, p, w, generation)


def epoch_shards(shards: list[ShardInfo], seed: int, epoch: int) -> list[ShardInfo]:
    """The split's shards in the order of ``epoch``."""
    order = list(shards)
    random.Random(derive_seed(seed, epoch)).shuffle(order)
    return order


def worker_caps(steps: int, workers: int) -> tuple[int, ...]:
    # A step takes one micro-batch from the stream of every partition of the serving worker, so all
    # partitions of worker w hold the same number of micro-batches: its share of the steps.
    return tuple(steps // workers + (w < steps % workers) for w in range(workers))


def round_robin(caps: list[int] | tuple[int, ...]) -> list[int]:
    """Worker of each step when workers are polled in turn and exhausted ones are passed over.

    This is the order torch's DataLoader delivers batches in from iterable-style workers (in_order=True).
    """
    left = list(caps)
    order: list[int] = []
    while any(left):
        for w, n in enumerate(left):
            if n:
                order.append(w)
                left[w] -= 1
    return order


def cut_ranges(
    shards: list[ShardInfo], lengths: list[int], left: list[list[int]] | None = None
) -> list[tuple[ShardRange, ...]]:
    """Consecutive pieces of ``lengths`` samples from the shards laid end to end, in order.

    ``left[i]``: the sample numbers of ``shards[i]`` still to read, increasing (None: all of every
    shard); a piece passes over the others inside its span as holes (the rest of a reshaped epoch).
    """
    pieces: list[tuple[ShardRange, ...]] = []
    i, j = 0, 0  # the next unread sample: shard i, its j-th sample still to read
    for length in lengths:
        piece: list[ShardRange] = []
        while length:
            if i == len(shards):
                raise ValueError(f"the shards hold fewer samples than the {sum(lengths)} planned")
            numbers = range(shards[i].count) if left is None else left[i]
            take = numbers[j : j + length]
            if take:
                span = range(take[0], take[-1] + 1)
                holes = frozenset() if left is None else frozenset(span) - frozenset(take)
                piece.append(ShardRange(shards[i], span.start, span.stop, holes))
            j += len(take)
            length -= len(take)
            if j == len(numbers):
                i, j = i + 1, 0
        pieces.append(tuple(piece))
    return pieces


def plan_epoch(
    shards: list[ShardInfo], partitions: int, workers: int, micro_batch: int, seed: int, epoch: int
) -> EpochPlan:
    """Shuffle the split's shards for this epoch and cut them into the streams of every step."""
    order = epoch_shards(shards, seed, epoch)
    total = sum(s.count for s in shards)
    steps = total // (micro_batch * partitions)
    caps = worker_caps(steps, workers)
    pieces = cut_ranges(order, [caps[w] * micro_batch for _ in range(partitions) for w in range(workers)])
    streams = tuple(tuple(pieces[p * workers : (p + 1) * workers]) for p in range(partitions))
    return EpochPlan(
        streams=streams,
        caps=caps,
        order=tuple(round_robin(caps)),
        samples=total,
        unused=total - steps * micro_batch * partitions,
    )
