"""Epoch plans: sample ranges per stream, step counts, unused samples and the worker order."""

from __future__ import annotations

import itertools
import random

import pytest

from retclip_dist.data.plan import (
    EpochPlan,
    Layout,
    ShardRange,
    cut_ranges,
    plan_epoch,
    round_robin,
    stream_seed,
)
from retclip_dist.data.reshape import Segment, replan, used_by
from retclip_dist.data.streams import shuffled
from retclip_dist.shardset import ShardInfo


def _shards(counts: list[int]) -> list[ShardInfo]:
    return [
        ShardInfo(url=f"/s/train-{i:06d}.tar", name=f"train-{i:06d}.tar", split="train", count=c)
        for i, c in enumerate(counts)
    ]


def _check(plan: EpochPlan, shards: list[ShardInfo], partitions: int, workers: int, micro: int) -> None:
    """Every stream holds its worker's batches; no sample is read twice; under one global batch unused."""
    total = sum(s.count for s in shards)
    global_batch = partitions * micro
    assert plan.samples == total
    assert plan.steps == total // global_batch == sum(plan.caps) == len(plan.order)
    assert plan.unused == total - plan.steps * global_batch
    assert 0 <= plan.unused < global_batch
    assert max(plan.caps) - min(plan.caps) <= 1
    assert list(plan.order) == round_robin(plan.caps)
    counts = {s.name: s.count for s in shards}
    read: dict[str, list[tuple[int, int]]] = {}
    for p in range(partitions):
        for w in range(workers):
            stream = plan.streams[p][w]
            assert sum(r.count for r in stream) == plan.caps[w] * micro
            for r in stream:
                assert 0 <= r.start < r.stop <= counts[r.shard.name]
                read.setdefault(r.shard.name, []).append((r.start, r.stop))
    for name, spans in read.items():
        spans.sort()
        for (_, stop), (start, _) in itertools.pairwise(spans):
            assert stop <= start, f"{name}: ranges overlap"
    assert sum(stop - start for spans in read.values() for start, stop in spans) == total - plan.unused


# (shard counts, ranks, workers, patients per rank): the cohorts of issue 9 in shards of 1,000 (the
# make-shards default), where the shard-per-stream plan left 10-26% unused, and awkward layouts.
LAYOUTS = {
    "193k on 8x12": ([1000] * 193, 8, 12, 256),
    "193k on 32x12": ([1000] * 193, 32, 12, 256),
    "50k on 8x8": ([1000] * 50, 8, 8, 256),
    "7,680 on 1x12": ([1000] * 7 + [680], 1, 12, 256),
    "7,373 train of 7,680 on 1x12": ([1000] * 7 + [373], 1, 12, 256),
    "very uneven shards": ([1, 5000, 3, 0, 777, 12, 2048, 1, 250, 9999, 2], 4, 3, 64),
    "one shard per rank": ([1000] * 8, 8, 12, 256),
    "one shard for many ranks": ([5000], 4, 2, 32),
    "more workers than shards": ([40, 7, 100], 2, 16, 8),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_use_all_but_less_than_one_global_batch(name: str) -> None:
    counts, ranks, workers, batch = LAYOUTS[name]
    shards = _shards(counts)
    for epoch in (0, 1):
        plan = plan_epoch(shards, partitions=ranks, workers=workers, micro_batch=batch, seed=3, epoch=epoch)
        _check(plan, shards, ranks, workers, batch)


def test_known_layout_cases() -> None:
    plan = plan_epoch(_shards([1000] * 193), partitions=8, workers=12, micro_batch=256, seed=0, epoch=0)
    assert (plan.steps, plan.unused) == (94, 488)  # 193,000 - 94 x 2,048; the old plan: 20,968
    assert plan.caps == (8,) * 10 + (7,) * 2
    plan = plan_epoch(_shards([1000] * 193), partitions=32, workers=12, micro_batch=256, seed=0, epoch=0)
    assert (plan.steps, plan.unused) == (23, 4584)  # the old plan: 45,544
    plan = plan_epoch(_shards([1000] * 8), partitions=8, workers=12, micro_batch=256, seed=0, epoch=0)
    assert plan.caps == (1, 1, 1) + (0,) * 9 and plan.unused == 8000 - 3 * 2048


def test_random_layouts() -> None:
    rng = random.Random(0)
    for _ in range(300):
        shards = _shards(
            [
                rng.choice([0, 1, 2, rng.randrange(1, 50), rng.randrange(1, 2000)])
                for _ in range(rng.randrange(1, 12))
            ]
        )
        partitions, workers, micro = rng.randrange(1, 9), rng.randrange(1, 13), rng.randrange(1, 40)
        plan = plan_epoch(shards, partitions, workers, micro, seed=rng.randrange(100), epoch=rng.randrange(3))
        _check(plan, shards, partitions, workers, micro)


def test_round_robin_passes_over_exhausted_workers() -> None:
    assert round_robin([3, 1, 0, 2]) == [0, 1, 3, 0, 3, 0]
    assert round_robin([0, 0]) == []


def test_cut_ranges_starts_and_ends_streams_inside_shards() -> None:
    a, empty, c = _shards([4, 0, 5])
    assert cut_ranges([a, empty, c], [3, 3, 2]) == [
        (ShardRange(a, 0, 3),),
        (ShardRange(a, 3, 4), ShardRange(c, 0, 2)),
        (ShardRange(c, 2, 4),),
    ]
    assert cut_ranges([a], [0, 4]) == [(), (ShardRange(a, 0, 4),)]
    with pytest.raises(ValueError, match="fewer samples than the 10 planned"):
        cut_ranges([a, c], [10])


def test_equal_shards_give_known_steps_and_unused() -> None:
    # 40 samples, global batch 2 x 3: 6 steps, 3 per worker, 9 samples per stream, 4 unused.
    plan = plan_epoch(_shards([4] * 10), partitions=2, workers=2, micro_batch=3, seed=0, epoch=0)
    assert plan.caps == (3, 3)
    assert plan.order == (0, 1, 0, 1, 0, 1)
    assert plan.steps == 6
    assert plan.unused == 4 and plan.samples == 40
    assert [sum(r.count for r in s) for part in plan.streams for s in part] == [9, 9, 9, 9]


def test_streams_follow_the_epoch_shuffle_and_the_plan_is_reproducible() -> None:
    shards = _shards([5, 3, 4, 4, 2, 6, 4])
    plans = [plan_epoch(shards, partitions=2, workers=3, micro_batch=2, seed=7, epoch=e) for e in (0, 1)]
    first = [[(r.shard.name, r.start, r.stop) for r in stream] for stream in plans[0].streams[0]]
    second = [[(r.shard.name, r.start, r.stop) for r in stream] for stream in plans[1].streams[0]]
    assert first != second
    again = plan_epoch(shards, partitions=2, workers=3, micro_batch=2, seed=7, epoch=0)
    assert again == plans[0]


def test_more_streams_than_steps_leaves_idle_workers_out_of_the_order() -> None:
    plan = plan_epoch(_shards([4, 4]), partitions=1, workers=4, micro_batch=3, seed=0, epoch=0)
    assert plan.caps == (1, 1, 0, 0)
    assert plan.order == (0, 1)
    assert plan.streams[0][2] == plan.streams[0][3] == ()
    assert plan.unused == 2


def test_layout_serves_partitions_round_robin_and_splits_the_batch() -> None:
    layout = Layout(rank=1, world_size=2, partitions=6, batch_size=12)
    assert layout.local_partitions == [1, 3, 5]
    assert layout.micro_batch == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"rank": 0, "world_size": 2, "partitions": 3, "batch_size": 4},
            "data.partitions=3: must be a multiple of the world size 2",
        ),
        (
            {"rank": 0, "world_size": 1, "partitions": 3, "batch_size": 4},
            "data.batch_size=4: must split evenly over the 3 partitions",
        ),
        ({"rank": 2, "world_size": 2, "partitions": 2, "batch_size": 4}, "rank=2: outside world size 2"),
    ],
)
def test_layout_rejects_inconsistent_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Layout(**kwargs)


