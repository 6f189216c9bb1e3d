"""The two ViT-B/16 recipes (configs/): what each must build, checked against what its weights need and
against the release's own model, not restated from the YAML."""

from __future__ import annotations

import pytest
import torch
from release_reference import CLAMP, ReleaseClip

from retclip_dist.config import ConfigError, load_config
from retclip_dist.model.convert_retclip import infer_config
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.towers import build_vision_tower, tower_activation, vision_input_size
from retclip_dist.train.config import RunConfig
from retclip_dist.train.preflight import check_run_config

RECIPES = ("configs/retclip_vitb16.yaml", "configs/retclip_release.yaml")


def _model_config(path: str, *overrides: str):
    return load_config(
        RunConfig, path, ["--model.tokenizer_path", "configs/tiny_vocab.txt", *overrides]
    ).model


@pytest.mark.parametrize("path", RECIPES)
def test_each_recipe_builds_the_vision_tower_openai_clip_weights_need(path):
    """Both recipes start from OpenAI's ViT-B/16 CLIP weights. A tower that loads them but computes
    something else (GELU for QuickGELU, another side than the position table's 14 x 14 patches) fits
    every tensor and trains silently worse: the tower as built must be CLIP's."""
    cfg = _model_config(path)
    with torch.device("meta"):
        tower = build_vision_tower(cfg)
    assert tower_activation(tower) == "quick_gelu"
    assert vision_input_size(cfg) == 224 and tuple(tower.patch_embed.patch_size) == (16, 16)
    assert tower.pos_embed.shape == (1, 1 + 14 * 14, 768)  # CLIP ViT-B/16's class token and patch grid
    assert tower.patch_embed.proj.bias is None  # CLIP's conv1 has none
    assert isinstance(tower.norm_pre, torch.nn.LayerNorm)  # CLIP's ln_pre


def test_release_recipe_builds_the_image_side_a_release_checkpoint_converts_to():
    """The release's own ViT-B/16 (its parameter names, at full size, on the meta device), read by the
    converter, gives the vision tower, image heads and clamp the release recipe builds: a converted
    release checkpoint and a run of the recipe are the same model."""
    with torch.device("meta"):
        release = ReleaseClip(vocab_size=21128, width=768, layers=12, patch=16, resolution=224, embed=512)
    inferred = infer_config(release.state_dict(), "configs/tiny_vocab.txt")
    # Built as a shape only: the recipe's patient scale comes from the CLIP file, left out here.
    recipe = _model_config("configs/retclip_release.yaml", "--model.patient_scale_from_clip", "false")
    inferred.text_config = recipe.text_config  # the reference's BERT is test-sized; text is not compared
    shapes = []
    for cfg in (recipe, inferred):
        with torch.device("meta"):
            model = RetClip(cfg)
        shapes.append(
            {k: v.shape for k, v in model.state_dict().items() if not k.startswith(("text", "bert"))}
        )
    assert shapes[0] == shapes[1] and any(k.startswith("visual.") for k in shapes[0])
    assert (
        (recipe.min_logit_scale, recipe.max_logit_scale)
        == CLAMP
        == (inferred.min_logit_scale, inferred.max_logit_scale)
    )


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
