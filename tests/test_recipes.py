"""The two ViT-B/16 recipes: the paper's as we run it, and the release's own run (configs/)."""

from __future__ import annotations

import math

import pytest

from retclip_dist.config import ConfigError, load_config
from retclip_dist.model.config import RELEASE_LOGIT_SCALE_RANGE
from retclip_dist.train.config import RunConfig
from retclip_dist.train.preflight import check_run_config


def test_paper_recipe_builds_the_tower_clip_weights_were_trained_with():
    cfg = load_config(RunConfig, "configs/retclip_vitb16.yaml")
    assert cfg.model.vision_name == "vit_base_patch16_clip_quickgelu_224"
    assert cfg.loss.gather is True and cfg.loss.duplicates == "mask"
    assert (cfg.model.min_logit_scale, cfg.model.max_logit_scale) == (None, pytest.approx(math.log(100)))
    assert cfg.model.patient_scale_from_clip is False
    assert (cfg.train.precision, cfg.train.no_decay, cfg.data.hflip) == ("bf16", "1d", False)


def test_release_recipe_is_the_example_script():
    cfg = load_config(RunConfig, "configs/retclip_release.yaml")
    assert cfg.model.vision_name == "vit_base_patch16_clip_quickgelu_224"
    assert cfg.loss.gather is False  # --skip-aggregate
    assert cfg.loss.duplicates == "keep"  # its loss pushes same-report patients apart
    assert cfg.data.context_length == 100 and cfg.data.batch_size == 256 and cfg.data.hflip
    assert (cfg.model.min_logit_scale, cfg.model.max_logit_scale) == RELEASE_LOGIT_SCALE_RANGE
    assert cfg.model.patient_scale_from_clip and cfg.model.grad_checkpointing == "full"  # written true
    train = cfg.train
    assert (train.lr, train.weight_decay, train.warmup_steps, train.epochs) == (3e-5, 1e-3, 50, 10)
    assert (train.precision, train.no_decay, train.betas, train.eps) == ("fp16", "release", [0.9, 0.98], 1e-6)


def test_release_recipe_is_refused_without_the_clip_file_it_starts_from(tmp_path):
    """As shipped (vision_weights: null) the release's patient scale has no CLIP logit_scale to start from:
    the run is refused before training instead of starting from random towers at ln 90."""
    overrides = ["--model.tokenizer_path", "configs/tiny_vocab.txt", "--output_dir", str(tmp_path)]
    cfg = load_config(RunConfig, "configs/retclip_release.yaml", overrides)
    with pytest.raises(ConfigError) as err:
        check_run_config(cfg, 8)
    assert str(err.value).startswith(
        "model.patient_scale_from_clip: is true but model.vision_weights is not set: the patient scale starts "
        "from the CLIP file's logit_scale"
    )


def test_gather_is_a_command_line_switch():
    cfg = load_config(RunConfig, "configs/retclip_vitb16.yaml", ["--loss.gather", "false"])
    assert cfg.loss.gather is False
    assert load_config(RunConfig).loss.gather is True  # the default is the exact global batch


def test_duplicates_default_is_mask():
    assert load_config(RunConfig).loss.duplicates == "mask"
    assert load_config(RunConfig, None, ["--loss.duplicates", "keep"]).loss.duplicates == "keep"
