"""Counts of samples the loader could not use, by reason, for the trainer's logs."""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("retclip_dist.data")

# Reasons that lose a sample; "reused" instead counts samples read a second time to fill a stream that
# came up short, so it is reported but not part of the skipped total.
LOSS_REASONS = ("corrupt_image", "bad_text", "missing_member", "shard_error")


def skipped_total(counts: dict[str, int]) -> int:
    return sum(counts.get(r, 0) for r in LOSS_REASONS)


class SkipCounter:
    """Per-reason counts, muted while a resumed stream replays positions the checkpoint already counted."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.muted = False

    def add(self, reason: str, n: int, detail: str | None = None) -> None:
        """Count ``n`` samples lost for ``reason``; ``detail`` says where (logged), None when said already."""
        if self.muted or n <= 0:
            return
        self.counts[reason] += n
        if detail is not None:
            log.warning("skipped %d sample(s), %s: %s", n, reason, detail)

    def take(self) -> dict[str, int]:
        """Counts since the last call; they travel to the main process with the next batch."""
        out = dict(self.counts)
        self.counts.clear()
        return out
