"""The training and evaluation loaders on small shard sets written in the contract format."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import signal
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import fake_patients, free_port, tiny_tokenizer, write_shard_set

from retclip_dist.data.config import DataConfig
from retclip_dist.data.loader import build_train_data, data_loader
from retclip_dist.data.skips import SkipCounter
from retclip_dist.data.streams import read_range
from retclip_dist.data.validation import build_val_data
from retclip_dist.shardset import read_manifest

TOKENIZER = tiny_tokenizer()
# Small images keep the tests fast: 96 px sources, drafts of 48 px, 40 px model inputs.
SMALL = {"decode_size": 48, "image_size": 40, "shuffle_buffer": 5, "num_workers": 0}


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    patients = fake_patients(51, size=96, seed=1, eye_reports_every=4)
    write_shard_set(root, {"train": patients[:40], "val": patients[40:]}, per_shard=4)
    return root


def _cfg(root: Path, **changes: object) -> DataConfig:
    return dataclasses.replace(DataConfig(shards=str(root), **SMALL), **changes)


def _epoch(cfg: DataConfig, rank: int = 0, world: int = 1, seed: int = 0) -> list[dict]:
    return list(build_train_data(cfg, TOKENIZER, rank, world, seed))


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["keys"] == y["keys"]
        for k in ("left", "right", "left_params", "input_ids", "attention_mask"):
            assert torch.equal(x[k], y[k]), k


def test_device_path_batch_shapes_dtypes_and_tokens(shard_set: Path) -> None:
    batch = _epoch(_cfg(shard_set, batch_size=4, eye_reports=True, text_padding="max"))[0]
    assert batch["left"].shape == (4, 3, 48, 48) and batch["left"].dtype == torch.uint8
    assert batch["right_params"].shape == (4, 12) and batch["right_params"].dtype == torch.float32
    for prefix in ("", "left_", "right_"):
        assert batch[f"{prefix}input_ids"].shape == (4, 100)
        assert batch[f"{prefix}input_ids"].dtype == torch.int64
    ids = batch["input_ids"][0].tolist()
    # "Left eye: ..." lower-cased: [CLS] left eye : ..., padded with [PAD] (0) to 100.
    assert ids[:4] == TOKENIZER.convert_tokens_to_ids(["[CLS]", "left", "eye", ":"]) and ids[-1] == 0
    assert TOKENIZER.unk_token_id not in ids  # the fake reports use the tiny vocabulary only
    assert batch["attention_mask"][0].sum() == ids.index(3) + 1
    # data.text_padding batch (the default): the same tokens, cut to the longest report rounded up to 16.
    short = _epoch(_cfg(shard_set, batch_size=4, eye_reports=True))[0]
    longest = max(int(batch[f"{p}attention_mask"].sum(1).max()) for p in ("", "left_", "right_"))
    width = min(100, -(-longest // 16) * 16)
    for prefix in ("", "left_", "right_"):
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(short[f"{prefix}{key}"], batch[f"{prefix}{key}"][:, :width]), prefix + key


def test_cpu_path_yields_normalised_model_inputs(shard_set: Path) -> None:
    batch = _epoch(_cfg(shard_set, batch_size=4, augment_on="cpu"))[0]
    assert batch["left"].shape == (4, 3, 40, 40) and batch["left"].dtype == torch.float32
    assert "left_params" not in batch
    # Black corners normalise to -mean/std: about -1.79 for red.
    assert batch["left"][:, 0].min().item() == pytest.approx(-0.48145466 / 0.26862954, abs=1e-4)


def test_per_eye_reports_fall_back_to_the_patient_report(shard_set: Path) -> None:
    batches = _epoch(_cfg(shard_set, batch_size=4, eye_reports=True))
    for batch in batches:
        for i, key in enumerate(batch["keys"]):
            own = int(key[1:]) % 4 == 0
            same = torch.equal(batch["left_input_ids"][i], batch["input_ids"][i])
            assert same != own, key


def test_ranks_run_equal_steps_and_the_unused_remainder_is_reported(shard_set: Path) -> None:
    # 40 samples, P=2, W=2, micro 3: global batch 6, 6 steps (3 per worker), 36 of 40 samples used.
    cfg = _cfg(shard_set, batch_size=3, num_workers=2)
    loaders = [build_train_data(cfg, TOKENIZER, r, 2, 0) for r in (0, 1)]
    assert [d.steps_per_epoch for d in loaders] == [6, 6]
    assert [d.unused_per_epoch for d in loaders] == [4, 4]
    assert [d.samples_per_epoch for d in loaders] == [40, 40]
    keys = []
    for d in loaders:
        batches = list(d)
        assert len(batches) == 6 and d.epoch_done()
        keys += [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 36


def test_one_rank_with_two_partitions_sees_the_global_batch_of_two_ranks(shard_set: Path) -> None:
    # Fixed padding: with text_padding batch each rank pads to its own longest report, so the token
    # tensors of two ranks can differ in width (the loss does not see the width; test_text_padding.py).
    single = _epoch(_cfg(shard_set, batch_size=4, partitions=2, text_padding="max"))
    ranks = [_epoch(_cfg(shard_set, batch_size=2, text_padding="max"), rank=r, world=2) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 10
    for step, batch in enumerate(single):
        assert batch["keys"] == ranks[0][step]["keys"] + ranks[1][step]["keys"]
        for k in ("left", "right", "right_params", "input_ids"):
            assert torch.equal(batch[k], torch.cat([ranks[0][step][k], ranks[1][step][k]])), k


def _resumed_epoch(cfg: DataConfig, seed: int, stop: int) -> tuple[list[dict], dict]:
    """The batches of an epoch read as ``stop`` batches, a checkpoint, and a fresh loader continuing."""
    first = build_train_data(cfg, TOKENIZER, 0, 1, seed)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == stop:
            break
    state = json.loads(json.dumps(first.state_dict()))
    assert state["step"] == stop
    resumed = build_train_data(cfg, TOKENIZER, 0, 1, seed)
    resumed.load_state_dict(state)
    batches = head + list(resumed)
    assert resumed.epoch_done()
    return batches, resumed.state_dict()


@pytest.mark.parametrize(
    ("workers", "partitions", "batch_size", "stop", "steps"),
    [
        (0, 1, 3, 5, 13),
        (2, 1, 3, 5, 13),
        # Streams of 9 samples over shards of 4: each starts or ends inside a shard.
        (2, 2, 6, 3, 6),
        # Unequal workers: caps (4, 3, 3), order 0 1 2 0 1 2 0 1 2 0; resume before and after the last
        # round, in which only worker 0 is left.
        (3, 2, 4, 8, 10),
        (3, 2, 4, 9, 10),
    ],
)
def test_resume_continues_with_the_uninterrupted_batches(
    shard_set: Path, workers: int, partitions: int, batch_size: int, stop: int, steps: int
) -> None:
    cfg = _cfg(shard_set, batch_size=batch_size, num_workers=workers, partitions=partitions)
    full = build_train_data(cfg, TOKENIZER, 0, 1, 5)
    full_batches = list(full)
    assert len(full_batches) == full.steps_per_epoch == steps
    batches, state = _resumed_epoch(cfg, 5, stop)
    _assert_same(batches, full_batches)
    assert state == full.state_dict()


def test_next_epoch_after_a_resume_matches_a_fresh_next_epoch(shard_set: Path) -> None:
    cfg = _cfg(shard_set, batch_size=4, num_workers=2)
    resumed = build_train_data(cfg, TOKENIZER, 0, 1, 0)
    resumed.load_state_dict(build_train_data(cfg, TOKENIZER, 0, 1, 0).state_dict())
    list(resumed)
    resumed.set_epoch(1)
    fresh = build_train_data(cfg, TOKENIZER, 0, 1, 0)
    fresh.set_epoch(1)
    first_epoch = build_train_data(cfg, TOKENIZER, 0, 1, 0)
    epoch1 = list(fresh)
    _assert_same(list(resumed), epoch1)
    assert [b["keys"] for b in epoch1] != [b["keys"] for b in first_epoch]
    assert resumed.state_dict()["epoch"] == 1


def _keys_of(loaders: list, steps: int | None = None) -> list[str]:
    """Keys of the next ``steps`` batches (all: the rest of the epoch) of every rank's loader."""
    keys = []
    for data in loaders:
        for batch in itertools.islice(data, steps):
            keys += batch["keys"]
    return keys


