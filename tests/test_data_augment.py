"""Augmentation parameters, the CPU path, the batched device path, and their agreement."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import fake_patients
from PIL import Image

from retclip_dist.data.augment import (
    DeviceAugment,
    augment_batch,
    augment_cpu,
    erase_pixels,
    identity_params,
    sample_params,
    sample_rng,
)
from retclip_dist.data.config import DataConfig
from retclip_dist.data.samples import decode_draft
from retclip_dist.model.config import CLIP_MEAN, CLIP_STD, ImageInput

SOLID = (200, 120, 40)


def _solid(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), SOLID)


def _params(keys: list[str], cfg: DataConfig, epoch: int = 0) -> np.ndarray:
    return np.stack([sample_params(sample_rng(0, epoch, k), 512, 512, cfg) for k in keys])


def test_params_depend_only_on_seed_epoch_and_key() -> None:
    cfg = DataConfig()
    keys = ["p1", "p2", "p3"]
    forward = _params(keys, cfg)
    backward = _params(keys[::-1], cfg)[::-1]
    np.testing.assert_array_equal(forward, backward)
    assert not np.array_equal(forward, _params(keys, cfg, epoch=1))


def test_params_respect_the_configured_ranges() -> None:
    cfg = DataConfig(erase_prob=0.5)
    rows = _params([f"p{i}" for i in range(400)], cfg)
    area = rows[:, 2] * rows[:, 3]
    assert area.min() >= 0.9 - 1e-6 and area.max() <= 1.0 + 1e-6
    aspect = rows[:, 2] / rows[:, 3]
    assert aspect.min() >= 0.75 - 1e-6 and aspect.max() <= 4 / 3 + 1e-6
    assert (rows[:, 0] + rows[:, 2]).max() <= 1.0 + 1e-6
    assert rows[:, 5:8].min() >= 0.8 and rows[:, 5:8].max() <= 1.2
    # Flip is off by default; erasing is on for about erase_prob of the images.
    assert rows[:, 4].sum() == 0
    erased = (rows[:, 10] > 0).mean()
    assert 0.4 < erased < 0.6


def test_turning_on_flip_changes_only_the_flip_column() -> None:
    keys = [f"p{i}" for i in range(50)]
    plain, flipped = _params(keys, DataConfig()), _params(keys, DataConfig(hflip=True))
    np.testing.assert_array_equal(np.delete(plain, 4, axis=1), np.delete(flipped, 4, axis=1))
    assert 15 < flipped[:, 4].sum() < 35


def test_identity_params_only_resize_and_normalise() -> None:
    expected = (torch.tensor(SOLID) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    cpu = augment_cpu(_solid(64), identity_params(), ImageInput.clip(32))
    assert cpu.shape == (3, 32, 32)
    torch.testing.assert_close(cpu.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    assert cpu.std(dim=(1, 2)).max() < 1e-5
    images = torch.tensor(SOLID, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 48, 48)
    device = augment_batch(images, torch.from_numpy(np.stack([identity_params()] * 2)), ImageInput.clip(32))
    assert device.shape == (2, 3, 32, 32) and device.dtype == torch.float32
    torch.testing.assert_close(device, cpu.expand(2, 3, 32, 32), atol=1e-5, rtol=0)


def test_jitter_and_erasing_match_exactly_on_a_solid_image() -> None:
    row = identity_params()
    row[5:8] = (1.15, 0.85, 1.2)
    row[8:12] = (0.25, 0.5, 0.3, 0.125)
    cpu = augment_cpu(_solid(64), row, ImageInput.clip(40))
    images = torch.tensor(SOLID, dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    device = augment_batch(images, torch.from_numpy(row[None]), ImageInput.clip(40))[0]
    torch.testing.assert_close(device, cpu, atol=1e-5, rtol=0)
    top, left, h, w = erase_pixels(row, 40)
    assert (top, left, h, w) == (10, 20, 12, 5)
    assert int((cpu == 0).all(dim=0).sum()) == h * w
    assert cpu[:, top : top + h, left : left + w].abs().max() == 0
    # Brightness 1.15 on (200, 120, 40) lifts red to 230/255 before contrast and saturation move it.
    assert cpu[0, 0, 0] != augment_cpu(_solid(64), identity_params(), ImageInput.clip(40))[0, 0, 0]


def test_cpu_and_device_paths_agree_on_real_crops() -> None:
    """Same samples, same parameters: CPU path from the 512 px decode, device path from the 256 px draft."""
    cfg = DataConfig(hflip=True, erase_prob=0.5)
    patients = fake_patients(8, size=512, seed=3)
    rows = _params([p.key for p in patients], cfg)
    assert rows[:, 4].sum() >= 2 and (rows[:, 10] > 0).sum() >= 2
    cpu = torch.stack(
        [
            augment_cpu(Image.open(io.BytesIO(p.left)).convert("RGB"), r, ImageInput.clip(224))
            for p, r in zip(patients, rows, strict=True)
        ]
    )
    drafts = torch.stack([decode_draft(Image.open(io.BytesIO(p.left)), 256) for p in patients])
    assert drafts.shape == (8, 3, 256, 256) and drafts.dtype == torch.uint8
    device = augment_batch(drafts, torch.from_numpy(rows), ImageInput.clip(224))
    assert device.shape == cpu.shape == (8, 3, 224, 224)
    assert (cpu - device).abs().mean() < 0.01
    torch.testing.assert_close(device.mean(dim=(0, 2, 3)), cpu.mean(dim=(0, 2, 3)), atol=5e-3, rtol=0)
    torch.testing.assert_close(device.std(dim=(0, 2, 3)), cpu.std(dim=(0, 2, 3)), atol=5e-3, rtol=0)
    # The erased boxes are the same pixels in both paths.
    assert torch.equal((cpu == 0).all(dim=1), (device == 0).all(dim=1))
    # And the augmentation really moved the pixels: without it the output is far away.
    plain = augment_batch(drafts, torch.from_numpy(np.stack([identity_params()] * 8)), ImageInput.clip(224))
    assert (plain - device).abs().mean() > 0.05


def test_device_augment_replaces_images_and_drops_params() -> None:
    images = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    params = torch.from_numpy(np.stack([identity_params()] * 2))
    batch = {
        "left": images,
        "right": images,
        "left_params": params,
        "right_params": params,
        "keys": ["a", "b"],
    }
    out = DeviceAugment(ImageInput.clip(8), "cpu")(batch)
    assert sorted(out) == ["keys", "left", "right"]
    assert out["left"].shape == (2, 3, 8, 8)
    expected = (128 / 255 - CLIP_MEAN[1]) / CLIP_STD[1]
    assert out["right"][1, 1, 4, 4].item() == pytest.approx(expected, abs=1e-5)
    cpu_batch = {"left": torch.zeros(2, 3, 8, 8), "keys": ["a", "b"]}
    assert DeviceAugment(ImageInput.clip(8), "cpu")(cpu_batch) is cpu_batch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_augment_on_gpu_matches_the_cpu_batch() -> None:
    cfg = DataConfig(hflip=True, erase_prob=0.5)
    patients = fake_patients(16, size=512, seed=5)
    # Each eye its own photos and parameters, so a mix-up of the eyes on the GPU shows.
    batch = {}
    for eye, epoch in (("left", 0), ("right", 1)):
        photos = [getattr(p, eye) for p in patients]
        batch[eye] = torch.stack([decode_draft(Image.open(io.BytesIO(b)), 256) for b in photos])
        batch[f"{eye}_params"] = torch.from_numpy(_params([p.key for p in patients], cfg, epoch=epoch))
    on_gpu = DeviceAugment(ImageInput.clip(224), "cuda")(batch)
    assert on_gpu["left"].device.type == "cuda"
    for eye in ("left", "right"):
        on_cpu = augment_batch(batch[eye], batch[f"{eye}_params"], ImageInput.clip(224))
        torch.testing.assert_close(on_gpu[eye].cpu(), on_cpu, atol=1e-4, rtol=0, msg=eye)


def test_model_states_its_input_and_every_path_normalises_with_it(tmp_path) -> None:
    """The model's ImageInput (its size, its mean/std) is what the CPU path, the device path and
    retclip-eval apply: a non-CLIP normalisation set in the model config reaches all three, and survives
    save_pretrained."""
    from conftest import tiny_model_config

    from retclip_dist.eval.features import image_size, normalise
    from retclip_dist.model.retclip import RetClip
    from retclip_dist.model.vocab import write_vocab

    cfg = tiny_model_config(write_vocab(tmp_path / "vocab.txt", ["eye"]), image_size=40)
    cfg.image_mean, cfg.image_std = [0.5, 0.25, 0.0], [0.25, 0.5, 1.0]
    model = RetClip(cfg)
    spec = model.image_input
    assert spec == ImageInput(40, (0.5, 0.25, 0.0), (0.25, 0.5, 1.0), "bicubic")
    assert RetClip.from_pretrained(model.save_pretrained(tmp_path / "model")).image_input == spec
    assert image_size(model) == 40
    # A solid photo keeps its colour through the resize: each channel is (value / 255 - mean) / std.
    expected = torch.tensor([(v / 255.0 - m) / s for v, m, s in zip(SOLID, spec.mean, spec.std, strict=True)])
    cpu = augment_cpu(_solid(64), identity_params(), spec)
    assert cpu.shape == (3, 40, 40)
    torch.testing.assert_close(cpu, expected.view(3, 1, 1).expand(3, 40, 40), atol=1e-5, rtol=0)
    images = torch.tensor(SOLID, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 48, 48)
    batch = {
        "left": images,
        "right": images,
        "left_params": torch.from_numpy(np.stack([identity_params()] * 2)),
    }
    batch["right_params"] = batch["left_params"]
    device = DeviceAugment(spec, "cpu")(batch)["left"]
    torch.testing.assert_close(device, cpu.expand(2, 3, 40, 40), atol=1e-5, rtol=0)
    evaluated = normalise(images[:, :, :40, :40], spec)
    torch.testing.assert_close(evaluated, cpu.expand(2, 3, 40, 40), atol=1e-6, rtol=0)
