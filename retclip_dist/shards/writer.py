"""Deterministic shard packing: each shard (named by shardset.shard_name) is written under a temporary
name, then published whole; rejects.jsonl text. The manifest.json text is shardset.manifest_json.

Tars are written with webdataset's own TarWriter: in webdataset 1.0.2 it takes ``mtime``, ``user``,
``group`` and ``mode`` arguments (uid/gid stay 0) and writes members in sorted order, so with fixed
values its output is byte-for-byte reproducible and readable by ``webdataset.WebDataset`` by design.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import IO, Any

from webdataset import TarWriter

from retclip_dist.io.files import OutputDir
from retclip_dist.shards.records import Reject
from retclip_dist.shardset import SOURCE_HASHES_FIELD, shard_name

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads every archive to a multiple of this


def member_bytes(members: dict[str, bytes]) -> int:
    """Bytes the members take in a tar: one header block each plus data rounded up to whole blocks."""
    return sum(_BLOCK + -(-len(data) // _BLOCK) * _BLOCK for data in members.values())


def tar_file_bytes(content: int) -> int:
    """Final tar size for ``content`` member bytes: two zero end blocks, padded to a whole record."""
    return -(-(content + 2 * _BLOCK) // _RECORD) * _RECORD


class _HashingFile:
    """Write-through wrapper so the sha256 and size are known without reading the shard back."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.fh.write(data)


class _OpenShard:
    def __init__(self, out: OutputDir, split: str, index: int) -> None:
        self.split = split
        self.name = shard_name(split, index)
        self.staged = out.staging_path(self.name)
        self.fh = open(self.staged, "wb")  # noqa: SIM115 - lives across many add() calls
        self.hashing = _HashingFile(self.fh)
        self.tar = TarWriter(
            self.hashing, user="retclip", group="retclip", mode=0o444, mtime=0.0, encoder=False
        )
        self.count = 0
        self.content = 0
        self.digests: list[str] = []

    def close(self) -> dict[str, Any]:
        self.tar.close()
        self.fh.close()
        return {
            "name": self.name,
            "split": self.split,
            "count": self.count,
            "bytes": self.hashing.bytes,
            "sha256": self.hashing.sha.hexdigest(),
            SOURCE_HASHES_FIELD: sorted(self.digests),
        }


class ShardWriter:
    """Packs samples into one open shard at a time; a shard closes when the split changes or it is full."""

    def __init__(
        self,
        out: OutputDir,
        max_count: int,
        max_size: int,
        next_index: dict[str, int],
        on_close: Callable[[dict[str, Any]], None],
    ) -> None:
        self.out = out
        self.max_count = max_count
        self.max_size = max_size
        self.next_index = dict(next_index)
        self.on_close = on_close
        self.current: _OpenShard | None = None

    def _full(self, split: str, size: int) -> bool:
        cur = self.current
        if cur is None:
            return False
        # A single sample bigger than max_size still gets a shard of its own rather than failing.
        over = tar_file_bytes(cur.content + size) > self.max_size
        return cur.split != split or cur.count >= self.max_count or over

    def add(self, split: str, key: str, members: dict[str, bytes], digests: tuple[str, ...] = ()) -> None:
        size = member_bytes(members)
        if self._full(split, size):
            self.close()
        if self.current is None:
            index = self.next_index.get(split, 0)
            self.next_index[split] = index + 1
            self.current = _OpenShard(self.out, split, index)
        self.current.tar.write({"__key__": key, **members})
        self.current.count += 1
        self.current.content += size
        self.current.digests.extend(digests)

    def close(self) -> None:
        """Publish the open shard (if any) and report it to ``on_close``."""
        if self.current is None:
            return
        entry = self.current.close()
        self.out.publish(self.current.staged, entry["name"])
        self.current = None
        self.on_close(entry)

    def abort(self) -> None:
        """Drop the open shard after a failure; its samples will be redone by the resumed run."""
        if self.current is None:
            return
        self.current.close()
        os.remove(self.current.staged)
        self.current = None


def rejects_jsonl(rejects: list[Reject]) -> str:
    return "".join(
        json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in sorted(rejects, key=lambda r: r.order)
    )
