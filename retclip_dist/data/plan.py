"""Which shards each partition and worker reads in an epoch, and which worker serves each step.

The plan depends on the shard list, the partition count P, the logical worker count W, the micro-batch
size and (seed, epoch), never on the world size: a rank of N serves partitions {p : p % N == rank}, so a
run with N ranks and one with a single rank (same P) see the same global batches. Every rank computes
the whole plan from the manifest, so all ranks agree on the step count without talking to each other.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from retclip_dist.data.manifest import ShardInfo


def derive_seed(*parts: int) -> int:
    """A stable 64-bit seed from integers (Python's hash() of a tuple changes between processes)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class Layout:
    rank: int  # this process's rank
    world_size: int  # number of ranks
    partitions: int  # data partitions P; a multiple of world_size
    batch_size: int  # patients per rank per step

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.partitions % self.world_size:
            raise ValueError(
                f"data.partitions={self.partitions} is not a multiple of the world size {self.world_size}"
            )
        per_rank = self.partitions // self.world_size
        if self.batch_size % per_rank:
            raise ValueError(
                f"data.batch_size={self.batch_size} does not split over the {per_rank} partitions of each rank"
            )

    @property
    def local_partitions(self) -> list[int]:
        return list(range(self.rank, self.partitions, self.world_size))

    @property
    def micro_batch(self) -> int:
        """Patients each partition contributes to a rank's batch."""
        return self.batch_size // (self.partitions // self.world_size)


@dataclass(frozen=True)
class EpochPlan:
    streams: tuple[tuple[tuple[ShardInfo, ...], ...], ...]  # streams[p][w]: shards of partition p, worker w
    caps: tuple[int, ...]  # batches each logical worker yields this epoch
    order: tuple[int, ...]  # logical worker that serves each step
    dropped: int  # samples of the split that no step uses this epoch

    @property
    def steps(self) -> int:
        return len(self.order)


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


def plan_epoch(
    shards: list[ShardInfo], partitions: int, workers: int, micro_batch: int, seed: int, epoch: int
) -> EpochPlan:
    """Shuffle the split's shards for this epoch and derive the per-step schedule."""
    order = list(shards)
    random.Random(derive_seed(seed, epoch)).shuffle(order)
    streams = tuple(
        tuple(tuple(order[p::partitions][w::workers]) for w in range(workers)) for p in range(partitions)
    )
    # A step takes one micro-batch from every partition's stream of the serving worker, so a worker can
    # serve as many steps as its smallest partition stream holds micro-batches.
    caps = tuple(
        min(sum(s.count for s in streams[p][w]) // micro_batch for p in range(partitions))
        for w in range(workers)
    )
    total = sum(s.count for s in shards)
    used = sum(caps) * micro_batch * partitions
    return EpochPlan(streams=streams, caps=caps, order=tuple(round_robin(caps)), dropped=total - used)
