"""make-shards verify: every shard against manifest.json (presence, size, sha256, count) and every
sample decoded, so a corrupt or missing shard is found before a training job trips over it."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
from PIL import Image

from retclip_dist.io import files
from retclip_dist.shards.pseudonym import PSEUDONYM_PREFIX
from retclip_dist.shardset import (
    FORMAT,
    MANIFEST_NAME,
    META_MEMBER,
    OPTIONAL_MEMBERS,
    PSEUDONYMISED_FIELD,
    REQUIRED_MEMBERS,
    SHARD_SUFFIX,
)


@dataclass
class VerifyResult:
    """``ok`` is True only when ``problems`` is empty."""

    shards: int = 0  # shards listed in the manifest
    samples: int = 0  # samples decoded
    problems: list[str] = field(default_factory=list)  # one line per problem, naming the shard
    pseudonymised: bool = False  # manifest.json says ids are keyed hashes and paths are left out

    @property
    def ok(self) -> bool:
        return not self.problems


class _HashingReader:
    """Hashes what tarfile reads, so a shard is fetched once for both the sha256 and the decode."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _check_pseudonymised(key: str, data: bytes) -> list[str]:
    """A sample of a pseudonymised set: a pseudonym as id and key, and no source paths."""
    meta = json.loads(data)
    problems = []
    pid = meta.get("patient_id")
    if not isinstance(pid, str) or not pid.startswith(PSEUDONYM_PREFIX) or pid != key:
        problems.append(f"sample {key}: set is pseudonymised but patient_id is not this key's pseudonym")
    if "source" in meta:
        problems.append(f"sample {key}: set is pseudonymised but json carries source paths")
    return problems


def _check_sample(key: str, members: dict[str, bytes], pseudonymised: bool) -> list[str]:
    problems = []
    names = set(members)
    if REQUIRED_MEMBERS - names:
        problems.append(f"sample {key}: missing {sorted(REQUIRED_MEMBERS - names)}")
    if names - REQUIRED_MEMBERS - OPTIONAL_MEMBERS:
        problems.append(f"sample {key}: unexpected {sorted(names - REQUIRED_MEMBERS - OPTIONAL_MEMBERS)}")
    for name, data in sorted(members.items()):
        try:
            if name.endswith(".jpg"):
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
                    if img.mode != "RGB":
                        problems.append(f"sample {key}: {name} is {img.mode}, not RGB")
            elif name == META_MEMBER:
                json.loads(data)
                if pseudonymised:
                    problems += _check_pseudonymised(key, data)
            else:
                data.decode("utf-8")
        except Exception as exc:
            # Any decoder failure is a finding to report, not a reason to stop checking other samples.
            problems.append(f"sample {key}: {name} does not decode ({type(exc).__name__}: {exc})")
    return problems


def _check_shard(url: str, entry: dict[str, Any], pseudonymised: bool) -> tuple[int, list[str]]:
    name = entry["name"]
    if not files.exists(url):
        return 0, [f"{name}: missing"]
    problems: list[str] = []
    samples: dict[str, dict[str, bytes]] = {}
    with fsspec.open(url, "rb") as raw:
        reader = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tf:
                for member in tf:
                    key, _, suffix = member.name.partition(".")
                    fh = tf.extractfile(member) if member.isreg() else None
                    if fh is None:
                        problems.append(f"{name}: member {member.name} is not a regular file")
                        continue
                    samples.setdefault(key, {})[suffix] = fh.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            problems.append(f"{name}: unreadable tar ({exc})")
        reader.drain()
    if reader.bytes != entry["bytes"]:
        problems.append(f"{name}: {reader.bytes} bytes, manifest says {entry['bytes']}")
    if reader.sha.hexdigest() != entry["sha256"]:
        problems.append(f"{name}: sha256 {reader.sha.hexdigest()} != manifest {entry['sha256']}")
    if len(samples) != entry["count"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry['count']}")
    for key, members in samples.items():
        problems += [f"{name}: {p}" for p in _check_sample(key, members, pseudonymised)]
    return len(samples), problems


def verify_shards(directory: str) -> VerifyResult:
    """Check the shard set in ``directory`` (local or s3://); never raises for bad content."""
    result = VerifyResult()
    manifest_url = files.join(directory, MANIFEST_NAME)
    try:
        manifest = json.loads(files.read_bytes(manifest_url))
        shards = manifest["shards"]
    except FileNotFoundError:
        result.problems.append(f"{manifest_url}: missing")
        return result
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        result.problems.append(f"{manifest_url}: unreadable ({type(exc).__name__}: {exc})")
        return result
    if manifest.get("format") != FORMAT:
        result.problems.append(f"{manifest_url}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    result.shards = len(shards)
    result.pseudonymised = manifest.get(PSEUDONYMISED_FIELD) is True
    for entry in shards:
        count, problems = _check_shard(files.join(directory, entry["name"]), entry, result.pseudonymised)
        result.samples += count
        result.problems += problems
    fs, path = fsspec.core.url_to_fs(directory)
    listed = {entry["name"] for entry in shards}
    on_disk = {files.basename(p) for p in fs.glob(files.join(path, "*" + SHARD_SUFFIX))}
    result.problems += [f"{name}: not listed in {MANIFEST_NAME}" for name in sorted(on_disk - listed)]
    return result
