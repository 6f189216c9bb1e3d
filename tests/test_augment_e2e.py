"""The augmentation switches, the starting logit scale and AdamW's betas and eps, through ``retclip-train``.

Two one-process runs of one step over the same 16 patients, with every augmentation switch away from
both tiny.yaml and the defaults (crop 0.3-0.5 of the area at aspect 0.6-0.8, jitter 0.5, erasing always,
flips on); they differ only in where the augmentation runs (``data.augment_on``) and in the optimiser
and logit-scale settings, which only the device run changes. Ranks do not matter to any of these: one
process is the cheaper run.

A wrapper around ``cli.main()`` records, in the trainer's process, every batch the loader hands over and
what ``DeviceAugment`` turns it into, which is what the model's forward receives (``train_step``), and
the log-scales at the first forward. The tests compute what those tensors must be from the shard files
themselves, with PIL and the textbook colour formulas, not with the package's augmentation code.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from conftest import TINY_TRAIN_ARGS, build_synth_shards, model_image
from PIL import Image
from safetensors.torch import load_file

from retclip_dist.config import from_dict
from retclip_dist.model.config import ImageInput
from retclip_dist.model.retclip import RetClip
from retclip_dist.shardset import EYES, IMAGE_MEMBER, MANIFEST_NAME
from retclip_dist.train.config import RunConfig
from retclip_dist.train.optim import param_groups

pytestmark = [pytest.mark.slow]

CROP_SCALE = (0.3, 0.5)  # defaults (0.9, 1.0): a crop from here is a crop no default could draw
CROP_RATIO = (0.6, 0.8)  # defaults (3/4, 4/3)
JITTER = 0.5  # tiny.yaml 0, default 0.2
DECODE = 160  # tiny.yaml 128, default 256
INIT_LOGIT_SCALE = 1.25  # tiny.yaml 2.6593, default ln 90
BETAS = (0.6, 0.9)  # tiny.yaml and default (0.9, 0.98)
EPS = 1e-3  # default 1e-6 (far above the gradients of many weights: it shrinks their first step)
LR = 5e-4  # tiny.yaml's, reached at step 1 after its 1 warmup step
AUGMENT = [
    "--data.crop_scale", json.dumps(CROP_SCALE),
    "--data.crop_ratio", json.dumps(CROP_RATIO),
    "--data.jitter", str(JITTER),
    "--data.erase_prob", "1.0",  # default 0.1
    "--data.hflip", "true",  # default false
    "--data.decode_size", str(DECODE),
    "--train.max_steps", "1",
]  # fmt: skip
DEVICE = [
    "--data.augment_on", "device",  # tiny.yaml cpu
    "--model.init_logit_scale", str(INIT_LOGIT_SCALE),
    "--train.betas", json.dumps(BETAS),
    "--train.eps", str(EPS),
]  # fmt: skip

# `retclip-train` with the loader's batches, the model's inputs and the first log-scales recorded.
RECORD = """\
import itertools, os, sys
import torch
from retclip_dist.data.augment import DeviceAugment
from retclip_dist.model.retclip import RetClip
from retclip_dist.train.cli import main

out = os.environ["RECORD_DIR"]
calls = itertools.count()
augment = DeviceAugment.__call__
forward = RetClip.forward

def kept(batch):
    names = ("keys", "left", "right", "left_params", "right_params")
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in batch.items() if k in names}

def recorded(self, batch):
    result = augment(self, batch)
    torch.save({"loader": kept(batch), "model": kept(result)}, f"{out}/batch-{next(calls):03d}.pt")
    return result

def first_scales(self, batch):
    path = f"{out}/scales.pt"
    if not os.path.exists(path):
        torch.save({level: float(scale) for level, scale in self.logit_scale.items()}, path)
    return forward(self, batch)

DeviceAugment.__call__ = recorded
RetClip.forward = first_scales
sys.exit(main())
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """16 patients of 64 px eyes: 8 to train on (one step of 8), 8 to validate."""
    root = tmp_path_factory.mktemp("augment-data")
    return build_synth_shards(root, 16, seed=5, raw_size=96, size=64, max_count=8, val_fraction=0.25)


def _train_one_process(shards: Path, root: Path, *extra: str) -> Path:
    """``retclip-train`` through RECORD as one process (world size 1) with TINY_TRAIN_ARGS, then ``extra``."""
    script, out, record = root / "record.py", root / "run", root / "record"
    script.write_text(RECORD)
    record.mkdir()
    args = [*TINY_TRAIN_ARGS, "--data.shards", str(shards), "--output_dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RECORD_DIR": str(record)}
    done = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return root


@pytest.fixture(scope="module")
def device_run(shards, tmp_path_factory) -> Path:
    return _train_one_process(shards, tmp_path_factory.mktemp("augment-device"), *AUGMENT, *DEVICE)


