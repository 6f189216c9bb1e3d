"""Read a shard set's ``manifest.json`` (local or any fsspec URL such as s3://)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec

FORMAT = "retclip-shards/1"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    url: str  # absolute location of the tar, ready for fsspec.open
    name: str  # file name relative to the manifest's directory
    split: str  # split the shard belongs to
    count: int  # patients stored in the shard


@dataclass(frozen=True)
class Manifest:
    location: str  # where the manifest.json was read from
    shards: tuple[ShardInfo, ...]  # every shard of every split, in manifest order

    def split(self, name: str) -> list[ShardInfo]:
        """Shards of split ``name`` sorted by name, so epoch shuffles start from a fixed order."""
        found = sorted((s for s in self.shards if s.split == name), key=lambda s: s.name)
        if not found:
            have = sorted({s.split for s in self.shards})
            raise ValueError(f"{self.location}: no shards for split {name!r}; splits present: {have}")
        return found

    def has_split(self, name: str) -> bool:
        return any(s.split == name for s in self.shards)


def _manifest_url(location: str) -> tuple[str, str]:
    """(manifest url, directory url) for a shard set directory or a path to its manifest.json."""
    location = location.rstrip("/")
    if location.endswith(".json"):
        return location, location.rsplit("/", 1)[0] if "/" in location else "."
    return f"{location}/{MANIFEST_NAME}", location


def _parse(url: str, root: str, data: Any) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{url}: not a {FORMAT} manifest (format is {found!r})")
    shards = []
    for i, entry in enumerate(data.get("shards", [])):
        try:
            name, split, count = entry["name"], entry["split"], entry["count"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{url}: shards[{i}] lacks name/split/count ({exc!r})") from exc
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"{url}: shards[{i}] ({name}) has an invalid count {count!r}")
        shards.append(ShardInfo(url=f"{root}/{name}", name=name, split=split, count=count))
    if not shards:
        raise ValueError(f"{url}: the manifest lists no shards")
    return Manifest(location=url, shards=tuple(shards))


def read_manifest(location: str, storage_options: dict | None = None) -> Manifest:
    """Load and check the manifest of the shard set at ``location`` (directory or manifest.json)."""
    url, root = _manifest_url(location)
    try:
        with fsspec.open(url, "rt", encoding="utf-8", **(storage_options or {})) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read shard manifest {url}: {exc}") from exc
    return _parse(url, root, data)
