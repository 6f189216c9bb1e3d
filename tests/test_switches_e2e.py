"""Every config switch that changes the loss, the data or the records, through ``retclip-train`` on 2 gloo
ranks: each run below turns a group of switches away from the baseline run, and the tests compare the
numbers each switch must change (and those it must not) with the baseline's.

A group shares one run only where its switches show in numbers the others cannot move: the step-1 loss
(computed before any update, so only the loss, the data and the text inputs change it), the step-1
weights (AdamW's first step moves every weight by its group's lr times g / (|g| + eps), whatever the
loss, so lr multipliers, weight decay and locked parts read off exactly), the ``lr`` of each train record
and the records' counts.

Switches with an end-to-end test elsewhere: train.freeze [vision] (test_freeze.py, ZeRO-2),
train.accum_steps (test_train.py, one process), checkpoint.keep_best (test_train_probe.py),
data.shuffle_buffer / train.seed / data.partitions (test_resume_data.py, test_data_position.py), the
augmentation (data.augment_on, decode_size, crop_scale, crop_ratio, jitter, erase_prob, hflip),
model.init_logit_scale and train.betas / eps (test_augment_e2e.py, one process).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from conftest import build_synth_shards, train_two_ranks
from safetensors.torch import load_file

from retclip_dist.config import from_dict
from retclip_dist.model.retclip import RetClip
from retclip_dist.train.config import RunConfig
from retclip_dist.train.metrics_log import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.dist]

LR = 1e-2  # large enough that a step-1 update of a LayerNorm gain (1.0) is far above float32 resolution
BASE = [
    "--train.lr",
    str(LR),
    "--train.epochs",
    "2",
    "--val.every_epochs",
    "1",
]  # 2 steps per epoch (45 patients, global batch 16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("switch-data")
    return build_synth_shards(
        root, 60, seed=3, raw_size=96, size=64, max_count=8, val_fraction=0.25, eye_reports=True
    )


def _run(tmp_path_factory, shards: Path, name: str, *extra: str) -> Path:
    out = tmp_path_factory.mktemp(name)
    train_two_ranks(shards, out, *BASE, *extra)
    return out


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory) -> Path:
    """tiny.yaml's switches: gathered InfoNCE, duplicates masked, per-eye reports, cosine after 1 warmup
    step, validation after each epoch on the whole split."""
    return _run(tmp_path_factory, shards, "baseline")


@pytest.fixture(scope="module")
def optimiser_run(shards, tmp_path_factory) -> Path:
    """One step with per-part lr, layer decay, the release's decay rule, heads locked, local negatives."""
    return _run(
        tmp_path_factory, shards, "optimiser",
        "--train.max_steps", "1",
        "--train.weight_decay", "0.5",
        "--train.no_decay", "release",
        "--train.lr_scale", "{vision: 0.5, text: 0.25}",
        "--train.layer_decay", "0.5",
        "--train.freeze", "[heads]",
        "--loss.gather", "false",
        "--val.every_epochs", "0",
    )  # fmt: skip


@pytest.fixture(scope="module")
def sigmoid_run(shards, tmp_path_factory) -> Path:
    """SigLIP's loss, gradients clipped to nothing, a constant lr, 5 validation patients, 3 steps."""
    return _run(
        tmp_path_factory, shards, "sigmoid",
        "--model.loss", "sigmoid",
        "--train.grad_clip", "1e-9",
        "--train.schedule", "constant",
        "--train.max_steps", "3",
        "--val.max_samples", "5",
    )  # fmt: skip


@pytest.fixture(scope="module")
def duplicates_run(shards, tmp_path_factory) -> Path:
    """Duplicate reports kept as negatives, 3 warmup steps of 3, validation every second epoch."""
    return _run(
        tmp_path_factory, shards, "duplicates",
        "--loss.duplicates", "keep",
        "--train.warmup_steps", "3",
        "--train.max_steps", "3",
        "--val.every_epochs", "2",
    )  # fmt: skip


@pytest.fixture(scope="module")
def patient_reports_run(shards, tmp_path_factory) -> Path:
    """The patient report at the eye levels too, duplicates kept (as in duplicates_run, which this run is
    compared with: the mask would change the eye levels on its own); text padded to context_length; 2
    chunks per step."""
    return _run(
        tmp_path_factory, shards, "patient-reports",
        "--data.eye_reports", "false",
        "--loss.duplicates", "keep",
        "--data.text_padding", "max",
        "--train.accum_steps", "2",
        "--train.max_steps", "1",
        "--val.every_epochs", "0",
    )  # fmt: skip


def _train(out: Path) -> list[dict]:
    return sorted(read_metrics(out / "metrics.jsonl", "train"), key=lambda r: r["step"])


