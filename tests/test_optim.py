import math

import pytest
import torch
from conftest import tiny_model_config

from retclip_dist.model.retclip import RetClip
from retclip_dist.model.vocab import write_vocab
from retclip_dist.train.config import TrainSection
from retclip_dist.train.optim import lr_at, param_groups


def test_no_decay_for_norms_biases_and_scales(tmp_path):
    model = RetClip(tiny_model_config(write_vocab(tmp_path / "v.txt", ["a", "b"])))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {"logit_scale.patient", "logit_scale.left", "logit_scale.right"} <= kept
    assert "image_patient.weight" in decayed and "text_left.0.weight" in decayed
    assert "text_left.0.bias" in kept and "visual.norm.weight" in kept
    assert not decayed & kept
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_warmup_then_cosine_to_zero():
    cfg = TrainSection(lr=1e-3, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 110, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 110, cfg) == pytest.approx(1e-3)
    assert lr_at(10, 110, cfg) == pytest.approx(1e-3)
    assert lr_at(60, 110, cfg) == pytest.approx(0.5e-3)
    assert lr_at(110, 110, cfg) == pytest.approx(0.0, abs=1e-12)
    constant = TrainSection(lr=1e-3, warmup_steps=0, schedule="constant")
    assert lr_at(50, 100, constant) == 1e-3
    assert math.isclose(lr_at(35, 110, cfg), 0.5e-3 * (1 + math.cos(math.pi * 0.25)))


def test_scales_are_one_element_tensors(tmp_path):
    # DeepSpeed cannot broadcast 0-d parameters; the scales must stay shape [1].
    model = RetClip(tiny_model_config(write_vocab(tmp_path / "v.txt", ["a"])))
    assert all(p.shape == torch.Size([1]) for p in model.logit_scale.values())
