"""What flows through make-shards: patient records, rejects with a fixed reason vocabulary (and how
image-read errors of retclip_dist.io map onto it), and the shard-key rule."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from retclip_dist.io import paths
from retclip_dist.io.errors import (
    AmbiguousName,
    CorruptData,
    EmptyPath,
    ImageNotFound,
    ImageReadError,
    UnsafePath,
)

# The only reasons a patient can be rejected for; rejects.jsonl and the summary table use these names.
REJECT_REASONS: dict[str, str] = {
    "bad_row": "row cannot be parsed (field count, JSON, patient id, split name)",
    # --dicom: one file of the export (shards/dicom.py)
    "not_dicom": "file in the DICOM export is not a DICOM file (no DICM marker after the preamble)",
    "not_photo": "DICOM object is not one ophthalmic photograph (SOP class, modality, frames, no pixels)",
    "no_decoder": "no pixel-data decoder is installed for the file's transfer syntax",
    "missing_tag": "a tag the pairing needs is missing: PatientID (0010,0020) or StudyInstanceUID (0020,000D)",
    "no_laterality": "neither ImageLaterality (0020,0062) nor Laterality (0020,0060) says L or R, or they disagree",
    "extra_photo": "another photo of the same eye and visit was chosen by the selection rule",
    "missing_eye": "left or right image is not given",
    "empty_path": "image path is blank or normalises to nothing",
    "missing_file": "image path is not in the image root",
    "ambiguous_name": "more than one file in the image root has this name after Unicode (NFC) normalisation",
    "unsafe_path": "absolute path, '..', or a symlink leaving the image root",
    "undecodable": "bytes are not an image that can be read",
    "truncated": "image data ends early",
    "too_small": "shorter image side is below --min-side",
    "too_many_pixels": "width x height is above --max-pixels (read from the header)",
    "blank_report": "report is empty or whitespace",
    "missing_report": "no report exists for the patient",
    "ambiguous_report": "the report table gives this visit different reports (repeated key, or one per eye)",
    "duplicate_id": "patient id was already used by an earlier row",
    "no_fundus_field": "--crop fundus found no circular field of view in the image",
}

# How each image-read failure of retclip_dist.io is named in rejects.jsonl.
_READ_REASONS: dict[type[ImageReadError], str] = {
    EmptyPath: "empty_path",
    UnsafePath: "unsafe_path",
    ImageNotFound: "missing_file",
    AmbiguousName: "ambiguous_name",
    CorruptData: "undecodable",
}

_KEY_OK = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Keys made by hashing start with this; plain ids starting with it are hashed too, so a plain id can never
# equal another patient's hashed key.
HASHED_KEY_PREFIX = "sanitised-"
# 128 bits: a chance collision among a billion ids is about 1e-21, and assign_keys() resolves even that.
_KEY_HEX = 32
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
    pseudonym: str | None = None  # keyed hash written instead of the id (--pseudonymise), else None
    key: str = ""  # WebDataset key of the sample, assigned by plan() from published_id
    # (column, value) of each --identifier-columns cell of the row: what --scrub-reports removes besides the id
    identifiers: tuple[tuple[str, str], ...] = ()

    @property
    def published_id(self) -> str:
        """The id that goes into the shards: the pseudonym when there is one."""
        return self.pseudonym if self.pseudonym is not None else self.patient_id


def shard_key(patient_id: str, attempt: int = 0) -> str:
    """WebDataset key: the id itself when it is short and plain, else ``sanitised-<32 hex of sha256>``.

    WebDataset splits member names at the first dot and tar headers cap names, so anything else is hashed.
    ``attempt`` > 0 gives the alternative keys assign_keys() moves to after a hash collision.
    """
    if _KEY_OK.fullmatch(patient_id) and not patient_id.startswith(HASHED_KEY_PREFIX):
        return patient_id
    material = patient_id if attempt == 0 else f"{attempt}\x00{patient_id}"
    return HASHED_KEY_PREFIX + hashlib.sha256(material.encode("utf-8")).hexdigest()[:_KEY_HEX]


def assign_keys(ids: Iterable[str]) -> dict[str, str]:
    """A distinct key for every distinct id, never a rejection.

    Ids are taken in sorted order and an id whose key is taken moves to its next ``attempt``, so the result
    depends only on the set of ids (not on input order, workers or resumes). Plain keys and hashed keys
    cannot meet (HASHED_KEY_PREFIX), so only a 128-bit hash collision ever moves a key.
    """
    owner: dict[str, str] = {}
    keys: dict[str, str] = {}
    for pid in sorted(set(ids)):
        attempt = 0
        key = shard_key(pid)
        while key in owner:
            attempt += 1
            key = shard_key(pid, attempt)
        owner[key] = pid
        keys[pid] = key
    return keys


def valid_split(name: str) -> bool:
    """Split names become part of shard file names, so only plain words are allowed."""
    return bool(_SPLIT_OK.fullmatch(name))


def read_reject(exc: ImageReadError) -> RejectError:
    """The reject for an image that retclip_dist.io could not read (its message becomes the detail)."""
    return RejectError(_READ_REASONS[type(exc)], str(exc))


def normalise_relpath(path: str) -> str:
    """retclip_dist.io's path rule for a path from an input row; a bad one is a reject of that row."""
    try:
        return paths.normalise_relpath(path)
    except ImageReadError as exc:
        raise read_reject(exc) from None
