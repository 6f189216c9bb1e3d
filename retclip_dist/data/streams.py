"""Raw samples from WebDataset shards, a seeded shuffle buffer, and resumable per-stream positions."""

from __future__ import annotations

import logging
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from webdataset.tariterators import base_plus_ext

from retclip_dist.data.plan import ShardRange
from retclip_dist.data.skips import SkipCounter
from retclip_dist.shardset import ShardInfo

log = logging.getLogger("retclip_dist.data")
T = TypeVar("T")
Raw = dict[str, Any]
# What a damaged or missing tar raises while being read: the rest of that shard is lost, not the run.
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


@dataclass(frozen=True)
class Lost:
    """A wanted sample the tar did not deliver (damaged or short of the manifest's count)."""

    problem: str  # why, in a few words: the read's error or the shortfall


def _is_meta(name: str) -> bool:
    # WebDataset's tar reader passes over "__name__" members and "__x__/" paths; so does this one.
    return ("/" not in name and name.startswith("__") and name.endswith("__")) or bool(_META.match(name))


_META = re.compile(r"__[^/]*__($|/)")


def _tar_samples(
    f: Any, url: str, wanted: frozenset[int] | None, last: int | None
) -> Iterator[tuple[int, Raw]]:
    """Complete samples of a seekable tar, numbered in the tar's order, as WebDataset groups them.

    Members are grouped into samples as ``group_by_keys`` does (consecutive names with the same
    ``base_plus_ext`` prefix). Only the members of ``wanted`` samples (None: all) are read; the others are
    passed over by seeking from header to header, so their bytes are never fetched (a range read on
    object storage). A sample counts as complete once the next member's header is read and that
    member's data lies inside the file, or the tar ends: a damaged tar loses the same samples whichever
    of them are wanted.
    """
    size = f.seek(0, 2)
    f.seek(0)
    with tarfile.open(fileobj=f, mode="r:") as tar:
        index, prefix, sample = -1, None, None
        while (info := tar.next()) is not None:
            if info.offset_data + info.size > size:
                raise tarfile.ReadError(f"unexpected end of data in member {info.name}")
            if not info.isreg() or _is_meta(info.name):
                continue
            key, suffix = base_plus_ext(info.name)
            if key is None:
                continue  # group_by_keys ignores it too
            if key != prefix:
                if sample is not None:
                    yield index, sample
                index, prefix = index + 1, key
                if last is not None and index > last:
                    return
                sample = {"__key__": key, "__url__": url} if wanted is None or index in wanted else None
            if sample is None:
                continue
            suffix = suffix.lower()
            if suffix in sample:
                raise ValueError(f"{info.name}: duplicate file name in tar file")
            sample[suffix] = tar.extractfile(info).read()
        if sample is not None:
            yield index, sample


def read_shard(
    shard: ShardInfo, storage_options: dict, wanted: Sequence[int] | None = None
) -> Iterator[tuple[int, Raw | Lost]]:
    """Samples ``wanted`` (increasing sample numbers; None: the whole tar) of one tar, with their numbers.

    Every wanted number comes out once, in order: its raw sample (undecoded bytes per member), or
    ``Lost`` where the tar is damaged or shorter than wanted. Reading the whole tar, the samples the
    manifest lists but the tar lacks come out as ``Lost``. Nothing is counted here: the caller counts a
    loss when it reaches it, so a resumed stream that reads a sample again does not count it twice.
    """
    want = None if wanted is None else frozenset(wanted)
    last = None if wanted is None else (max(wanted) if wanted else -1)
    if last is not None and last < 0:
        return
    problem = "fewer samples than the manifest lists"
    done = -1
    try:
        with fsspec.open(shard.url, "rb", **storage_options) as f:
            for done, raw in _tar_samples(f, shard.url, want, last):
                yield done, raw
    except SHARD_ERRORS as exc:
        problem = f"{type(exc).__name__}: {exc}"
    missing = [i for i in (range(shard.count) if wanted is None else wanted) if i > done]
    if missing:
        log.warning("%s: samples from number %d on not read (%s)", shard.url, missing[0], problem)
    for i in missing:
        yield i, Lost(problem)