@pytest.fixture(scope="module")
def cpu_run(shards, tmp_path_factory) -> Path:
    return _train_one_process(shards, tmp_path_factory.mktemp("augment-cpu"), *AUGMENT)


# -- what the tests compare with ---------------------------------------------------------------------

IDENTITY = [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # whole image, nothing else
GREY = (0.2989, 0.587, 0.114)  # the luma weights contrast and saturation are defined against


def _shard_images(shards: Path) -> dict[str, dict[str, dict[str, Image.Image]]]:
    """split -> patient key -> eye -> the eye's photo, read from the shard files as they lie."""
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    out: dict[str, dict[str, dict[str, Image.Image]]] = {}
    for entry in manifest["shards"]:
        with tarfile.open(shards / entry["name"]) as tar:
            for member in tar.getmembers():
                key, _, name = member.name.partition(".")
                for eye in EYES:
                    if name == IMAGE_MEMBER[eye]:
                        photo = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                        out.setdefault(entry["split"], {}).setdefault(key, {})[eye] = photo
    return out


def _recorded(run: Path) -> dict[str, dict[str, dict[str, torch.Tensor | None]]]:
    """patient key -> eye -> {"loader": image, "params": row or None, "model": the model's input}."""
    out: dict[str, dict[str, dict[str, torch.Tensor | None]]] = {}
    for path in sorted((run / "record").glob("batch-*.pt")):
        batch = torch.load(path, weights_only=True)
        loader, model = batch["loader"], batch["model"]
        assert model["keys"] == loader["keys"]
        for row, key in enumerate(loader["keys"]):
            assert key not in out, f"{key} read twice"
            out[key] = {
                eye: {
                    "loader": loader[eye][row],
                    "params": loader[f"{eye}_params"][row] if f"{eye}_params" in loader else None,
                    "model": model[eye][row],
                }
                for eye in EYES
            }
    return out


@functools.cache
def _input(run: Path) -> ImageInput:
    """The input the run's model states: its side, mean and std."""
    cfg = from_dict(RunConfig, json.loads((run / "run" / "config.json").read_text()))
    return model_image(cfg.model)


def _normalise(x: torch.Tensor, run: Path) -> torch.Tensor:
    spec = _input(run)
    return (x - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _resized(image: Image.Image, side: int, box: tuple[float, ...] | None = None) -> Image.Image:
    return image.resize((side, side), Image.Resampling.BICUBIC, box=box)


def _jittered(x: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """Brightness, contrast, saturation in that order, each clamped to [0, 1] (torchvision's definitions)."""
    grey = torch.tensor(GREY).view(3, 1, 1)
    x = (x * brightness).clamp(0.0, 1.0)
    x = (contrast * x + (1.0 - contrast) * (x * grey).sum(0).mean()).clamp(0.0, 1.0)
    return (saturation * x + (1.0 - saturation) * (x * grey).sum(0, keepdim=True)).clamp(0.0, 1.0)


def _erase_box(row: torch.Tensor, side: int) -> torch.Tensor:
    """[side, side] mask of the erase box (top, left, height, width as fractions, rounded half up)."""
    top, left, h, w = (math.floor(float(v) * side + 0.5) for v in row[8:12])
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[top : top + h, left : left + w] = True
    return mask


def _expected(image: Image.Image, row: torch.Tensor, run: Path, leave_out: str = "") -> torch.Tensor:
    """The model input ``row`` asks for: crop and resize, mirror, jitter, normalise, erase (each step can
    be left out, to show that the recorded input needs it)."""
    side = _input(run).size
    x0, y0, w, h = (float(v) for v in row[0:4])
    box = None if leave_out == "crop" else (x0 * image.width, y0 * image.height, (x0 + w) * image.width,
                                             (y0 + h) * image.height)  # fmt: skip
    x = _pixels(_resized(image, side, box))
    if row[4] > 0.5 and leave_out != "flip":
        x = x.flip(-1)
    if leave_out != "jitter":
        x = _jittered(x, *(float(v) for v in row[5:8]))
    x = _normalise(x, run)
    if leave_out != "erase":
        x[:, _erase_box(row, side)] = 0.0
    return x


# -- data.augment_on and data.decode_size ------------------------------------------------------------


def test_augment_on_device_hands_over_decoded_photos_and_the_cpu_path_finished_inputs(
    shards, device_run, cpu_run
):
    photos = {key: eyes for split in _shard_images(shards).values() for key, eyes in split.items()}
    device, cpu = _recorded(device_run), _recorded(cpu_run)
    assert device.keys() == cpu.keys() == photos.keys()  # 8 to train on, 8 to validate
    for key, eyes in device.items():
        for eye, rec in eyes.items():
            # Device path: the loader decodes to data.decode_size and leaves the augmentation to the trainer.
            expected = torch.from_numpy(np.array(_resized(photos[key][eye], DECODE))).permute(2, 0, 1)
            assert rec["loader"].dtype == torch.uint8 and torch.equal(rec["loader"], expected), (key, eye)
            assert rec["params"] is not None and rec["params"].shape == (12,)
            assert rec["model"].dtype == torch.float32 and rec["model"].shape == (3, 128, 128)
            # CPU path: the loader's images are the model's inputs already; nothing is left to do.
            done = cpu[key][eye]
            assert done["params"] is None and done["loader"].shape == (3, 128, 128), (key, eye)
            assert torch.equal(done["loader"], done["model"]), (key, eye)


def test_validation_inputs_are_the_resized_normalised_shard_photos(shards, device_run, cpu_run):
    val = _shard_images(shards)["val"]
    device, cpu = _recorded(device_run), _recorded(cpu_run)
    assert len(val) == 8
    for key, eyes in val.items():
        for eye, photo in eyes.items():
            expected = _normalise(_pixels(_resized(photo, 128)), cpu_run)
            torch.testing.assert_close(cpu[key][eye]["model"], expected, atol=1e-5, rtol=0)
            assert device[key][eye]["params"].tolist() == IDENTITY, (key, eye)
            # The device path resamples its 160 px decode to 128 px: bicubic twice, not once.
            err = (device[key][eye]["model"] - expected).abs().mean().item()
            assert err < 0.015, (key, eye, err)


# -- crop, flip, jitter and erasing on the training inputs ---------------------------------------------


def _training(shards: Path, run: Path) -> list[tuple[str, str, dict]]:
    recorded = _recorded(run)
    return [(key, eye, recorded[key][eye]) for key in _shard_images(shards)["train"] for eye in EYES]


def test_training_parameters_follow_the_configured_ranges(shards, device_run):
    rows = torch.stack([rec["params"] for _, _, rec in _training(shards, device_run)]).double()
    assert len(rows) == 16  # 8 patients, 2 eyes
    area, aspect = rows[:, 2] * rows[:, 3], rows[:, 2] / rows[:, 3]  # square photos: fractions are pixels
    assert ((area >= CROP_SCALE[0] - 1e-6) & (area <= CROP_SCALE[1] + 1e-6)).all(), area
    assert ((aspect >= CROP_RATIO[0] - 1e-6) & (aspect <= CROP_RATIO[1] + 1e-6)).all(), aspect
    assert 0 < rows[:, 4].sum() < 16  # mirrored and not: each eye draws its own flip
    factors = rows[:, 5:8]
    assert ((factors >= 1 - JITTER - 1e-6) & (factors <= 1 + JITTER + 1e-6)).all(), factors
    assert ((factors - 1).abs() > 0.2).sum() > 10  # outside the default 0.2: the configured 0.5 drew them
    assert (rows[:, 10] * rows[:, 11] > 0).all()  # erase_prob 1: every image loses a box


def test_training_inputs_are_the_configured_augmentation_of_the_shard_photos(shards, device_run, cpu_run):
    """The CPU run's inputs are the shard photos through the parameters the device run's loader drew for
    the same patient (the draw depends only on seed, epoch and key), to float precision; the device run's
    are its decoded photos through the same parameters, to its resampling's precision."""
    photos = _shard_images(shards)["train"]
    cpu = _recorded(cpu_run)
    for key, eye, rec in _training(shards, device_run):
        row = rec["params"]
        expected = _expected(photos[key][eye], row, cpu_run)
        torch.testing.assert_close(cpu[key][eye]["model"], expected, atol=2e-4, rtol=0, msg=f"{key} {eye}")
        decoded = Image.fromarray(rec["loader"].permute(1, 2, 0).numpy())
        err = (rec["model"] - _expected(decoded, row, device_run)).abs().mean().item()
        assert err < 0.015, (key, eye, err)
        # Exactly the erase box is zero in all three channels; nothing else is (black is -mean/std).
        assert torch.equal((rec["model"] == 0).all(0), _erase_box(row, 128)), (key, eye)


@pytest.mark.parametrize("leave_out", ["crop", "flip", "jitter", "erase"])
def test_each_augmentation_step_shows_in_the_training_inputs(shards, device_run, cpu_run, leave_out):
    """Without any one step the expectation misses the CPU run's inputs by far more than the 2e-4 above
    (the smallest miss: an erase box of 2% of the image)."""
    photos = _shard_images(shards)["train"]
    cpu = _recorded(cpu_run)
    misses = []
    for key, eye, rec in _training(shards, device_run):
        row = rec["params"]
        if leave_out == "flip" and row[4] < 0.5:
            continue  # nothing to leave out
        without = _expected(photos[key][eye], row, cpu_run, leave_out)
        misses.append((cpu[key][eye]["model"] - without).abs().mean().item())
    assert len(misses) >= 2
    assert min(misses) > 0.02, (leave_out, misses)


# -- model.init_logit_scale, train.betas and train.eps --------------------------------------------------


def test_first_step_starts_at_the_configured_logit_scale(device_run, cpu_run):
    for run, start in ((device_run, INIT_LOGIT_SCALE), (cpu_run, 2.6593)):  # tiny.yaml's
        first = torch.load(run / "record" / "scales.pt", weights_only=True)
        assert first == pytest.approx({"patient": start, "left": start, "right": start}, abs=1e-6), run
        # One AdamW step moves a scalar by at most about the lr.
        for weights in (run / "run" / "model", next((run / "run" / "checkpoints").glob("step_*"))):
            saved = load_file(str(weights / "model.safetensors"))
            for level in first:
                moved = abs(float(saved[f"logit_scale.{level}"]) - start)
                assert 0 < moved < 1.01 * LR, (weights, level, moved)


def test_optimiser_state_holds_the_configured_betas(device_run, cpu_run):
    """After AdamW's first step exp_avg = (1 - beta1) g and exp_avg_sq = (1 - beta2) g^2, so their ratio
    exp_avg_sq / exp_avg^2 = (1 - beta2) / (1 - beta1)^2 wherever g is not nearly 0, whatever g is."""
    for run, betas, eps in ((device_run, BETAS, EPS), (cpu_run, (0.9, 0.98), 1e-6)):  # the defaults
        ckpt = next((run / "run" / "checkpoints").glob("step_*"))
        state = torch.load(ckpt / "optimizer.bin", weights_only=True)
        for group in state["param_groups"]:
            assert tuple(group["betas"]) == pytest.approx(betas) and group["eps"] == pytest.approx(eps), run
        expected = (1 - betas[1]) / (1 - betas[0]) ** 2
        ratios = []
        for slot in state["state"].values():
            assert int(slot["step"]) == 1
            m, v = slot["exp_avg"].double(), slot["exp_avg_sq"].double()
            big = m.abs() > 1e-4
            ratios.append(v[big] / m[big] ** 2)
        ratios = torch.cat(ratios)
        assert len(ratios) > 1000
        torch.testing.assert_close(ratios, torch.full_like(ratios, expected), rtol=1e-3, atol=0)


def _slot_names(run: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The parameter name of each optimiser state slot (the trainer's group order) and the weights every
    run starts from (the trainer seeds with train.seed, then builds the model)."""
    cfg = from_dict(RunConfig, json.loads((run / "run" / "config.json").read_text()))
    set_seed(cfg.train.seed)
    model = RetClip(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, cfg.train.weight_decay, cfg.train.no_decay)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return [names[id(p)] for g in groups for p in g["params"]], initial


def test_first_step_size_follows_the_configured_eps(device_run, cpu_run):
    """AdamW's first step from the saved moments: w1 = w0 (1 - lr wd) - lr m^ / (sqrt(v^) + eps), with
    m^ = m / (1 - beta1), v^ = v / (1 - beta2). eps 1e-3 shrinks the step of every weight whose gradient
    is near 1e-3; at the default 1e-6 the same moments would predict steps of nearly the full lr."""
    for run, betas, eps in ((device_run, BETAS, EPS), (cpu_run, (0.9, 0.98), 1e-6)):
        ckpt = next((run / "run" / "checkpoints").glob("step_*"))
        state = torch.load(ckpt / "optimizer.bin", weights_only=True)
        order, initial = _slot_names(run)
        final = load_file(str(ckpt / "model.safetensors"))
        shrunk = 0
        for group in state["param_groups"]:
            assert group["lr"] == pytest.approx(LR)
            for index in group["params"]:
                slot, name = state["state"][index], order[index]
                m_hat = slot["exp_avg"].double() / (1 - betas[0])
                root_v_hat = (slot["exp_avg_sq"].double() / (1 - betas[1])).sqrt()
                w0 = initial[name].double() * (1 - LR * group["weight_decay"])
                for e, must_match in ((eps, True), (1e-6 if eps != 1e-6 else 1e-3, False)):
                    predicted = w0 - LR * m_hat / (root_v_hat + e)
                    miss = (final[name].double() - predicted).abs().max().item()
                    if must_match:
                        assert miss < 1e-6, (run.name, name, miss)
                    elif miss > 0.1 * LR:
                        shrunk += 1
        assert shrunk > 10, run.name  # the other eps predicts other steps for many tensors
