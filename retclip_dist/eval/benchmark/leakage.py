"""Leakage guard: evaluation images that were also pretraining images, matched by content hash.

make-shards writes a digest of every source image file into its shard entries of manifest.json
(shardset.SOURCE_HASHES_FIELD); here each evaluation image's file bytes are hashed the same way. A
pseudonymised set holds keyed digests (HMAC-SHA256 under the data owner's key, shardset.SOURCE_HASH_FIELD
says so), so checking against it needs that key file (``--shards-key``). Only byte-identical files
match: a re-encoded or resized copy of a pretraining photo is not found.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

from retclip_dist.eval.benchmark.layouts import BenchSet
from retclip_dist.eval.data import LabelError
from retclip_dist.io import files as storage
from retclip_dist.io.errors import ImageReadError
from retclip_dist.shards.pseudonym import Pseudonymiser
from retclip_dist.shards.records import ShardInputError
from retclip_dist.shardset import (
    KEY_CHECK_FIELD,
    KEYED_SOURCE_HASH,
    MANIFEST_NAME,
    SOURCE_HASH_FIELD,
    SOURCE_HASHES_FIELD,
)

log = logging.getLogger(__name__)


def _digester(url: str, manifest: dict, key_file: str | None) -> Callable[[bytes], str]:
    """How an image's bytes are hashed to compare with this manifest's digests."""

    def plain(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    if manifest.get(SOURCE_HASH_FIELD) != KEYED_SOURCE_HASH:
        if key_file is not None:
            log.warning("--shards-key: %s holds plain sha256 digests; the key is not needed", url)
        return plain
    if key_file is None:
        raise ValueError(
            f"--shards: {url} was built with --pseudonymise, so its source hashes are keyed; give the "
            "data owner's key file as --shards-key KEYFILE to check for leakage"
        )
    try:
        keyed = Pseudonymiser.from_keyfile(key_file)
    except ShardInputError as exc:
        raise ValueError(str(exc).replace("--pseudonymise", "--shards-key", 1)) from None
    if manifest.get(KEY_CHECK_FIELD) != keyed.key_check():
        raise ValueError(f"--shards-key {key_file}: not the key {url} was built with (its key_check differs)")
    return lambda data: keyed.source_digest(plain(data))


def _read_manifest(shards: str) -> tuple[str, dict]:
    url = shards if shards.endswith(MANIFEST_NAME) else storage.join(shards, MANIFEST_NAME)
    try:
        return url, json.loads(storage.read_bytes(url))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--shards: cannot read {url}: {exc}") from exc


def pretraining_hashes(shards: str) -> set[str]:
    """Every source-image digest of the shard set at ``shards`` (a directory or its manifest.json)."""
    return _hashes(*_read_manifest(shards))


def _hashes(url: str, manifest: dict) -> set[str]:
    found: set[str] = set()
    for i, entry in enumerate(manifest.get("shards", [])):
        if SOURCE_HASHES_FIELD not in entry:
            raise ValueError(
                f"{url}: shards[{i}] has no {SOURCE_HASHES_FIELD} (built by an older make-shards); "
                "rebuild the shards to check for leakage"
            )
        found.update(entry[SOURCE_HASHES_FIELD])
    return found


def check_leakage(bset: BenchSet, shards: str, strict: bool, key_file: str | None = None) -> list[str]:
    """Sources ("labels.csv:12") of evaluation rows whose image (either eye) is in the shards; with
    ``strict`` any such row is an error. ``key_file`` is the data owner's key of a pseudonymised set."""
    url, manifest = _read_manifest(shards)
    digest = _digester(url, manifest, key_file)
    known = _hashes(url, manifest)
    leaked = []
    rights = bset.right or (None,) * len(bset.lset)
    for row, right in zip(bset.lset.rows, rights, strict=True):
        for ref in (row.image, right):
            if ref is None:
                continue
            try:
                found = digest(bset.lset.store.read(ref))
            except ImageReadError as exc:
                raise LabelError(f"{row.source}: image {ref!r}: {exc}") from None
            if found in known:
                leaked.append(row.source)
                break
    if leaked:
        message = f"{len(leaked)} evaluation rows of {bset.lset.table} have images in the pretraining shards {shards} (first {leaked[0]})"
        if strict:
            raise LabelError(message + "; --strict refuses to evaluate on them")
        log.warning("%s", message)
    return leaked
