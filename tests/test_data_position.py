"""A checkpoint's data position: what it records, what a resume may change (handled exactly) and what it
refuses (naming the field and both values), in the loader and in the config check before any process starts.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import fake_patients, model_image, tiny_tokenizer, write_shard_set

from retclip_dist.config import ConfigError, load_config
from retclip_dist.data.config import DataConfig, sized_for
from retclip_dist.data.loader import build_train_data
from retclip_dist.data.position import PositionError, patient_id
from retclip_dist.train.checkpoint import STATE_NAME, Restored, checkpoint_name
from retclip_dist.train.config import RunConfig
from retclip_dist.train.loop import read_twice_count, restore_data
from retclip_dist.train.preflight import check_run_config

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = tiny_tokenizer()
SMALL = {"decode_size": 48, "image_size": 40, "shuffle_buffer": 5, "num_workers": 0, "batch_size": 4}


def _write(root: Path, seed: int = 1) -> Path:
    # 40 patients in shards of 4: 10 steps of 4, nothing left over.
    write_shard_set(root, {"train": fake_patients(40, size=64, seed=seed, eye_reports_every=4)}, per_shard=4)
    return root


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("position"))


def _cfg(root: Path, **changes: object) -> DataConfig:
    return dataclasses.replace(DataConfig(shards=str(root), **SMALL), **changes)


def _stopped(cfg: DataConfig, steps: int, seed: int = 3) -> tuple[list[str], dict]:
    """The keys of the first ``steps`` batches and the loader's state after them, as JSON gives it back."""
    data = build_train_data(cfg, TOKENIZER, 0, 1, seed)
    keys = []
    for batch in itertools.islice(data, steps):
        keys += batch["keys"]
    return keys, json.loads(json.dumps(data.state_dict()))


def test_a_resume_with_another_shuffle_buffer_reads_the_rest_of_the_epoch_once(shard_set):
    # The case at loader level: stopped with buffer 5, resumed with 2. Continued as if nothing had
    # changed, the new buffer's order would re-read some patients and skip others.
    used, state = _stopped(_cfg(shard_set, shuffle_buffer=5), 6)
    resumed = build_train_data(_cfg(shard_set, shuffle_buffer=2), TOKENIZER, 0, 1, 3)
    resumed.load_state_dict(state)
    assert resumed.steps_per_epoch == 10 and resumed.state_dict()["base_step"] == 6
    rest = [k for batch in resumed for k in batch["keys"]]
    assert len(used) == 24 and len(rest) == 16
    assert sorted(used + rest) == sorted(p.key for p in fake_patients(40, size=8))
    # The epoch's tally, carried through the checkpoint, holds every row of the epoch once.
    assert sorted(resumed.epoch_patients) == sorted(patient_id(k) for k in used + rest)
    # The segment read before the resume keeps its buffer: a second resume replays it with 5.
    assert [seg["buffer"] for seg in resumed.state_dict()["history"]] == [5]


def test_an_exact_resume_carries_the_epochs_tally(shard_set):
    cfg = _cfg(shard_set, num_workers=2)
    full = build_train_data(cfg, TOKENIZER, 0, 1, 3)
    rows = [k for batch in full for k in batch["keys"]]
    assert full.epoch_patients == [patient_id(k) for k in rows]
    _, state = _stopped(cfg, 4)
    resumed = build_train_data(cfg, TOKENIZER, 0, 1, 3)
    resumed.load_state_dict(state)
    list(resumed)
    assert resumed.epoch_patients == full.epoch_patients
    resumed.set_epoch(1)
    assert resumed.epoch_patients == []


def _rebuilt(tmp_path: Path) -> Path:
    # The same names and counts, other patients: only the manifest's digests tell them apart.
    return _write(tmp_path / "rebuilt", seed=2)


def _fewer(tmp_path: Path) -> Path:
    root = tmp_path / "fewer"
    write_shard_set(root, {"train": fake_patients(36, size=64, seed=1, eye_reports_every=4)}, per_shard=4)
    return root


