"""train.freeze, train.lr_scale and train.layer_decay: locked parts stay put, each group gets its formula's lr."""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS, accelerate_cmd, build_synth_shards, tiny_argv, tiny_model_config, trainer_env
from safetensors.torch import load_file

from retclip_dist.config import ConfigError, load_config
from retclip_dist.loss import TripartiteLoss
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.vocab import write_vocab
from retclip_dist.train.config import RunConfig, TrainSection
from retclip_dist.train.optim import build_optimizer, freeze_, set_lr
from retclip_dist.train.preflight import check_run_config

ROOT = Path(__file__).resolve().parent.parent


def _model(tmp_path: Path) -> RetClip:
    torch.manual_seed(0)
    return RetClip(tiny_model_config(write_vocab(tmp_path / "v.txt", ["a", "b", "c"])))


def _batch(seed: int, rows: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "left": torch.randn(rows, 3, 32, 32, generator=g),
        "right": torch.randn(rows, 3, 32, 32, generator=g),
        "input_ids": torch.randint(0, 8, (rows, 6), generator=g),
        "attention_mask": torch.ones(rows, 6, dtype=torch.long),
    }


def _is_vision(name: str) -> bool:
    return name.startswith("visual.") or name.startswith("image_proj.")


@pytest.mark.parametrize("part", ["vision", "text"])
def test_frozen_part_is_bit_identical_and_has_no_optimizer_state(tmp_path, part):
    model = _model(tmp_path)
    locked = _is_vision if part == "vision" else (lambda n: n.startswith("text."))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    freeze_(model, [part])
    optimizer = build_optimizer(model, TrainSection(lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    loss_fn = TripartiteLoss()
    for step in range(3):
        total, _ = loss_fn(*model(_batch(step)))
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    names = {id(p): n for n, p in model.named_parameters()}
    in_groups = {names[id(p)] for g in optimizer.param_groups for p in g["params"]}
    with_state = {names[id(p)] for p in optimizer.state}
    for name, param in model.named_parameters():
        if locked(name):
            assert torch.equal(param.detach(), before[name]), name
            assert name not in in_groups and name not in with_state and param.grad is None, name
        else:
            assert name in with_state, name
    moved = [
        n for n, p in model.named_parameters() if not locked(n) and not torch.equal(p.detach(), before[n])
    ]
    assert "image_patient.weight" in moved and "text_left.2.weight" in moved
    assert any(n.startswith("text.") for n in moved) or part == "text"
    assert any(n.startswith("visual.") for n in moved) or part == "vision"


def _expected_multiplier(name: str) -> float:
    """Written out for the tiny model (2 ViT blocks, 2 BERT layers), scales v 0.5, t 0.25, heads 2, decay 0.5."""
    d = 0.5
    if _is_vision(name):
        if re.match(r"visual\.(cls_token|pos_embed|patch_embed)", name):
            return 0.5 * d**3
        if name.startswith("visual.blocks.0."):
            return 0.5 * d**2
        if name.startswith("visual.blocks.1."):
            return 0.5 * d
        assert name.startswith(("visual.norm.", "image_proj.")), name
        return 0.5
    if name.startswith("text."):
        if name.startswith("text.embeddings."):
            return 0.25 * d**3
        if name.startswith("text.encoder.layer.0."):
            return 0.25 * d**2
        if name.startswith("text.encoder.layer.1."):
            return 0.25 * d
        raise AssertionError(name)  # the tiny BERT has no pooler
    return 2.0


def test_each_group_lr_matches_the_formula(tmp_path):
    model = _model(tmp_path)
    cfg = TrainSection(lr=1e-3, weight_decay=0.1, lr_scale={"vision": 0.5, "text": 0.25, "heads": 2.0})
    optimizer = build_optimizer(model, replace(cfg, layer_decay=0.5), torch.device("cpu"))
    set_lr(optimizer, 3e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            assert group["lr"] == pytest.approx(3e-4 * _expected_multiplier(name), rel=1e-12), name
            decayed = p.ndim >= 2 and "logit_" not in name
            assert group["weight_decay"] == (0.1 if decayed else 0.0), name
    assert seen == set(names.values())
    # Without scales or decay: CLIP's two groups at the scheduled lr.
    plain = build_optimizer(model, TrainSection(lr=1e-3, weight_decay=0.1), torch.device("cpu"))
    set_lr(plain, 3e-4)
    assert [g["lr"] for g in plain.param_groups] == [3e-4, 3e-4]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--train.layer_decay", "0"], "train.layer_decay=0.0: must be in (0, 1]"),
        (["--train.layer_decay", "1.5"], "train.layer_decay=1.5: must be in (0, 1]"),
        (["--train.lr_scale", "{vison: 0.1}"], "train.lr_scale.vison=0.1: unknown part"),
        (["--train.lr_scale", "{text: 0}"], "train.lr_scale.text=0: must be a finite number above 0"),
        (
            ["--train.freeze", "[vision, text, heads]"],
            "train.freeze=['vision', 'text', 'heads']: locks every",
        ),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    cfg = load_config(RunConfig, None, override)
    with pytest.raises(ConfigError) as exc:
        check_run_config(cfg, 1)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value), str(exc.value)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("freeze-data")
    return build_synth_shards(root, 60, seed=4, raw_size=96, size=64, max_count=12, val_fraction=0.2)


@pytest.mark.slow
@pytest.mark.dist
def test_frozen_vision_under_zero2_trains_the_rest(shards, tmp_path):
    cfg = load_config(
        RunConfig,
        ROOT / "configs/tiny.yaml",
        ["--model.tokenizer_path", str(ROOT / "configs/tiny_vocab.txt")],
    )
    torch.manual_seed(11)
    start = RetClip(cfg.model).save_pretrained(tmp_path / "start")
    args = [
        *TINY_ARGS,
        "--model.init_from", str(start),
        "--train.freeze", "[vision]",
        "--train.max_steps", "3",
        "--data.val_split", "null",
        "--log.every_steps", "10",  # tiny.yaml's, as this run always had
    ]  # fmt: skip
    cmd = accelerate_cmd(
        *tiny_argv(args, shards, tmp_path / "run"), config=ROOT / "configs/accelerate/zero2.yaml"
    )
    env = trainer_env()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    before = load_file(str(start / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert after.keys() == before.keys()
    for name in before:
        if _is_vision(name):
            assert torch.equal(after[name], before[name]), name
    moved = {n for n in before if not _is_vision(n) and not torch.equal(after[n], before[n])}
    assert {
        "image_patient.weight",
        "text_patient.0.weight",
        "text.encoder.layer.0.output.dense.weight",
    } <= moved


def test_resume_with_other_param_groups_is_refused(tmp_path):
    from retclip_dist.train.preflight import _same_param_groups

    cfg = load_config(RunConfig, None, ["--train.layer_decay", "0.65"])
    _same_param_groups(cfg, tmp_path, {"layer_decay": 0.65})  # same settings (freeze, lr_scale defaults)
    with pytest.raises(ConfigError, match=r"saved with train\.layer_decay=1\.0, now 0\.65"):
        _same_param_groups(cfg, tmp_path, {})  # a checkpoint from before the key existed: the default
    with pytest.raises(ConfigError, match=r"train\.freeze=\['text'\], now \[\]"):
        _same_param_groups(cfg, tmp_path, {"freeze": ["text"], "layer_decay": 0.65})
