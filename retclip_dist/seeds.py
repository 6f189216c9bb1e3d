"""The one stable hash behind every seed and seeded draw (Python's ``hash()`` is salted per process).

sha256 of the parts joined into text, first 8 bytes. Each use keeps the separator and byte order it was
born with, because each fixes outputs already on disk: the data order a checkpoint resumes into
(``derive_seed``), the split of each patient in a shard set (``hash_unit``), the split of each row of an
evaluation table without a split column (``eval/data.seeded_split``). tests/test_seeds.py pins them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def stable_u64(parts: Iterable[object], sep: str, byteorder: str) -> int:
    """64 bits of sha256 over ``parts`` joined by ``sep`` (their ``str``)."""
    digest = hashlib.sha256(sep.join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], byteorder)  # type: ignore[arg-type]


def unit_draw(parts: Iterable[object], sep: str) -> float:
    """A uniform number in [0, 1) from ``parts``."""
    return stable_u64(parts, sep, "big") / 2**64


def derive_seed(*parts: int) -> int:
    """A stable 64-bit seed from integers (the data plan's shuffles and streams)."""
    return stable_u64(parts, "/", "little")


def hash_unit(*parts: object) -> float:
    """A uniform number in [0, 1) from ``parts`` (make-shards: split draw and shard order)."""
    return unit_draw(parts, "\x1f")