# (what the resuming run changes, the start of the refusal), at a step inside the epoch and at its start.
REFUSED = [
    ({"seed": 4}, "train.seed: saved 3, now 4; resume with the saved value, or pass --checkpoint.reset_data"),
    ({"eye_reports": True}, "data.eye_reports: saved False, now True"),
    ({"context_length": 24}, "data.context_length: saved 100, now 24"),
    ({"jitter": 0.0}, "data.jitter: saved 0.2, now 0.0"),
    ({"crop_scale": (0.5, 1.0)}, "data.crop_scale: saved [0.9, 1.0], now [0.5, 1.0]"),
    ({"shards": _rebuilt}, "data.shards: the training shards changed (train-000000.tar saved with 4 samples (sha256 "),
    ({"shards": _fewer}, "data.shards: the training shards changed (saved 10 shards (40 samples), now 9 (36 samples))"),
]  # fmt: skip


@pytest.mark.parametrize("steps", [3, 0], ids=["mid-epoch", "epoch-start"])
@pytest.mark.parametrize(
    ("change", "message"), REFUSED, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(REFUSED)]
)
def test_a_resume_that_changes_the_samples_or_their_order_is_refused(
    shard_set, tmp_path, steps, change, message
):
    _, state = _stopped(_cfg(shard_set), steps)
    change = dict(change)
    seed = change.pop("seed", 3)
    if "shards" in change:
        change["shards"] = str(change["shards"](tmp_path))
    resumed = build_train_data(_cfg(shard_set, **change), TOKENIZER, 0, 1, seed)
    with pytest.raises(PositionError) as info:
        resumed.load_state_dict(state)
    assert f"cannot continue the data position: {message}" in str(info.value)
    assert "start epoch 0's data from its first patient" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_shard_set_copied_elsewhere_resumes_exactly(shard_set, tmp_path):
    # Names, counts and digests are what the position records, not where the set lies (e.g. S3 -> local).
    copy = tmp_path / "copy"
    shutil.copytree(shard_set, copy)
    _, state = _stopped(_cfg(shard_set), 3)
    here, there = (build_train_data(_cfg(root), TOKENIZER, 0, 1, 3) for root in (shard_set, copy))
    here.load_state_dict(state)
    there.load_state_dict(state)
    assert [b["keys"] for b in here] == [b["keys"] for b in there]
    assert there.state_dict()["history"] == []


def test_a_position_of_an_earlier_version_is_refused_naming_what_it_lacks(shard_set):
    _, state = _stopped(_cfg(shard_set), 3)
    for key in ("shuffle_buffer", "eye_reports", "jitter"):
        del state["layout"][key]
    state["layout"]["shards"] = 10  # it counted the shards only
    with pytest.raises(
        PositionError, match=r"data.shards: saved not recorded, now 10 shards named with their sha256"
    ):
        build_train_data(_cfg(shard_set), TOKENIZER, 0, 1, 3).load_state_dict(state)


# --- the same check before any process starts (retclip-train --check, and every rank before training) ---


def _run_config(shards: Path, out: Path, *extra: str) -> RunConfig:
    args = [
        "--model.tokenizer_path", str(ROOT / "configs/tiny_vocab.txt"),
        "--data.shards", str(shards), "--output_dir", str(out),
        "--data.batch_size", "4", "--data.num_workers", "0", "--train.seed", "3",
        "--checkpoint.resume", "auto", *extra,
    ]  # fmt: skip
    return load_config(RunConfig, ROOT / "configs/tiny.yaml", args)


def _checkpoint(cfg: RunConfig, steps: int) -> Path:
    """A checkpoint as the trainer writes it (train_state.json, data_rank0.json), without the weights the
    config check does not read."""
    path = Path(cfg.output_dir) / "checkpoints" / checkpoint_name(steps)
    path.mkdir(parents=True)
    state = {
        "step": steps,
        "epoch": 0,
        "world_size": 1,
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
    }
    (path / STATE_NAME).write_text(json.dumps(state))
    # As the trainer writes it: the loader sized by the model, which the config check sizes by too.
    _, data_state = _stopped(sized_for(cfg.data, model_image(cfg.model).size), steps, cfg.train.seed)
    (path / "data_rank0.json").write_text(json.dumps(data_state))
    return path


