"""What a resume reads from storage: at most one shard per stream beyond a fresh start, plus the samples its
shuffle buffer still held; and the same samples, in the same order, as the uninterrupted stream."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from conftest import counting_shard_reads, fake_patients, write_shard_set
from webdataset.tariterators import base_plus_ext

from retclip_dist.data.plan import plan_epoch
from retclip_dist.data.skips import SkipCounter
from retclip_dist.data.streams import stream_samples
from retclip_dist.shardset import read_manifest

BUFFER = 3
PER_SHARD = 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list:
    root = tmp_path_factory.mktemp("reads")
    write_shard_set(root, {"train": fake_patients(30, size=48, seed=2)}, per_shard=PER_SHARD)
    return read_manifest(str(root)).split("train")


def _sample_bytes(path: str) -> int:
    """The largest sample of a tar in tar bytes (headers and padding included)."""
    sizes: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _ = base_plus_ext(info.name)
            sizes[key] = sizes.get(key, 0) + 512 + -(-info.size // 512) * 512
    return max(sizes.values())


def _first(ranges: tuple, start: int) -> tuple[int, int, list[str]]:
    """(bytes, tars opened) until the first sample after ``start``, and the keys of the rest of the pass."""
    stream = stream_samples(ranges, 7, BUFFER, start, lambda raw: raw["__key__"], {}, SkipCounter())
    with counting_shard_reads() as counts:
        keys = [next(stream)[1]]
        first_bytes, opens = counts["bytes"], counts["opens"]
        keys += [next(stream)[1] for _ in range(len(ranges) * PER_SHARD - start - 1)]
    return first_bytes, opens, keys


def test_a_resume_reads_one_shard_and_the_buffer_beyond_a_fresh_start(shards: list) -> None:
    ranges = plan_epoch(shards, 1, 1, 1, seed=7, epoch=0).streams[0][0]
    fresh_bytes, _, everything = _first(ranges, 0)
    assert sorted(everything) == [f"p{i:05d}" for i in range(30)]
    shard_bytes = max(Path(s.url).stat().st_size for s in shards)
    bound = fresh_bytes + shard_bytes + BUFFER * max(_sample_bytes(s.url) for s in shards)
    for start in (3, 12, 20, 27):
        first_bytes, opens, keys = _first(ranges, start)
        assert keys == everything[start:], start  # exactly the uninterrupted stream's rest
        assert first_bytes <= bound, (start, first_bytes, bound)
        # The whole shards before the buffer's oldest sample stay unopened.
        assert opens <= len(shards) - (start - BUFFER) // PER_SHARD + 1, (start, opens)
    # Reading everything before a late position would cost several shards: the bound can fail.
    assert bound < fresh_bytes + 3 * shard_bytes
