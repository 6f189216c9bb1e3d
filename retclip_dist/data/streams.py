"""Raw samples from WebDataset shards, a seeded shuffle buffer, and resumable per-stream positions."""

from __future__ import annotations

import logging
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import fsspec
from webdataset.tariterators import group_by_keys, tar_file_iterator

from retclip_dist.data.manifest import ShardInfo
from retclip_dist.data.skips import SkipCounter

log = logging.getLogger("retclip_dist.data")
T = TypeVar("T")
Raw = dict[str, Any]
# What a damaged or missing tar raises while being read: the rest of that shard is lost, not the run.
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


def read_shard(shard: ShardInfo, storage_options: dict, counter: SkipCounter) -> Iterator[Raw]:
    """Complete samples of one tar (undecoded bytes per member); what cannot be read is counted."""
    seen = 0
    problem = "fewer samples than the manifest lists"
    try:
        with fsspec.open(shard.url, "rb", **storage_options) as f:
            files = ({**member, "__url__": shard.url} for member in tar_file_iterator(f))
            for sample in group_by_keys(files):
                seen += 1
                yield sample
    except SHARD_ERRORS as exc:
        problem = f"{type(exc).__name__}: {exc}"
    counter.add("shard_error", shard.count - seen, f"{shard.url} after {seen} samples ({problem})")


def shuffled(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Buffered shuffle: each new item replaces a random buffered one, which is emitted."""
    size = max(size, 1)
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def stream_samples(
    shards: tuple[ShardInfo, ...],
    seed: int,
    buffer: int,
    start: int,
    decode: Callable[[Raw], T | None],
    storage_options: dict,
    counter: SkipCounter,
) -> Iterator[tuple[int, T]]:
    """Decoded samples of one stream after its first ``start`` raw samples, each with its raw position.

    The raw order is a pure function of (shards, seed, buffer), so skipping ``start`` raw samples
    (without decoding them) lands exactly where a checkpointed run stopped. Counts are muted while
    replaying those positions: the checkpoint already holds them. A stream asked for more than it holds
    (its shards lost samples to corruption) starts over in the same order, counting each reused sample,
    so that every rank still runs the planned number of steps.
    """
    pos = 0
    passes = 0
    while True:
        pass_start, usable = pos, 0
        raw = shuffled(
            (s for shard in shards for s in read_shard(shard, storage_options, counter)),
            buffer,
            random.Random(seed),
        )
        counter.muted = passes > 0 or pos < start
        for item in raw:
            pos += 1
            if pos > start:
                sample = decode(item)
                if sample is not None:
                    usable += 1
                    if passes:
                        counter.counts["reused"] += 1
                    yield pos, sample
            counter.muted = passes > 0 or pos < start
        counter.muted = False
        if usable == 0 and pass_start >= start:
            names = [s.url for s in shards]
            raise ValueError(f"no usable sample in shards {names}; they cannot fill their planned batches")
        passes += 1
        log.warning(
            "stream over %d shard(s) came up short; reading it again (pass %d)", len(shards), passes + 1
        )
