"""Epoch plans: shard assignment, step counts, dropped samples and the worker order."""

from __future__ import annotations

import pytest

from retclip_dist.data.manifest import ShardInfo
from retclip_dist.data.plan import Layout, plan_epoch, round_robin


def _shards(counts: list[int]) -> list[ShardInfo]:
    return [
        ShardInfo(url=f"/s/train-{i:06d}.tar", name=f"train-{i:06d}.tar", split="train", count=c)
        for i, c in enumerate(counts)
    ]


def test_round_robin_passes_over_exhausted_workers() -> None:
    assert round_robin([3, 1, 0, 2]) == [0, 1, 3, 0, 3, 0]
    assert round_robin([0, 0]) == []


def test_equal_shards_give_known_steps_and_drop() -> None:
    # 10 shards of 4, P=2: each partition holds 5 shards; worker 0 reads 3 (12 samples), worker 1 reads 2 (8).
    plan = plan_epoch(_shards([4] * 10), partitions=2, workers=2, micro_batch=3, seed=0, epoch=0)
    assert plan.caps == (4, 2)
    assert plan.order == (0, 1, 0, 1, 0, 0)
    assert plan.steps == 6
    assert plan.dropped == 40 - 6 * 3 * 2


def test_every_shard_is_read_by_exactly_one_stream_and_order_changes_by_epoch() -> None:
    shards = _shards([5, 3, 4, 4, 2, 6, 4])
    plans = [plan_epoch(shards, partitions=2, workers=3, micro_batch=2, seed=7, epoch=e) for e in (0, 1)]
    for plan in plans:
        names = sorted(s.name for part in plan.streams for stream in part for s in stream)
        assert names == [s.name for s in shards]
    first = [[s.name for s in stream] for stream in plans[0].streams[0]]
    second = [[s.name for s in stream] for stream in plans[1].streams[0]]
    assert first != second
    again = plan_epoch(shards, partitions=2, workers=3, micro_batch=2, seed=7, epoch=0)
    assert again == plans[0]


def test_fewer_shards_than_streams_leaves_idle_workers_out_of_the_order() -> None:
    plan = plan_epoch(_shards([4, 4]), partitions=1, workers=4, micro_batch=2, seed=0, epoch=0)
    assert plan.caps == (2, 2, 0, 0)
    assert plan.order == (0, 1, 0, 1)
    assert plan.dropped == 0


def test_layout_serves_partitions_round_robin_and_splits_the_batch() -> None:
    layout = Layout(rank=1, world_size=2, partitions=6, batch_size=12)
    assert layout.local_partitions == [1, 3, 5]
    assert layout.micro_batch == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"rank": 0, "world_size": 2, "partitions": 3, "batch_size": 4},
            "not a multiple of the world size 2",
        ),
        (
            {"rank": 0, "world_size": 1, "partitions": 3, "batch_size": 4},
            "does not split over the 3 partitions",
        ),
        ({"rank": 2, "world_size": 2, "partitions": 2, "batch_size": 4}, "rank 2 is outside world size 2"),
    ],
)
def test_layout_rejects_inconsistent_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Layout(**kwargs)
