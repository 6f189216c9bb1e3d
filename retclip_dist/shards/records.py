"""What flows through make-shards: patient records, rejects with a fixed reason vocabulary, and the
two path rules (shard keys, paths inside image roots) every reader must share."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# The only reasons a patient can be rejected for; rejects.jsonl and the summary table use these names.
REJECT_REASONS: dict[str, str] = {
    "bad_row": "row cannot be parsed (field count, JSON, patient id, split name)",
    "missing_eye": "left or right image is not given",
    "empty_path": "image path is blank or normalises to nothing",
    "missing_file": "image path is not in the image root",
    "unsafe_path": "absolute path, '..', or a symlink leaving the image root",
    "undecodable": "bytes are not an image that can be read",
    "truncated": "image data ends early",
    "too_small": "shorter image side is below --min-side",
    "too_many_pixels": "width x height is above --max-pixels (read from the header)",
    "blank_report": "report is empty or whitespace",
    "missing_report": "no report exists for the patient",
    "duplicate_id": "patient id or its shard key was already taken by an earlier row",
}

_KEY_OK = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SPLIT_OK = re.compile(r"[A-Za-z0-9_]{1,32}")


class ShardInputError(Exception):
    """An input that cannot be used at all (unreadable manifest or archive, missing columns, bad options)."""


class RejectError(Exception):
    """One patient cannot be kept; ``reason`` is a key of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Reject:
    """One line of rejects.jsonl."""

    order: int  # row position in the input, so rejects.jsonl follows input order
    patient_id: str  # id as written in the input ("" when the row had none)
    source: str  # "patients.csv:12" or "train_imgs.tsv:3"
    reason: str  # a key of REJECT_REASONS
    detail: str  # human-readable specifics

    def to_json(self) -> dict[str, str]:
        return {"id": self.patient_id, "source": self.source, "reason": self.reason, "detail": self.detail}

    @classmethod
    def from_json(cls, order: int, data: dict[str, str]) -> Reject:
        return cls(order, data["id"], data["source"], data["reason"], data["detail"])


def count_rejects(rejects: list[Reject]) -> dict[str, int]:
    """Rejects per reason, every reason listed (zeros included) in vocabulary order."""
    counts = dict.fromkeys(REJECT_REASONS, 0)
    for r in rejects:
        counts[r.reason] += 1
    return counts


@dataclass(frozen=True)
class PatientRecord:
    """A parsed input row whose images are not read yet."""

    order: int  # row position in the input
    patient_id: str  # original id
    source: str  # where the row is, for rejects
    left: str  # reference of the left image inside its image store
    right: str  # reference of the right image inside its image store
    report: str  # patient-level report
    left_report: str | None = None  # per-eye report where the source has one
    right_report: str | None = None  # per-eye report where the source has one
    split: str | None = None  # explicit split from the input; None lets the planner choose

    @property
    def key(self) -> str:
        return shard_key(self.patient_id)


def shard_key(patient_id: str) -> str:
    """WebDataset key: the id itself when it is short and plain, else ``sanitised-<8 hex of sha1>``.

    WebDataset splits member names at the first dot and tar headers cap names, so anything else is hashed.
    """
    if _KEY_OK.fullmatch(patient_id):
        return patient_id
    return "sanitised-" + hashlib.sha1(patient_id.encode("utf-8")).hexdigest()[:8]


def valid_split(name: str) -> bool:
    """Split names become part of shard file names, so only plain words are allowed."""
    return bool(_SPLIT_OK.fullmatch(name))


def normalise_relpath(path: str) -> str:
    """Relative POSIX path inside a root, or RejectError(empty_path / unsafe_path).

    Backslashes count as separators so Windows-made manifests and archives cannot smuggle ``..\\``.
    """
    if not path.strip():
        raise RejectError("empty_path", f"image path {path!r} is blank")
    unified = path.replace("\\", "/")
    if unified.startswith("/") or re.match(r"[A-Za-z]:", unified):
        raise RejectError("unsafe_path", f"absolute path {path!r}")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise RejectError("unsafe_path", f"path {path!r} contains '..'")
    if not parts:
        raise RejectError("empty_path", f"image path {path!r} names no file")
    return "/".join(parts)
