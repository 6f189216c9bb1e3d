"""Resume journal: one line per published shard, so a killed build continues where it stopped.

Line 1 holds a fingerprint of the options and planned inputs; each later line holds a shard entry, how
many planned patients were consumed when it closed, and the rejects seen since the previous line.
Because packing is deterministic, continuing from the last line gives the same bytes as a clean run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from retclip_dist.io.files import OutputDir
from retclip_dist.shards.records import Reject, ShardInputError

JOURNAL_NAME = "make-shards.journal.jsonl"


@dataclass
class Progress:
    """What earlier, interrupted runs already finished."""

    consumed: int = 0  # planned patients fully handled (packed into published shards or rejected)
    shards: list[dict[str, Any]] = field(default_factory=list)  # published shard entries, in order
    rejects: list[Reject] = field(default_factory=list)  # rejects among the consumed patients


class Journal:
    def __init__(self, out: OutputDir, fingerprint: str) -> None:
        self.out = out
        self.fingerprint = fingerprint

    def load(self) -> Progress:
        """Progress so far (empty for a fresh dir); refuses a journal written for other options or inputs."""
        if not self.out.exists(JOURNAL_NAME):
            self.out.append_line(JOURNAL_NAME, json.dumps({"fingerprint": self.fingerprint}))
            return Progress()
        lines = self.out.read_text(JOURNAL_NAME).splitlines()
        where = f"{self.out.url}/{JOURNAL_NAME}"
        try:
            head = json.loads(lines[0])["fingerprint"]
        except (IndexError, json.JSONDecodeError, KeyError, TypeError):
            raise ShardInputError(
                f"{where}: unreadable journal header; delete the output dir to start over"
            ) from None
        if head != self.fingerprint:
            raise ShardInputError(
                f"{where}: an unfinished build with other options or inputs is here; "
                "rerun that command or delete the output dir"
            )
        progress = Progress()
        for i, line in enumerate(lines[1:], start=2):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines):
                    break  # the write that was cut short by the kill; its shard will be redone
                raise ShardInputError(f"{where}:{i}: corrupt journal line; delete the output dir") from None
            progress.consumed = entry["consumed"]
            progress.shards.append(entry["shard"])
            progress.rejects.extend(Reject.from_json(order, r) for order, r in entry["rejects"])
        for shard in progress.shards:
            if not self.out.exists(shard["name"]) or self.out.size(shard["name"]) != shard["bytes"]:
                raise ShardInputError(
                    f"{where}: {shard['name']} is missing or changed; delete the output dir"
                )
        return progress

    def record(self, shard: dict[str, Any], consumed: int, rejects: list[Reject]) -> None:
        entry = {"shard": shard, "consumed": consumed, "rejects": [[r.order, r.to_json()] for r in rejects]}
        self.out.append_line(JOURNAL_NAME, json.dumps(entry, ensure_ascii=False))

    def remove(self) -> None:
        self.out.remove(JOURNAL_NAME)
