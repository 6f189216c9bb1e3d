"""Per-seed train/val/test splits, grouped by patient: official splits are kept, missing ones drawn.

- every row has an official split and train, val and test all occur: the split is fixed (seeds then
  vary only what is random in a protocol: few-shot draws, fine-tuning);
- test is official but val is not (IDRiD): val is drawn from the train patients by seed;
- no official split (APTOS train.csv, MESSIDOR-2, ODIR-5K): val and test are drawn by seed.
A patient's rows always land in one part. Single-label draws are stratified by the class of a
patient's first row, so every part holds every class that has at least three patients.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from retclip_dist.eval.benchmark.layouts import BenchSet
from retclip_dist.eval.benchmark.suite import SplitConfig
from retclip_dist.eval.data import LabelledSet


def _draw(groups: list[str], strata: dict[str, int], fractions: list[float], seed: int) -> dict[str, int]:
    """group -> part index; within each stratum, shuffled by seed and cut by fractions (each part gets
    at least one group when the stratum has enough)."""
    rng = np.random.default_rng(seed)
    part: dict[str, int] = {}
    for stratum in sorted(set(strata.values())):
        members = sorted(g for g in groups if strata[g] == stratum)
        members = [members[i] for i in rng.permutation(len(members))]
        n = len(members)
        counts = [round(f * n) for f in fractions[1:]]
        if n > len(fractions):
            counts = [max(1, c) for c in counts]
        first = n - sum(counts)
        cuts = np.cumsum([first, *counts])
        for i, g in enumerate(members):
            part[g] = int(np.searchsorted(cuts, i, side="right"))
    return part


def split_for_seed(bset: BenchSet, cfg: SplitConfig, seed: int) -> LabelledSet:
    """The rows of ``bset`` with split set to train/val/test for ``seed``."""
    lset = bset.lset
    official = [r.split for r in lset.rows]
    present = set(official)
    if None not in present and {"train", "val", "test"} <= present:
        return lset
    groups = list(dict.fromkeys(bset.groups))
    first_label = {}
    for row, g in zip(lset.rows, bset.groups, strict=True):
        first_label.setdefault(g, 0 if lset.multilabel else row.label[0])
    if None not in present and "test" in present:
        pool = [g for r, g in zip(lset.rows, bset.groups, strict=True) if r.split == "train"]
        pool = list(dict.fromkeys(pool))
        part = _draw(pool, first_label, [1 - cfg.val_fraction, cfg.val_fraction], seed)
        names = ["train", "val"]
        new = [
            names[part[g]] if r.split == "train" else r.split
            for r, g in zip(lset.rows, bset.groups, strict=True)
        ]
    else:
        fractions = [1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction]
        part = _draw(groups, first_label, fractions, seed)
        names = ["train", "val", "test"]
        new = [names[part[g]] for g in bset.groups]
    rows = tuple(replace(r, split=s) for r, s in zip(lset.rows, new, strict=True))
    return replace(lset, rows=rows)


def split_indices(lset: LabelledSet) -> dict[str, np.ndarray]:
    """{"train"|"val"|"test": row indices}; an empty part is an error naming the table."""
    out = {}
    for name in ("train", "val", "test"):
        idx = np.array([i for i, r in enumerate(lset.rows) if r.split == name], dtype=np.int64)
        if len(idx) == 0:
            raise ValueError(f"{lset.table}: split {name!r} is empty; the dataset is too small to split")
        out[name] = idx
    return out