def _ranks(cfg: DataConfig, world: int, seed: int = 3) -> list:
    return [build_train_data(cfg, TOKENIZER, r, world, seed) for r in range(world)]


# (saved world, workers, partitions or None), the same for the resuming run, and the step it stopped at.
RESHAPES = [
    ((2, 1, None), (1, 1, None), 2),
    ((1, 1, None), (2, 1, None), 3),
    ((2, 2, None), (2, 1, None), 3),
    ((2, 2, 4), (1, 3, 4), 1),  # partitions explicitly set: kept by the new world size
]


@pytest.mark.parametrize(("before", "after", "stop"), RESHAPES)
def test_resume_on_another_layout_uses_the_epochs_patients_once(shard_set: Path, before, after, stop) -> None:
    # 40 patients, global batch 4: 10 steps, nothing left over; a stop after `stop` steps.
    (n, w, p), (n2, w2, p2) = before, after
    full = _keys_of(_ranks(_cfg(shard_set, batch_size=4 // n, num_workers=w, partitions=p), n))
    assert len(full) == 40
    interrupted = _ranks(_cfg(shard_set, batch_size=4 // n, num_workers=w, partitions=p), n)
    used = _keys_of(interrupted, stop)
    states = {"ranks": json.loads(json.dumps([data.state_dict() for data in interrupted]))}
    resumed = _ranks(_cfg(shard_set, batch_size=4 // n2, num_workers=w2, partitions=p2), n2)
    for data in resumed:
        data.load_state_dict(states)
        assert data.steps_per_epoch == 10 and data.unused_per_epoch == 0
    rest = _keys_of(resumed)
    assert len(used) == 4 * stop and len(rest) == 40 - 4 * stop
    assert sorted(used + rest) == sorted(full)
    for data in resumed:  # the next epoch is the new layout's ordinary plan
        data.set_epoch(1)
        assert data.steps_per_epoch == 10 and not data.history


def test_a_reshaped_epoch_resumes_exactly_and_reshapes_again(shard_set: Path) -> None:
    # 38 patients, global batch 4: 9 steps, 2 left over (the same two, the epoch's last, every time).
    patients = fake_patients(38, size=64, seed=4)
    root = shard_set.parent / "reshape-twice"
    write_shard_set(root, {"train": patients}, per_shard=[5, 3])
    one = _cfg(root, batch_size=4, num_workers=2)
    full = build_train_data(one, TOKENIZER, 0, 1, 3)
    full_keys = _keys_of([full])
    assert len(full_keys) == 36 and full.unused_per_epoch == 2
    first = build_train_data(one, TOKENIZER, 0, 1, 3)
    used = _keys_of([first], 2)
    two = _ranks(_cfg(root, batch_size=2, num_workers=1), 2)
    for data in two:
        data.load_state_dict({"ranks": [first.state_dict()]})
    used += _keys_of(two, 3)
    states = [data.state_dict() for data in two]
    # Same layout again: exactly the batches the reshaped run would have served next.
    again = _ranks(_cfg(root, batch_size=2, num_workers=1), 2)
    for data, state in zip(again, states, strict=True):
        data.load_state_dict(state)
    ahead = [[b["keys"] for b in data] for data in again]
    assert ahead == [[b["keys"] for b in data] for data in two]
    # Another layout again: back to 1 rank with 3 workers.
    last = build_train_data(_cfg(root, batch_size=4, num_workers=3), TOKENIZER, 0, 1, 3)
    last.load_state_dict({"ranks": states})
    assert last.steps_per_epoch == 9 and last.state_dict()["base_step"] == 5
    rest = _keys_of([last])
    assert len(used) == 20 and len(rest) == 16
    assert sorted(used + rest) == sorted(full_keys)


def test_resume_refuses_another_global_batch(shard_set: Path) -> None:
    state = build_train_data(_cfg(shard_set, batch_size=2), TOKENIZER, 0, 1, 0).state_dict()
    other = build_train_data(_cfg(shard_set, batch_size=4, num_workers=2), TOKENIZER, 0, 1, 0)
    with pytest.raises(
        ValueError, match=r"data.batch_size: saved 2 on 1 processes \(global batch 2\), now 4"
    ):
        other.load_state_dict(state)
    # One rank's position of a 2-rank run cannot tell what the other rank used.
    two = _ranks(_cfg(shard_set, batch_size=2), 2)
    with pytest.raises(ValueError, match="needs the positions of all 2 saved ranks, got 1"):
        build_train_data(_cfg(shard_set, batch_size=4), TOKENIZER, 0, 1, 3).load_state_dict(
            two[0].state_dict()
        )


def _damaged_set(root: Path) -> Path:
    patients = fake_patients(12, size=96, seed=2)
    patients[1].left = patients[1].left[:50]  # an undecodable JPEG
    write_shard_set(root, {"train": patients}, per_shard=4)
    # Drop one member of a sample and cut the third shard in the middle of its third sample.
    with tarfile.open(root / "train-000001.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(root / "train-000001.tar", "w") as tar:
        for m, data in members:
            if m.name != "p00005.right.jpg":
                tar.addfile(m, io.BytesIO(data))
    with tarfile.open(root / "train-000002.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name.startswith("p00010.")).offset_data + 20
    (root / "train-000002.tar").write_bytes((root / "train-000002.tar").read_bytes()[:cut])
    return root


def test_damaged_samples_and_shards_are_skipped_and_counted(tmp_path: Path) -> None:
    cfg = _cfg(_damaged_set(tmp_path), batch_size=4)
    data = build_train_data(cfg, TOKENIZER, 0, 1, 0)
    assert data.steps_per_epoch == 3
    batches = list(data)
    # Only p00008 survives the cut: p00009 is complete, but a sample is only known to be complete when
    # the next one starts, and the read of p00010 fails. 3 samples short, so 5 are read a second time.
    assert len(batches) == 3 and all(len(b["keys"]) == 4 for b in batches)
    keys = [k for b in batches for k in b["keys"]]
    assert {"p00001", "p00005", "p00009", "p00010", "p00011"}.isdisjoint(keys)
    assert data.skip_counts == {"corrupt_image": 1, "missing_member": 1, "shard_error": 3, "reused": 5}
    assert data.skipped == data.epoch_skipped == 5
    assert len(set(keys)) == 7 == data.samples_per_epoch - data.unused_per_epoch - data.epoch_skipped
    data.set_epoch(1)
    assert data.epoch_skipped == 0 and data.skipped == 5


def _read(shard, start: int, stop: int | None) -> tuple[list[str], int]:
    counter = SkipCounter()
    keys = [raw["__key__"] for raw in read_range(shard, {}, counter, start, stop)]
    return keys, counter.counts["shard_error"]


def test_shard_ranges_read_exactly_the_samples_of_a_full_read(shard_set: Path, tmp_path: Path) -> None:
    shard = read_manifest(str(shard_set)).split("train")[3]
    full, _ = _read(shard, 0, None)
    assert full == ["p00012", "p00013", "p00014", "p00015"]
    for start in range(4):
        for stop in range(start + 1, 5):
            assert _read(shard, start, stop) == (full[start:stop], 0)
    # The cut shard: p00008 survives a full read, the 3 after it are lost. Cut into ranges, the same
    # samples survive and each loss is counted by exactly one range.
    cut = read_manifest(str(_damaged_set(tmp_path))).split("train")[2]
    assert _read(cut, 0, None) == (["p00008"], 3)
    for bounds in ([0, 1, 4], [0, 2, 4], [0, 3, 4], [0, 1, 2, 3, 4]):
        parts = [_read(cut, a, b) for a, b in itertools.pairwise(bounds)]
        assert [k for keys, _ in parts for k in keys] == ["p00008"]
        assert sum(lost for _, lost in parts) == 3


def test_resume_over_damaged_data_counts_each_loss_once(tmp_path: Path) -> None:
    cfg = _cfg(_damaged_set(tmp_path), batch_size=4)
    full = build_train_data(cfg, TOKENIZER, 0, 1, 0)
    full_batches = list(full)
    batches, state = _resumed_epoch(cfg, 0, 2)
    _assert_same(batches, full_batches)
    assert state["skips"] == state["epoch_skips"] == dict(full.skip_counts)


def test_resume_refuses_a_mid_epoch_position_of_the_old_plan(shard_set: Path) -> None:
    cfg = _cfg(shard_set, batch_size=4)
    old = build_train_data(cfg, TOKENIZER, 0, 1, 0)
    for _ in zip(range(2), old, strict=False):
        pass
    state = old.state_dict()
    del state["layout"]["plan"], state["epoch_skips"]
    with pytest.raises(ValueError, match="plan: saved shards/1, now ranges/1"):
        build_train_data(cfg, TOKENIZER, 0, 1, 0).load_state_dict(state)
    # At an epoch's first step a position means the same under either plan.
    state.update(step=0, positions=[[0]])
    fresh = build_train_data(cfg, TOKENIZER, 0, 1, 0)
    fresh.load_state_dict(state)
    _assert_same(list(fresh), list(build_train_data(cfg, TOKENIZER, 0, 1, 0)))


def _rank_epoch(rank: int, world: int, port: int, root: str, out: str) -> None:
    """One rank of a gloo job: read an epoch with 2 loader workers; rank 0 writes every rank's keys."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = _cfg(Path(root), batch_size=3, num_workers=2)
        data = build_train_data(cfg, TOKENIZER, rank, world, 11)
        steps = [batch["keys"] for batch in data]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"steps": steps, "planned": data.steps_per_epoch})
        if rank == 0:
            Path(out).write_text(json.dumps({"ranks": gathered, "unused": data.unused_per_epoch}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.dist
def test_two_gloo_ranks_with_two_workers_use_every_patient_once(tmp_path: Path, monkeypatch) -> None:
    # 47 patients in shards of 9, 1, 5, 2, ... ; 2 ranks x 3 patients: 7 steps of 6 (worker 0 serves 4,
    # worker 1 serves 3), streams of 12 and 9 samples that start and end inside shards, 5 left over.
    patients = fake_patients(47, size=64, seed=5)
    write_shard_set(tmp_path / "shards", {"train": patients}, per_shard=[9, 1, 5, 2])
    out = tmp_path / "keys.json"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_epoch, args=(2, free_port(), str(tmp_path / "shards"), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    ranks = result["ranks"]
    assert [len(r["steps"]) for r in ranks] == [r["planned"] for r in ranks] == [7, 7]
    assert all(len(keys) == 3 for r in ranks for keys in r["steps"])
    seen = [k for r in ranks for keys in r["steps"] for k in keys]
    assert len(seen) == len(set(seen)) == 42 == 47 - result["unused"]
    assert set(seen) <= {p.key for p in patients}


def test_eval_loader_reads_every_patient_once_across_ranks(shard_set: Path) -> None:
    cfg = _cfg(shard_set, batch_size=3, augment_on="cpu")
    seen = []
    for rank in (0, 1):
        loader = build_val_data(dataclasses.replace(cfg, num_workers=2 - rank), TOKENIZER, rank, 2)
        mine = []
        for batch in loader:
            assert batch["left"].shape[1:] == (3, 40, 40)
            assert len(batch["reports"]) == len(batch["left_reports"]) == len(batch["keys"])
            mine += batch["keys"]
        assert len(mine) == (7, 4)[rank]  # val shards hold 4, 4, 3: rank 0 reads the 1st and 3rd
        seen += mine
    assert sorted(seen) == [f"p{i:05d}" for i in range(40, 51)]


def test_eval_batches_carry_identity_params(shard_set: Path) -> None:
    batch = next(iter(build_val_data(_cfg(shard_set, batch_size=2), TOKENIZER, 0, 1)))
    rows = batch["left_params"]
    assert rows[:, 2:4].eq(1).all() and rows[:, 4].eq(0).all() and rows[:, 5:8].eq(1).all()
    assert rows[:, 8:].eq(0).all()


def test_manifest_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/2", "shards": []}))
    with pytest.raises(
        ValueError, match=r"manifest.json: not a retclip-shards/1 manifest \(format is 'other/2'\)"
    ):
        read_manifest(str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot read shard manifest .*missing/manifest\.json"):
        read_manifest(str(tmp_path / "missing"))


def test_missing_val_split_disables_validation(tmp_path: Path) -> None:
    write_shard_set(tmp_path, {"train": fake_patients(4, size=32)}, per_shard=4)
    assert build_val_data(_cfg(tmp_path), TOKENIZER, 0, 1) is None
    assert build_val_data(_cfg(tmp_path, val_split=None), TOKENIZER, 0, 1) is None


class _SignalledPids(torch.utils.data.IterableDataset):
    """Each worker sends itself ``signals`` and yields its pid (module level: workers unpickle it)."""

    def __init__(self, signals: tuple[int, ...]) -> None:
        self.signals = signals

    def __iter__(self):
        for sig in self.signals:
            os.kill(os.getpid(), sig)
        yield os.getpid()


@pytest.mark.parametrize("requeue", ["USR1", "USR2"])
def test_loader_workers_ignore_stop_signals(tmp_path, monkeypatch, requeue):
    # Slurm signals every process of a job; workers must survive until the trainer has saved, whichever
    # requeue signal the job was given (the trainer hands its stop signals to the workers it starts).
    monkeypatch.setenv("RETCLIP_REQUEUE_SIGNAL", requeue)
    requeue_signal = getattr(signal, f"SIG{requeue}")
    dataset = _SignalledPids((signal.SIGTERM, requeue_signal))
    pids = list(data_loader(dataset, DataConfig(num_workers=1, pin_memory=False)))
    assert len(pids) == 1 and pids[0] != os.getpid()