def _first(out: Path) -> dict:
    return _train(out)[0]


def _initial_weights(out: Path) -> dict[str, torch.Tensor]:
    """The weights every rank starts from: the trainer seeds with train.seed, then builds the model."""
    cfg = from_dict(RunConfig, json.loads((out / "config.json").read_text()))
    set_seed(cfg.train.seed)
    return {k: v.detach().clone() for k, v in RetClip(cfg.model).state_dict().items()}


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


LEVELS = ("patient", "left", "right")


# -- the loss ----------------------------------------------------------------------------------------


def test_local_negatives_lower_the_first_loss_at_every_level(baseline, optimiser_run):
    # At initialisation similarities are nearly uniform: InfoNCE is about ln(batch), ln 16 over the
    # gathered batch, ln 8 over one rank's own rows.
    base, local = _first(baseline), _first(optimiser_run)
    for level in LEVELS:
        assert base[f"loss_{level}"] == pytest.approx(math.log(16), abs=0.3), level
        assert local[f"loss_{level}"] == pytest.approx(math.log(8), abs=0.3), level
        assert base[f"loss_{level}"] - local[f"loss_{level}"] > 0.4, level


def test_sigmoid_loss_reaches_the_loss_and_the_model(baseline, sigmoid_run):
    # SigLIP at its bias of -10 and scale t ~ 14: log(1 + exp(10 - t cos)) per positive pair, nearly nothing
    # from the negatives, so 5 to 15 at initialisation, where InfoNCE is about ln 16 = 2.8.
    first = _first(sigmoid_run)
    for level in LEVELS:
        assert 5.0 < first[f"loss_{level}"] < 15.0, (level, first[f"loss_{level}"])
    # The saved model is a sigmoid model: it has the learnt biases the loss needs.
    assert RetClip.from_pretrained(sigmoid_run / "model").config.loss == "sigmoid"
    biases = {k for k in _final_weights(sigmoid_run) if k.startswith("logit_bias.")}
    assert biases == {f"logit_bias.{level}" for level in LEVELS}
    assert not any(k.startswith("logit_bias.") for k in _final_weights(baseline))


def test_kept_duplicates_raise_the_first_loss_where_reports_repeat(baseline, duplicates_run):
    # Masking a duplicate takes its term out of the softmax denominator: the masked loss is lower wherever
    # a batch holds two equal reports. Synthetic eye reports repeat within 16 patients (healthy eyes
    # share one), patient reports (two eyes' findings) rarely.
    base, kept = _first(baseline), _first(duplicates_run)
    for level in ("left", "right"):
        assert kept[f"loss_{level}"] > base[f"loss_{level}"] + 1e-3, level
    assert kept["loss_patient"] >= base["loss_patient"] - 1e-6


def test_patient_reports_at_the_eye_levels_change_only_the_eye_levels(duplicates_run, patient_reports_run):
    # Both keep duplicates; same images, same patient texts: the patient level is the same; the eye levels
    # read other texts. Padding to context_length and two chunks per step must not change any number.
    base, plain = _first(duplicates_run), _first(patient_reports_run)
    assert plain["loss_patient"] == pytest.approx(base["loss_patient"], abs=1e-5)
    for level in ("left", "right"):
        assert abs(plain[f"loss_{level}"] - base[f"loss_{level}"]) > 1e-2, level


# -- the optimiser ----------------------------------------------------------------------------------


def _part(name: str) -> str:
    if name.startswith(("visual.", "image_proj.")):
        return "vision"
    return "text" if name.startswith("text.") else "heads"


def _expected_multiplier(name: str) -> float:
    """Written out for tiny.yaml's towers (2 ViT blocks, 2 BERT layers), lr_scale v 0.5 t 0.25, decay 0.5."""
    if _part(name) == "vision":
        if re.match(r"visual\.(cls_token|pos_embed|patch_embed)", name):
            return 0.5 * 0.5**3
        for block in (0, 1):
            if name.startswith(f"visual.blocks.{block}."):
                return 0.5 * 0.5 ** (2 - block)
        return 0.5  # final norm and image_proj: the top, not decayed
    if name.startswith("text.embeddings."):
        return 0.25 * 0.5**3
    for layer in (0, 1):
        if name.startswith(f"text.encoder.layer.{layer}."):
            return 0.25 * 0.5 ** (2 - layer)
    raise AssertionError(f"{name}: not in the tiny BERT's layout")


def _expected_decay(name: str) -> float:
    """The release's rule: biases and scales exempt, and the vision LayerNorm gains (timm: norm*), but
    not BERT's (LayerNorm)."""
    if name.endswith(".bias") or "logit_" in name:
        return 0.0
    if re.fullmatch(r"visual\.(blocks\.\d+\.)?norm\d?\.weight", name):
        return 0.0
    return 0.5


