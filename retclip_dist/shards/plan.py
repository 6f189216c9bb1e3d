"""Which patients go where, in which order: duplicates out, splits assigned, seeded shuffle.

Everything here depends only on the patient ids, the seed and the options, never on manifest order or
worker count, so two runs over the same patients always produce the same shard contents.
"""

from __future__ import annotations

import dataclasses

from retclip_dist.seeds import hash_unit
from retclip_dist.shards.records import PatientRecord, Reject, assign_keys


def drop_duplicates(records: list[PatientRecord]) -> tuple[list[PatientRecord], list[Reject]]:
    """Keep the first row of each patient id; distinct ids are never merged (assign_keys keeps keys apart)."""
    first_at: dict[str, str] = {}
    kept, rejects = [], []
    for rec in sorted(records, key=lambda r: r.order):
        if rec.patient_id in first_at:
            detail = f"patient id already used at {first_at[rec.patient_id]}"
            rejects.append(Reject(rec.order, rec.patient_id, rec.source, "duplicate_id", detail))
            continue
        first_at[rec.patient_id] = rec.source
        kept.append(rec)
    return kept, rejects


def plan(
    records: list[PatientRecord], default_split: str, val_fraction: float, seed: int
) -> tuple[list[PatientRecord], list[Reject]]:
    """Deduplicated records with a split each, grouped by split (sorted) and shuffled within it.

    Training reads shards in order, so the seeded shuffle keeps one day's or one camera's patients from
    filling one shard. Patients without an explicit split go to ``val`` with probability ``val_fraction``,
    decided on the original id even when pseudonymised: a patient stays in the same split with or without
    --pseudonymise and under any key, so a pseudonymised rebuild cannot move validation patients into train.
    """
    kept, rejects = drop_duplicates(records)
    keys = assign_keys(rec.published_id for rec in kept)
    assigned = []
    for rec in kept:
        split = rec.split
        if split is None:
            split = "val" if hash_unit("val", seed, rec.patient_id) < val_fraction else default_split
        assigned.append(dataclasses.replace(rec, split=split, key=keys[rec.published_id]))
    assigned.sort(key=lambda r: (r.split, hash_unit("order", seed, r.key), r.key))
    return assigned, rejects
