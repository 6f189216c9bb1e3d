"""Loader-level checks that catch what unit tests of the parts miss: per-eye augmentation, epoch order.

Written against the public loader (``build_train_data``, ``set_epoch``, iteration, ``DeviceAugment``)
only, so that the plan and stream internals can change underneath.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import fake_patients, tiny_tokenizer, write_shard_set

from retclip_dist.data.augment import augment_batch
from retclip_dist.data.config import DataConfig
from retclip_dist.data.loader import build_train_data
from retclip_dist.model.config import ImageInput

TOKENIZER = tiny_tokenizer()
EYES = ("left", "right")


def _cfg(root: Path, **changes: object) -> DataConfig:
    base = DataConfig(shards=str(root), num_workers=0, pin_memory=False, val_split=None)
    return dataclasses.replace(base, **changes)


def _epoch(cfg: DataConfig, epoch: int = 0, seed: int = 0) -> list[dict]:
    loader = build_train_data(cfg, TOKENIZER, 0, 1, seed)
    loader.set_epoch(epoch)
    return list(loader)


@pytest.fixture(scope="module")
def eye_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Every patient's left and right photos differ (own tint, disc centre and spot).
    root = tmp_path_factory.mktemp("eyes")
    write_shard_set(root, {"train": fake_patients(8, size=192, seed=4)}, per_shard=4)
    return root


def test_device_path_applies_each_eyes_own_parameters_like_the_cpu_path(eye_set: Path) -> None:
    # Strong, visible augmentation, so that one eye's parameters on the other eye's photo cannot pass.
    strong = {"crop_scale": (0.3, 0.6), "jitter": 0.5, "hflip": True, "erase_prob": 0.5, "batch_size": 4}
    common = {"image_size": 64, "decode_size": 128, "shuffle_buffer": 4, **strong}
    cpu = _epoch(_cfg(eye_set, augment_on="cpu", **common))
    loader = build_train_data(_cfg(eye_set, augment_on="device", **common), TOKENIZER, 0, 1, 0)
    raw = list(loader)
    on_device = loader.device_augment("cpu")  # CPU tensors stand in for the device
    assert len(cpu) == len(raw) == 2
    for cpu_batch, raw_batch in zip(cpu, raw, strict=True):
        assert cpu_batch["keys"] == raw_batch["keys"]
        # The parameters of the two eyes differ (drawn one after the other from the patient's RNG) ...
        assert not torch.equal(raw_batch["left_params"], raw_batch["right_params"])
        device = on_device(raw_batch)
        for eye, other in (("left", "right"), ("right", "left")):
            # ... each eye's device output matches that eye's CPU output (same photo, same parameters,
            # two resampling paths) ...
            gap = (device[eye] - cpu_batch[eye]).abs().mean().item()
            assert gap < 0.02, (eye, gap)
            assert torch.equal((device[eye] == 0).all(dim=1), (cpu_batch[eye] == 0).all(dim=1)), eye
            # ... and is far from this photo under the other eye's parameters (measured: 0.7-0.9 against
            # a gap of 0.003), or from the other photo.
            swapped = augment_batch(raw_batch[eye], raw_batch[f"{other}_params"], ImageInput.clip(64))
            assert (swapped - cpu_batch[eye]).abs().mean().item() > 0.2, eye
            assert (device[eye] - cpu_batch[other]).abs().mean().item() > 0.2, eye


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A single shard: the epoch's shard shuffle has nothing to reorder, so any change of sample order
    # between epochs comes from the shuffle buffer.
    root = tmp_path_factory.mktemp("one-shard")
    write_shard_set(root, {"train": fake_patients(12, size=32, seed=6)}, per_shard=12)
    return root


def test_shuffle_buffer_order_changes_with_the_epoch_and_repeats_within_it(one_shard: Path) -> None:
    cfg = _cfg(one_shard, batch_size=4, shuffle_buffer=12, image_size=16, decode_size=16)

    def order(epoch: int, seed: int = 0) -> list[str]:
        return [k for batch in _epoch(cfg, epoch, seed) for k in batch["keys"]]

    orders = [order(e) for e in range(3)]
    everyone = sorted(f"p{i:05d}" for i in range(12))
    # Each epoch reads every patient once, in an order of its own.
    assert all(sorted(o) == everyone for o in orders)
    assert len({tuple(o) for o in orders}) == 3, orders
    # The same epoch (a fresh loader, as after a restart) reads the same order again.
    assert order(1) == orders[1]
    assert order(1, seed=1) != orders[1]
    # One loader carried through the epochs, as the trainer does, reads the same orders.
    loader = build_train_data(cfg, TOKENIZER, 0, 1, 0)
    for epoch, expected in enumerate(orders):
        loader.set_epoch(epoch)
        assert [k for batch in loader for k in batch["keys"]] == expected, epoch


def test_a_small_shuffle_buffer_mixes_the_whole_stream_not_only_its_tail(one_shard: Path) -> None:
    # A buffer of 4 over 12 samples: most samples leave the buffer while the stream is still being read.
    # A buffer that always emitted the same slot would start every epoch with the stored order
    # p00000, p00004, p00005, ... and only shuffle its final flush.
    cfg = _cfg(one_shard, batch_size=4, shuffle_buffer=4, image_size=16, decode_size=16)
    heads = []
    for epoch in range(3):
        order = [k for batch in _epoch(cfg, epoch) for k in batch["keys"]]
        assert sorted(order) == [f"p{i:05d}" for i in range(12)]
        # A sample can leave at most 4 places before its stored position (it waits in the buffer).
        assert all(pos >= int(key[1:]) - 4 for pos, key in enumerate(order)), order
        heads.append(tuple(order[:6]))
    assert len(set(heads)) == 3, heads