def test_first_step_moves_each_weight_by_its_lr_and_decay(optimiser_run):
    """AdamW's first step: w1 = w0 (1 - lr_g wd_g) - lr_g g / (|g| + eps), so (w0 (1 - lr_g wd_g) - w1) / lr_g
    is below 1 everywhere, and close to 1 in each group (lr multiplier, decay) somewhere: where a gradient
    is far above eps. (Not in every tensor: attention key biases, which softmax cancels, get none.)"""
    before, after = _initial_weights(optimiser_run), _final_weights(optimiser_run)
    assert before.keys() == after.keys()
    assert _train(optimiser_run)[0]["lr"] == LR  # 1 warmup step: step 1 runs at the peak lr
    tops: dict[tuple[float, float], float] = {}  # (lr multiplier, decay) -> largest step / lr_g
    for name, w0 in before.items():
        w1 = after[name]
        if _part(name) == "heads":  # locked: not one bit moves, no decay either
            assert torch.equal(w1, w0), name
            continue
        group = _expected_multiplier(name), _expected_decay(name)
        lr_g, wd = LR * group[0], group[1]
        top = ((w0.double() * (1 - lr_g * wd) - w1.double()) / lr_g).abs().max().item()
        assert top < 1.002, (name, top, group)
        tops[group] = max(tops.get(group, 0.0), top)
    # Multipliers 0.5 x 0.5^(0..3) (vision), 0.25 x 0.5^(1..3) (text): 5 values, each with and without decay.
    assert len(tops) == 10
    for group, top in tops.items():
        assert top > 0.9, (group, top)
    # The two decay rules part at BERT's LayerNorm gains (1.0 at init): decayed here.
    assert _expected_decay("text.encoder.layer.0.output.LayerNorm.weight") == 0.5
    assert "text.encoder.layer.0.output.LayerNorm.weight" in before


def test_clipped_gradients_leave_the_weights_where_they_were(sigmoid_run):
    # Gradients clipped to a norm of 1e-9 are far below AdamW's eps (1e-6): 3 steps move no weight by more
    # than a hundredth of the lr (unclipped, the first step alone moves most tensors by the lr).
    before, after = _initial_weights(sigmoid_run), _final_weights(sigmoid_run)
    for name, w0 in before.items():
        moved = (after[name].double() - w0.double()).abs().max().item()
        assert moved < 0.01 * LR, (name, moved)


# -- the schedule and the records -------------------------------------------------------------------


def test_lr_records_follow_warmup_and_schedule(baseline, sigmoid_run, duplicates_run):
    # 4 steps in all; step s (from 1) runs at lr_at(s - 1).
    # 1 warmup step, then cosine from the peak over the 3 steps left: progress 0, 1/3, 2/3.
    cosine = [LR, LR, 0.5 * LR * (1 + math.cos(math.pi / 3)), 0.5 * LR * (1 + math.cos(2 * math.pi / 3))]
    assert [r["lr"] for r in _train(baseline)] == pytest.approx(cosine, abs=1e-12)
    assert [r["lr"] for r in _train(sigmoid_run)] == pytest.approx([LR] * 3, abs=1e-12)  # constant, 3 steps
    warm = [LR / 3, 2 * LR / 3, LR]  # 3 warmup steps
    assert [r["lr"] for r in _train(duplicates_run)] == pytest.approx(warm, abs=1e-12)


def test_validation_records_follow_every_epochs_and_max_samples(
    shards, baseline, sigmoid_run, duplicates_run
):
    val_patients = json.loads((shards / "manifest.json").read_text())["splits"]["val"]["samples"]
    assert val_patients > 5
    base = read_metrics(baseline / "metrics.jsonl", "val")
    assert [(r["step"], r["samples"]) for r in base] == [(2, val_patients), (4, val_patients)]
    # After epoch 1 (step 2), then the final validation after the third and last step.
    capped = read_metrics(sigmoid_run / "metrics.jsonl", "val")
    assert [(r["step"], r["samples"]) for r in capped] == [(2, 5), (3, 5)]
    # Not after epoch 1 (step 2): only the final validation after the last step (3).
    every_second = read_metrics(duplicates_run / "metrics.jsonl", "val")
    assert [(r["step"], r["samples"]) for r in every_second] == [(3, val_patients)]
    # The baseline's train records stop where max_steps does not cut them: 2 epochs of 2 steps.
    assert [r["step"] for r in _train(baseline)] == [1, 2, 3, 4]
    assert [r["step"] for r in _train(sigmoid_run)] == [1, 2, 3]