def test_the_config_check_refuses_the_same_resumes_before_any_process_starts(shard_set, tmp_path):
    out = tmp_path / "run"
    path = _checkpoint(_run_config(shard_set, out), 3)
    check_run_config(_run_config(shard_set, out), 1)
    check_run_config(_run_config(shard_set, out, "--data.shuffle_buffer", "7"), 1)  # re-planned, exactly
    check_run_config(_run_config(shard_set, out, "--data.num_workers", "2"), 1)
    with pytest.raises(ConfigError) as info:
        check_run_config(_run_config(shard_set, out, "--train.seed", "4"), 1)
    assert str(info.value).startswith(f"checkpoint.resume: {path}: train.seed: saved 3, now 4; resume with")
    with pytest.raises(ConfigError, match=r"data.eye_reports: saved True, now False"):
        check_run_config(_run_config(shard_set, out, "--data.eye_reports", "false"), 1)
    with pytest.raises(
        ConfigError, match=r"data.shards: the training shards changed \(train-000000.tar saved"
    ):
        check_run_config(_run_config(_rebuilt(tmp_path), out), 1)
    # The way out the refusal names.
    check_run_config(_run_config(shard_set, out, "--train.seed", "4", "--checkpoint.reset_data", "true"), 1)


def test_a_checkpoint_without_its_data_position_needs_reset_data(shard_set, tmp_path):
    out = tmp_path / "run"
    path = _checkpoint(_run_config(shard_set, out), 3)
    (path / "data_rank0.json").unlink()
    with pytest.raises(ConfigError) as info:
        check_run_config(_run_config(shard_set, out), 1)
    assert str(info.value) == (
        f"checkpoint.resume: {path} has no data position (data_rank0.json): pass --checkpoint.reset_data true "
        "to start epoch 0's data from its first patient (patients it already used are read again)"
    )
    check_run_config(_run_config(shard_set, out, "--checkpoint.reset_data", "true"), 1)


def test_patient_ids_are_stable_and_distinct():
    keys = [f"p{i:05d}" for i in range(5000)] + ["sanitised-" + "a" * 32, "ps-" + "0" * 32]
    ids = [patient_id(k) for k in keys]
    assert len(set(ids)) == len(keys)
    assert patient_id("p00001") == patient_id("p00001") == -109100801855055693
    assert collections.Counter(ids).most_common(1)[0][1] == 1


# --- what the trainer does with a position (train/loop.py restore_data) ---


def _restored(state: dict | None, steps: int) -> Restored:
    return Restored(
        step=steps, epoch=0, data_state=None if state is None else {"ranks": [state]}, path=Path("ck")
    )


def test_reset_data_restarts_only_a_position_that_cannot_be_continued(shard_set, caplog):
    _, state = _stopped(_cfg(shard_set), 3)
    # A position that can be continued is, with or without the flag: it may stay on for every requeue.
    for reset in (False, True):
        data = build_train_data(_cfg(shard_set), TOKENIZER, 0, 1, 3)
        restore_data(data, _restored(state, 3), reset)
        assert data.state_dict() == state
    # One that cannot: refused without the flag, its epoch from the first patient with it, said in the log.
    other_seed = build_train_data(_cfg(shard_set), TOKENIZER, 0, 1, 4)
    with pytest.raises(
        ConfigError, match=r"checkpoint.resume: ck: cannot continue the data position: train.seed"
    ):
        restore_data(other_seed, _restored(state, 3), False)
    for missing in (state, None):
        data = build_train_data(_cfg(shard_set), TOKENIZER, 0, 1, 4)
        with caplog.at_level(logging.WARNING, logger="retclip_dist.train"):
            restore_data(data, _restored(missing, 3), True)
        assert (data.step, data.epoch, data.epoch_patients, data.history) == (0, 0, [], [])
        assert "checkpoint.reset_data: the data position of ck cannot be continued" in caplog.text
        assert ("train.seed: saved 3, now 4" if missing else "no data_rank*.json") in caplog.text
        caplog.clear()
    with pytest.raises(
        ConfigError, match=r"ck has no data position .data_rank\*.json.: pass --checkpoint.reset_data"
    ):
        restore_data(build_train_data(_cfg(shard_set), TOKENIZER, 0, 1, 3), _restored(None, 3), False)


@pytest.mark.parametrize(
    ("rows", "reused", "twice"),
    [
        (["a", "b", "c"], 0, 0),
        (["a", "b", "a"], 1, 0),  # a short stream's refill read a again
        (["a", "b", "a", "b"], 0, 2),  # the order went wrong: two repeats no refill explains
        (["a", "b", "a", "b"], 1, 1),
        (["a", "b", "c"], 1, 0),  # c failed once, then its refill read it: no repeat, never -1
    ],
)
def test_read_twice_counts_repeats_no_refill_explains(rows, reused, twice):
    assert read_twice_count(rows, reused) == twice
