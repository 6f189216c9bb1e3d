"""The ``retclip-shards/1`` shard-set format, in one place: file names, sample members, manifest.json.

A shard set is a directory (local or any fsspec URL such as s3://) holding ``{split}-{index:06d}.tar``
WebDataset shards, ``manifest.json`` (format, options, per-shard name/split/count/bytes/sha256, reject
counts) and ``rejects.jsonl``. Each sample is one patient: the members below under its key. make-shards
writes it (shards/writer.py), ``make-shards verify`` checks it, the training loader and retclip-eval
read it; all of them take the names from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec

import retclip_dist

FORMAT = "retclip-shards/1"
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
SHARD_SUFFIX = ".tar"
# Shard entry of manifest.json: sorted digests of the source image files packed into the shard, which
# retclip-eval benchmark --shards matches evaluation images against (pretraining/evaluation leakage).
# A plain sha256 lets anyone holding a photo test whether its patient is in the set, so a pseudonymised
# set holds HMAC-SHA256(key, sha256) instead (Pseudonymiser.source_digest) and says so in SOURCE_HASH_FIELD.
SOURCE_HASHES_FIELD = "source_sha256"
SOURCE_HASH_FIELD = "source_hash"  # manifest.json: "sha256" (plain) or "hmac-sha256" (keyed); absent = plain
KEYED_SOURCE_HASH = "hmac-sha256"
PSEUDONYMISED_FIELD = "pseudonymised"  # manifest.json: true when ids are keyed hashes and paths left out
KEY_CHECK_FIELD = "key_check"  # manifest.json of a pseudonymised set: Pseudonymiser.key_check() of its key

EYES = ("left", "right")
IMAGE_MEMBER = {eye: f"{eye}.jpg" for eye in EYES}  # JPEG of each eye
REPORT_MEMBER = "report.txt"  # patient-level report, UTF-8
EYE_REPORT_MEMBER = {eye: f"{eye}.txt" for eye in EYES}  # per-eye report, only where the source has one
META_MEMBER = "json"  # patient_id, split, orig_size and (not pseudonymised) source paths
# What training and validation read from a sample; a sample lacking one of them is skipped and counted.
TRAINING_MEMBERS = (IMAGE_MEMBER["left"], IMAGE_MEMBER["right"], REPORT_MEMBER)
REQUIRED_MEMBERS = frozenset({META_MEMBER, *TRAINING_MEMBERS})
OPTIONAL_MEMBERS = frozenset(EYE_REPORT_MEMBER.values())


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}{SHARD_SUFFIX}"


def member_name(key: str, member: str) -> str:
    """The tar member name of one sample member, as WebDataset splits it (key up to the first dot)."""
    return f"{key}.{member}"


def is_eye_image(name: str) -> bool:
    """Whether a tar member name is an eye image (``KEY.left.jpg`` / ``KEY.right.jpg``)."""
    return name.endswith(tuple("." + m for m in IMAGE_MEMBER.values()))


def manifest_json(
    options: dict[str, Any],
    shards: list[dict[str, Any]],
    rejected: dict[str, int],
    pseudonymised: bool,
    key_check: str | None = None,
) -> str:
    """The manifest.json text; no timestamps or paths of the output, so equal inputs give equal bytes.

    ``shards`` are entries with name, split, count, bytes and sha256, in writing order; ``rejected`` is
    the count per reject reason. ``pseudonymised`` (never the key) tells readers and ``make-shards
    verify`` that ids are keyed hashes and samples carry no source paths; ``key_check`` (given when the
    source hashes are keyed) lets a reader tell whether a key file is the one the set was built with.
    """
    splits: dict[str, dict[str, int]] = {}
    for shard in shards:
        totals = splits.setdefault(shard["split"], {"shards": 0, "samples": 0, "bytes": 0})
        totals["shards"] += 1
        totals["samples"] += shard["count"]
        totals["bytes"] += shard["bytes"]
    manifest = {
        "format": FORMAT,
        "tool_version": retclip_dist.__version__,
        PSEUDONYMISED_FIELD: pseudonymised,
        SOURCE_HASH_FIELD: "sha256" if key_check is None else KEYED_SOURCE_HASH,
        **({} if key_check is None else {KEY_CHECK_FIELD: key_check}),
        "options": options,
        "splits": dict(sorted(splits.items())),
        "shards": shards,
        "rejected": rejected,
    }
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class ShardInfo:
    url: str  # absolute location of the tar, ready for fsspec.open
    name: str  # file name relative to the manifest's directory
    split: str  # split the shard belongs to
    count: int  # patients stored in the shard
    sha256: str | None = None  # the tar's digest as manifest.json lists it (None: a manifest without one)


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


def manifest_url(location: str) -> tuple[str, str]:
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
        digest = entry.get("sha256")
        shards.append(ShardInfo(url=f"{root}/{name}", name=name, split=split, count=count, sha256=digest))
    if not shards:
        raise ValueError(f"{url}: the manifest lists no shards")
    return Manifest(location=url, shards=tuple(shards))


def read_manifest(location: str, storage_options: dict | None = None) -> Manifest:
    """Load and check the manifest of the shard set at ``location`` (directory or manifest.json)."""
    url, root = manifest_url(location)
    try:
        with fsspec.open(url, "rt", encoding="utf-8", **(storage_options or {})) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read shard manifest {url}: {exc}") from exc
    return _parse(url, root, data)