def read_range(
    shard: ShardInfo,
    storage_options: dict,
    counter: SkipCounter,
    start: int = 0,
    stop: int | None = None,
    holes: frozenset[int] = frozenset(),
) -> Iterator[Raw]:
    """Complete samples ``start:stop`` of one tar (without ``stop``: all of it) but ``holes``; the samples
    it cannot deliver are counted as one ``shard_error`` per range."""
    wanted = None
    if stop is not None or start or holes:
        wanted = [i for i in range(start, shard.count if stop is None else stop) if i not in holes]
    lost: list[Lost] = []
    for _, raw in read_shard(shard, storage_options, wanted):
        if isinstance(raw, Lost):
            lost.append(raw)
        else:
            yield raw
    if lost:
        where = f"samples {start}:{stop}" if start or stop is not None else "all samples"
        counter.add("shard_error", len(lost), f"{shard.url} ({where}): {lost[0].problem}")


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


def emission_order(count: int, size: int, seed: int) -> list[int]:
    """The order in which a shuffle buffer of ``size`` seeded with ``seed`` emits items ``0..count-1``.

    The buffer draws its random numbers from the seed and the number of items only, never from their
    content: this order is the one for any items, so a position can be replayed from identities alone.
    """
    return list(shuffled(range(count), size, random.Random(seed)))


def _emitted(
    ranges: tuple[ShardRange, ...], items: list[tuple[int, int]], tail: list[int], storage_options: dict
) -> Iterator[Raw | Lost]:
    """The raw samples of ``tail`` (indices into ``items``: (range, sample number)), in that order.

    Only the samples of ``tail`` are read, in the tars' order, and each is held only until its turn: the
    samples a shuffle buffer would hold at the tail's start are read again, the ones emitted before it
    are not; a range with none of them is not opened.
    """
    wanted: list[list[int]] = [[] for _ in ranges]
    for j in sorted(set(tail)):
        wanted[items[j][0]].append(j)

    def reads() -> Iterator[tuple[int, Raw | Lost]]:
        for k, flat in enumerate(wanted):
            if flat:
                numbers = [items[j][1] for j in flat]
                for j, (_, raw) in zip(
                    flat, read_shard(ranges[k].shard, storage_options, numbers), strict=True
                ):
                    yield j, raw

    source = reads()
    held: dict[int, Raw | Lost] = {}
    for j in tail:
        while j not in held:
            got, raw = next(source)
            held[got] = raw
        yield held.pop(j)


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

    The raw samples are the stream's shard ranges in order, through a seeded shuffle buffer; the order
    is ``emission_order`` over the manifest's samples, so a position is a pure function of (ranges, seed,
    buffer) and a resume at ``start`` reads only what comes after it: the samples the buffer still held
    and the rest of the stream (whole shards before them skipped unopened, the members before them in a
    tar passed over by seeking). A sample a damaged tar lost keeps its position and is counted when its
    turn comes, so a resumed run counts what the uninterrupted run counts. A stream asked for more than
    it holds (its shards lost samples to corruption) starts over in the same order, counting each reused
    sample, so that every rank still runs the planned number of steps.
    """
    items = [(k, i) for k, r in enumerate(ranges) for i in r.indices()]
    if not items:
        raise ValueError("a stream with no sample cannot fill its planned batches")
    order = emission_order(len(items), buffer, seed)
    passes, offset = divmod(start, len(items))
    pos = start
    while True:
        usable = 0
        # Counts of a pass after the first are muted: the loss was counted in the first.
        counter.muted = passes > 0
        for raw in _emitted(ranges, items, order[offset:], storage_options):
            pos += 1
            if isinstance(raw, Lost):
                counter.add("shard_error", 1)
                continue
            sample = decode(raw)
            if sample is not None:
                usable += 1
                if passes:
                    counter.counts["reused"] += 1
                yield pos, sample
        counter.muted = False
        if usable == 0 and offset == 0:
            names = [f"{r.shard.url}[{r.start}:{r.stop}]" for r in ranges]
            raise ValueError(f"no usable sample in {names}; they cannot fill their planned batches")
        passes, offset = passes + 1, 0
        log.warning(
            "stream over %d shard range(s) came up short; reading it again (pass %d)", len(ranges), passes + 1
        )