def _stream_samples(plan: EpochPlan) -> list[list[tuple[str, int]]]:
    return [[(r.shard.url, i) for r in ranges for i in r.indices()] for row in plan.streams for ranges in row]


def _emitted(
    plan: EpochPlan, segment: Segment, seed: int, epoch: int, generation: int
) -> set[tuple[str, int]]:
    """What the loader's streams emitted up to ``segment``'s positions, as data/streams.stream_samples reads
    them (its buffered shuffle over the stream's samples, seeded per stream), not through used_by."""
    out = set()
    for p in range(segment.partitions):
        for w in range(segment.workers):
            items = _stream_samples(plan)[p * segment.workers + w]
            order = shuffled(items, segment.buffer, random.Random(stream_seed(seed, epoch, p, w, generation)))
            out |= set(itertools.islice(order, segment.positions[p][w]))
    return out


def test_reshaped_tails_read_every_unused_sample_once() -> None:
    # Random layouts stopped at random steps, re-planned for other layouts (twice): what the segments
    # used plus what the last plan reads is the split, each sample once, but fewer than a global batch.
    rng = random.Random(1)
    for _ in range(40):
        shards = _shards([rng.randrange(0, 60) for _ in range(rng.randrange(1, 8))])
        total = sum(s.count for s in shards)
        global_batch = rng.choice([2, 4, 6, 12])
        seed, epoch = rng.randrange(100), rng.randrange(3)
        history: list[Segment] = []
        used: list[tuple[str, int]] = []
        for generation in range(3):
            partitions = rng.choice([p for p in (1, 2, 3, 6) if global_batch % p == 0])
            workers, micro = rng.randrange(1, 4), global_batch // partitions
            if generation == 0:
                plan = plan_epoch(shards, partitions, workers, micro, seed, epoch)
            else:
                plan = replan(shards, seed, epoch, history, partitions, workers, micro)
            assert plan.samples == total and 0 <= plan.unused < global_batch
            assert plan.steps * global_batch + plan.unused == total - len(used)
            if generation == 2:
                break
            stop = rng.randrange(plan.steps + 1)
            positions = [[0] * workers for _ in range(partitions)]
            for w in plan.order[:stop]:
                for p in range(partitions):
                    positions[p][w] += micro
            # Each segment read with its own shuffle buffer size: a new size is a new layout too.
            buffer = rng.randrange(1, 20)
            segment = Segment(partitions, workers, micro, tuple(tuple(r) for r in positions), buffer)
            used_now = _emitted(plan, segment, seed, epoch, generation)
            assert used_by(plan, segment, seed, epoch, generation) == used_now  # what replan will subtract
            assert len(used_now) == stop * global_batch
            used += sorted(used_now)
            history.append(segment)
        rest = [s for stream in _stream_samples(plan) for s in stream]
        everything = used + rest
        assert len(everything) == len(set(everything)) == total - plan.unused
