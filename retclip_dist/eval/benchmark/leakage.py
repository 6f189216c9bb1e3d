"""Leakage guard: evaluation images that were also pretraining images, matched by content hash.

make-shards writes the sha256 of every source image file into its shard entries of manifest.json
(shardset.SOURCE_HASHES_FIELD); here each evaluation image's file bytes are hashed the same way.
Only byte-identical files match: a re-encoded or resized copy of a pretraining photo is not found.
"""

from __future__ import annotations

import hashlib
import json
import logging

from retclip_dist.eval.benchmark.layouts import BenchSet
from retclip_dist.eval.data import LabelError
from retclip_dist.io import files as storage
from retclip_dist.io.errors import ImageReadError
from retclip_dist.shardset import MANIFEST_NAME, SOURCE_HASHES_FIELD

log = logging.getLogger(__name__)


def pretraining_hashes(shards: str) -> set[str]:
    """Every source-image digest of the shard set at ``shards`` (a directory or its manifest.json)."""
    url = shards if shards.endswith(MANIFEST_NAME) else storage.join(shards, MANIFEST_NAME)
    try:
        manifest = json.loads(storage.read_bytes(url))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--shards: cannot read {url}: {exc}") from exc
    found: set[str] = set()
    for i, entry in enumerate(manifest.get("shards", [])):
        if SOURCE_HASHES_FIELD not in entry:
            raise ValueError(
                f"{url}: shards[{i}] has no {SOURCE_HASHES_FIELD} (built by an older make-shards); "
                "rebuild the shards to check for leakage"
            )
        found.update(entry[SOURCE_HASHES_FIELD])
    return found


def check_leakage(bset: BenchSet, shards: str, strict: bool) -> list[str]:
    """Sources ("labels.csv:12") of evaluation rows whose image (either eye) is in the shards; with
    ``strict`` any such row is an error."""
    known = pretraining_hashes(shards)
    leaked = []
    rights = bset.right or (None,) * len(bset.lset)
    for row, right in zip(bset.lset.rows, rights, strict=True):
        for ref in (row.image, right):
            if ref is None:
                continue
            try:
                digest = hashlib.sha256(bset.lset.store.read(ref)).hexdigest()
            except ImageReadError as exc:
                raise LabelError(f"{row.source}: image {ref!r}: {exc}") from None
            if digest in known:
                leaked.append(row.source)
                break
    if leaked:
        message = f"{len(leaked)} evaluation rows of {bset.lset.table} have images in the pretraining shards {shards} (first {leaked[0]})"
        if strict:
            raise LabelError(message + "; --strict refuses to evaluate on them")
        log.warning("%s", message)
    return leaked
