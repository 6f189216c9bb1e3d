"""Raw samples from WebDataset shards, a seeded shuffle buffer, and resumable per-stream positions."""

from __future__ import annotations

import logging
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import fsspec
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from retclip_dist.data.plan import ShardRange
from retclip_dist.data.skips import SkipCounter
from retclip_dist.shardset import ShardInfo

log = logging.getLogger("retclip_dist.data")
T = TypeVar("T")
Raw = dict[str, Any]
# What a damaged or missing tar raises while being read: the rest of that shard is lost, not the run.
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


class _FromSample:
    """``select_files`` predicate that drops the members of a tar's first ``start`` samples unread.

    It groups member names into samples exactly as ``group_by_keys`` does (consecutive names with the
    same ``base_plus_ext`` prefix), so sample numbers agree with a full read; skipped members are passed
    over by the tar reader without copying their bytes.
    """

    def __init__(self, start: int) -> None:
        self.start = start
        self.index = -1
        self.prefix: str | None = None

    def __call__(self, name: str) -> bool:
        prefix, _ = base_plus_ext(name)
        if prefix is None:
            return True  # group_by_keys ignores it too
        if prefix != self.prefix:
            self.index += 1
            self.prefix = prefix
        return self.index >= self.start


def read_shard(
    shard: ShardInfo,
    storage_options: dict,
    counter: SkipCounter,
    start: int = 0,
    stop: int | None = None,
    holes: frozenset[int] = frozenset(),
) -> Iterator[Raw]:
    """Complete samples ``start:stop`` of one tar (undecoded bytes per member); what is lost is counted.

    Without ``stop`` the whole tar is read, and a shortfall against the manifest's count is counted.
    Samples numbered in ``holes`` are read past without being yielded or counted (a reshaped resume).
    """
    want = (shard.count if stop is None else stop) - start - len(holes)
    seen = 0
    problem = "fewer samples than the manifest lists"
    if want <= 0 and stop is not None:
        return
    try:
        with fsspec.open(shard.url, "rb", **storage_options) as f:
            members = tar_file_iterator(f, select_files=_FromSample(start) if start else None)
            samples = group_by_keys({**member, "__url__": shard.url} for member in members)
            for index, sample in enumerate(samples, start):
                if index in holes:
                    continue
                seen += 1
                yield sample
                if seen == want and stop is not None:
                    return
    except SHARD_ERRORS as exc:
        problem = f"{type(exc).__name__}: {exc}"
    where = f"samples {start}:{start + want}" if start or stop is not None else "all samples"
    counter.add("shard_error", want - seen, f"{shard.url} ({where}) after {seen} samples ({problem})")


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
    ranges: tuple[ShardRange, ...],
    seed: int,
    buffer: int,
    start: int,
    decode: Callable[[Raw], T | None],
    storage_options: dict,
    counter: SkipCounter,
) -> Iterator[tuple[int, T]]:
    """Decoded samples of one stream after its first ``start`` raw samples, each with its raw position.

    The raw samples are the stream's shard ranges read in order. The raw order is a pure function of
    (ranges, seed, buffer), so skipping ``start`` raw samples (without decoding them) lands exactly where
    a checkpointed run stopped. Counts are muted while replaying those positions: the checkpoint already
    holds them. A stream asked for more than it holds
    (its shards lost samples to corruption) starts over in the same order, counting each reused sample,
    so that every rank still runs the planned number of steps.
    """
    pos = 0
    passes = 0
    while True:
        pass_start, usable = pos, 0
        raw = shuffled(
            (
                s
                for r in ranges
                for s in read_shard(r.shard, storage_options, counter, r.start, r.stop, r.holes)
            ),
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
            names = [f"{r.shard.url}[{r.start}:{r.stop}]" for r in ranges]
            raise ValueError(f"no usable sample in {names}; they cannot fill their planned batches")
        passes += 1
        log.warning(
            "stream over %d shard range(s) came up short; reading it again (pass %d)", len(ranges), passes + 1
        )
