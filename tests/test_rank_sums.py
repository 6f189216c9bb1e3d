"""Every record that sums or takes a maximum over ranks, from a run whose ranks differ.

One ``retclip-train`` run on 2 gloo ranks in which rank 0 finds 1 damaged training sample per epoch and
rank 1 finds 3, rank 0 finds 1 damaged validation sample per validation and rank 1 finds 2, and rank 0's
loader is slow: every
total must be the sum of the two ranks (not one rank's count, not the larger), every maximum must name
the rank that holds it. The damage is a right-eye photo that is not a JPEG, planted as the sample is
decoded, so the loader's own check finds it and counts it (one damaged eye loses the patient).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_synth_shards, train_two_ranks

from retclip_dist.train.metrics_log import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.dist]

DAMAGED_TRAIN = (1, 3)  # damaged training samples on rank 0, rank 1
DAMAGED_VAL = (1, 2)  # damaged validation samples on rank 0, rank 1
SLOW_RANK, SLOW_S = 0, 0.8  # this rank's loader sleeps before handing over each batch

# The trainer as `-m retclip_dist.train` runs it, with the damage and the slow loader planted per rank.
DAMAGE = """\
import json, os, sys, time
from retclip_dist.data.loader import TrainLoader
from retclip_dist.data.samples import SampleDecoder
from retclip_dist.shardset import IMAGE_MEMBER
from retclip_dist.train.cli import main

rank = int(os.environ["RANK"])
budget = {True: json.loads(os.environ["DAMAGED_TRAIN"])[rank],
          False: json.loads(os.environ["DAMAGED_VAL"])[rank]}
decode = SampleDecoder.__call__

def damaged(self, raw):
    # Each decoder (one per epoch's stream, one per validation pass) damages its first samples, and the
    # same ones again when a short stream reads its range a second time: damage that stays.
    keys = self.__dict__.setdefault("damaged_keys", set())
    if raw["__key__"] in keys or (len(keys) < budget[self.train] and IMAGE_MEMBER["right"] in raw):
        keys.add(raw["__key__"])
        raw = {**raw, IMAGE_MEMBER["right"]: b"not a JPEG"}
    return decode(self, raw)

SampleDecoder.__call__ = damaged
if rank == int(os.environ["SLOW_RANK"]):
    batches = TrainLoader.__iter__

    def slow(self):
        for batch in batches(self):
            time.sleep(float(os.environ["SLOW_S"]))
            yield batch

    TrainLoader.__iter__ = slow
sys.exit(main())
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict, str]:
    """2 epochs of 2 steps (45 training patients, global batch 16), validation after each epoch."""
    root = tmp_path_factory.mktemp("rank-sums")
    shards = build_synth_shards(root, 60, seed=3, raw_size=96, size=64, max_count=8, val_fraction=0.25)
    script = root / "damage.py"
    script.write_text(DAMAGE)
    env = {
        "DAMAGED_TRAIN": json.dumps(DAMAGED_TRAIN),
        "DAMAGED_VAL": json.dumps(DAMAGED_VAL),
        "SLOW_RANK": str(SLOW_RANK),
        "SLOW_S": str(SLOW_S),
    }
    out = root / "run"
    stderr = train_two_ranks(
        shards, out, "--train.epochs", "2", "--val.every_epochs", "1", script=script, env=env
    )
    manifest = json.loads((shards / "manifest.json").read_text())
    return out, manifest, stderr


def _records(out: Path, kind: str) -> list[dict]:
    return sorted(read_metrics(out / "metrics.jsonl", kind), key=lambda r: r["step"])


def test_every_damaged_sample_was_found_on_its_rank(run):
    _, _, stderr = run
    # One warning per damaged sample, from the rank that read it (rank 1 logs warnings too); a second
    # pass over a short stream is not counted again.
    lines = [line for line in stderr.splitlines() if "skipped 1 sample(s), corrupt_image" in line]
    assert len(lines) == 2 * sum(DAMAGED_TRAIN) + 2 * sum(DAMAGED_VAL)  # 2 epochs, 2 validations
    for rank in (0, 1):
        mine = [line for line in lines if f"[rank {rank}]" in line]
        assert len(mine) == 2 * DAMAGED_TRAIN[rank] + 2 * DAMAGED_VAL[rank], rank


def test_train_records_sum_the_skipped_samples_of_both_ranks(run):
    out, _, _ = run
    rows = _records(out, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # A running total since the start: each epoch's first batches hold its damage.
    assert [r["skipped_samples"] for r in rows] == [sum(DAMAGED_TRAIN)] * 2 + [2 * sum(DAMAGED_TRAIN)] * 2


def test_epoch_records_sum_both_ranks(run):
    out, manifest, _ = run
    patients = manifest["splits"]["train"]["samples"]
    epochs = _records(out, "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        assert r["skipped_samples"] == sum(DAMAGED_TRAIN), r
        # Each rank's stream came up short by its damage and read its range again for as many rows:
        # 2 steps of 2 ranks x 8 rows, of which that many repeat a patient of the first pass.
        assert r["patients_reused"] == sum(DAMAGED_TRAIN), r
        assert r["patients_used"] == 2 * 16 - sum(DAMAGED_TRAIN), r
        assert r["patients_used"] + r["patients_unused"] == patients
        assert r["patients_read_twice"] == 0


def test_val_records_sum_both_ranks(run):
    out, manifest, _ = run
    rows = _records(out, "val")
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:  # each validation counts its own pass over the split
        assert r["skipped_samples"] == sum(DAMAGED_VAL)
        assert r["samples"] == manifest["splits"]["val"]["samples"] - sum(DAMAGED_VAL)


def test_end_record_sums_both_ranks_and_names_the_slow_one(run):
    out, _, _ = run
    end = _records(out, "end")[-1]
    assert end["exit_code"] == 0
    assert end["skipped_samples"] == 2 * sum(DAMAGED_TRAIN)  # training samples, both epochs
    assert end["data_wait_share_max_rank"] == SLOW_RANK
    assert end["data_wait_share_max"] > end["data_wait_share"] > 0


def test_train_records_name_the_rank_that_waits_and_the_one_waited_for(run):
    out, _, _ = run
    for r in _records(out, "train"):
        assert r["data_wait_ms_max_rank"] == SLOW_RANK, r
        assert r["data_wait_ms_max"] > 1e3 * SLOW_S
        # The other rank waits for the slow one inside the step (the gradient all-reduce).
        assert r["step_ms_max_rank"] == 1 - SLOW_RANK, r
        assert r["step_ms_max"] > 0.5e3 * SLOW_S
