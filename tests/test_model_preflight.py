"""Model mistakes are found before any process group starts: one line naming the field, exit code 2.

Each mistake goes through ``retclip-train --check`` and through a real run's entry point (``main`` without
--check, which runs the same pre-flight check on every rank before training) in this process; the slow
test starts ``python -m retclip_dist.train`` on the issue's own case (a timm file whose keys carry an
``encoder.`` prefix) and on a fitting file, whose run records the tensors it loaded in metrics.jsonl.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS, build_synth_shards, fake_patients, trainer_cmd, trainer_env, write_shard_set
from release_reference import Visual
from safetensors.torch import save_file
from transformers import AutoConfig, BertForMaskedLM

from retclip_dist.config import load_config
from retclip_dist.exit_codes import EXIT_CONFIG
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.towers import build_vision_tower
from retclip_dist.model.weights import random_towers
from retclip_dist.train.cli import main
from retclip_dist.train.config import RunConfig
from retclip_dist.train.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parent.parent
# One step, no validation; tiny.yaml's log.every_steps (10), as these runs always had.
TINY = [
    *TINY_ARGS,
    "--data.val_split", "null",
    "--train.max_steps", "1",
    "--log.every_steps", "10",
]  # fmt: skip
# configs/tiny.yaml's vision tower: width 64, 2 blocks, patch 16 at 128 px; D = 32.
WIDTH, LAYERS, PATCH, RES, EMBED = 64, 2, 16, 128, 32


def _tiny_model_config():
    return load_config(RunConfig, TINY[1], TINY[2:]).model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Weight files for the tiny config, right and wrong, and a manifest-only shard set to check against."""
    root = tmp_path_factory.mktemp("model-preflight")
    write_shard_set(root / "shards", {"train": fake_patients(4, size=64)}, per_shard=4)
    torch.manual_seed(0)
    tower = build_vision_tower(_tiny_model_config()).state_dict()
    save_file(tower, str(root / "timm.safetensors"))
    # The reproduction: the same tensors under a wrapper's "encoder." prefix.
    save_file({f"encoder.{k}": v for k, v in tower.items()}, str(root / "encoder.safetensors"))
    save_file({**tower, "blocks.0.mlp.fc1.weight": torch.zeros(7, WIDTH)}, str(root / "shape.safetensors"))
    clip = {f"visual.{k}": v for k, v in Visual(WIDTH, LAYERS, PATCH, RES, EMBED).state_dict().items()}
    torch.save({**clip, "logit_scale": torch.tensor(4.6052)}, root / "clip.pt")
    torch.save(clip, root / "clip_no_scale.pt")
    # A saved model of another embed_dim, and a text tower file that lacks one tensor.
    cfg = _tiny_model_config()
    cfg.embed_dim = 16
    RetClip(cfg).save_pretrained(root / "other_model")
    fields = dict(cfg.text_config)
    mlm = BertForMaskedLM(AutoConfig.for_model(fields.pop("model_type"), **fields))
    mlm.save_pretrained(root / "bert")
    state = {k: v for k, v in mlm.state_dict().items() if "cls.predictions.decoder" not in k}
    state.pop("bert.encoder.layer.1.output.dense.weight")
    save_file(state, str(root / "bert" / "model.safetensors"), metadata={"format": "pt"})
    return {"root": root, **{p.stem: p for p in root.iterdir()}}


MISTAKES = [
    (
        "encoder-prefix",
        ["--model.vision_weights", "{encoder}"],
        "model.vision_weights: {encoder}: does not fit the vision tower: 30 of the tower's tensors are not in the "
        "file (blocks.0.attn.proj.bias, blocks.0.attn.proj.weight, blocks.0.attn.qkv.bias, "
        "blocks.0.attn.qkv.weight, ... (30 in all)); 30 tensors of the file have no place in the tower "
        "(encoder.blocks.0.attn.proj.bias, encoder.blocks.0.attn.proj.weight, encoder.blocks.0.attn.qkv.bias, "
        "encoder.blocks.0.attn.qkv.weight, ... (30 in all)); every key of the file starts with 'encoder.', a "
        "prefix the loader does not strip; name those that may stay out in model.vision_weights_ignore",
    ),
    (
        "quickgelu-weights-gelu-tower",
        ["--model.vision_weights", "{clip}"],
        "model.vision_name: {clip}: these CLIP weights were trained with quick_gelu but model.vision_name "
        "'vit_base_patch16_224' uses gelu (or set model.vision_weights_act if the weights used gelu)",
    ),
    (
        "shape",
        ["--model.vision_weights", "{shape}"],
        "model.vision_weights: {shape}: 1 tensor(s) do not fit the vision tower's shapes: "
        "blocks.0.mlp.fc1.weight: file (7, 64) vs tower (256, 64)",
    ),
    (
        "clip-file-without-logit-scale",
        [
            "--model.vision_weights", "{clip_no_scale}",
            "--model.vision_name", "vit_base_patch16_clip_quickgelu_224",
            "--model.patient_scale_from_clip", "true",
        ],
        "model.patient_scale_from_clip: {clip_no_scale}: has no 'logit_scale', which the patient scale would "
        "start from (set model.patient_scale_from_clip false to start it at init_logit_scale)",
    ),
    (
        "scale-from-clip-without-weights",
        ["--model.patient_scale_from_clip", "true"],
        "model.patient_scale_from_clip: is true but model.vision_weights is not set: the patient scale starts "
        "from the CLIP file's logit_scale (set model.vision_weights to it, or patient_scale_from_clip false)",
    ),
    (
        "min-above-max",
        ["--model.min_logit_scale", "5.0", "--model.max_logit_scale", "4.0"],
        "model.min_logit_scale=5.0: is above model.max_logit_scale=4.0",
    ),
    (
        "init-above-max",
        ["--model.max_logit_scale", "2.0"],
        "model.init_logit_scale=2.6593: is outside [model.min_logit_scale, model.max_logit_scale] = "
        "[None, 2.0], which the first step's clamp would move it into",
    ),
    (
        "selective-without-blocks",
        ["--model.text_config.model_type", "distilbert", "--model.grad_checkpointing", "selective"],
        "model.grad_checkpointing: selective: the text tower DistilBertModel has no 'blocks' or "
        "'encoder.layer' to choose from; use full or off",
    ),
    (
        "init-from-another-shape",
        ["--model.init_from", "{other_model}"],
        "model.init_from: {other_model}: 10 tensor(s) do not fit the configured model: image_left.weight saved "
        "(16, 16) vs model (32, 32), ",
    ),
    (
        "text-file-lacks-a-tensor",
        ["--model.text_path", "{bert}"],
        "model.text_path: {bert}/model.safetensors: does not fit the text tower: 1 of the tower's tensors are "
        "not in the file (encoder.layer.1.output.dense.weight); name those that may stay out in "
        "model.text_weights_ignore",
    ),
]  # fmt: skip


@pytest.mark.parametrize("mode", ["check", "run"])
@pytest.mark.parametrize(("overrides", "line"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_model_mistake_is_one_line_and_exit_2_before_training(files, tmp_path, capsys, mode, overrides, line):
    places = {k: str(v) for k, v in files.items()}
    out = tmp_path / "run"
    argv = [*TINY, "--data.shards", places["shards"], "--output_dir", str(out)]
    argv += [o.format(**places) for o in overrides]
    code = main([*argv, "--check"] if mode == "check" else argv)
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG, err
    assert err.count("\n") == 1, err
    assert err.startswith("retclip-train: " + line.format(**places)), err
    assert not out.exists() or list(out.iterdir()) == []  # nothing trained, nothing written


def test_the_mistakes_cases_still_fit_when_corrected(files, tmp_path, capsys):
    """The files above are wrong only where each case says: corrected, the check passes."""
    places = {k: str(v) for k, v in files.items()}
    base = [*TINY, "--data.shards", places["shards"], "--check"]
    fixed = [
        ["--model.vision_weights", places["timm"]],
        ["--model.vision_weights", places["encoder"], "--model.vision_weights_ignore", "['*']"],
        ["--model.vision_weights", places["clip"], "--model.vision_name", "vit_base_patch16_clip_quickgelu_224"],
        [
            "--model.vision_weights", places["clip"], "--model.vision_name", "vit_base_patch16_clip_224",
            "--model.vision_weights_act", "gelu",
        ],
        [
            "--model.vision_weights", places["clip"], "--model.vision_name", "vit_base_patch16_clip_quickgelu_224",
            "--model.patient_scale_from_clip", "true", "--model.max_logit_scale", "4.6052",
        ],
        ["--model.min_logit_scale", "0.0", "--model.max_logit_scale", "4.0"],
        ["--model.grad_checkpointing", "selective"],
        ["--model.text_path", places["bert"], "--model.text_weights_ignore", "[encoder.layer.1.output.*]"],
    ]  # fmt: skip
    for i, extra in enumerate(fixed):
        assert main([*base, "--output_dir", str(tmp_path / f"run{i}"), *extra]) == 0, capsys.readouterr().err


def _train(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(trainer_cmd(*argv), env=trainer_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_run_refuses_the_prefixed_file_and_records_what_a_fitting_one_loaded(files, tmp_path):
    shards = build_synth_shards(
        tmp_path / "data", 16, seed=2, raw_size=96, size=64, max_count=8, val_fraction=0
    )
    argv = [*TINY, "--data.shards", str(shards)]
    refused = _train(
        [*argv, "--output_dir", str(tmp_path / "bad"), "--model.vision_weights", str(files["encoder"])]
    )
    assert refused.returncode == EXIT_CONFIG, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"retclip-train: model.vision_weights: {files['encoder']}: does not fit the vision"
    ), last
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()

    done = _train(
        [*argv, "--output_dir", str(tmp_path / "good"), "--model.vision_weights", str(files["timm"])]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = read_metrics(tmp_path / "good" / "metrics.jsonl", "weights")
    tower = len(build_vision_tower(_tiny_model_config()).state_dict())
    # Every tower tensor; the shared projection (a plain tower file has none) left at its initialisation.
    assert record == {
        "kind": "weights",
        "step": 0,
        "vision_tensors": tower,
        "vision_left_out": 1,
        "vision_unused": 0,
        "text_tensors": 0,
    }
    assert f"vision tower <- {files['timm']}: {tower} tensors loaded" in done.stderr
    # The text tower had no file: said once, by the main process; the loaded vision tower is not named.
    assert done.stderr.count("model.text_path is not set: the text tower starts from random weights") == 1
    assert "the vision tower starts from random weights" not in done.stderr


@pytest.mark.parametrize(
    ("record", "init_from", "named"),
    [
        ({"vision_tensors": 0, "text_tensors": 0}, None, ["model.vision_weights", "model.text_path"]),
        ({"vision_tensors": 5, "text_tensors": 0}, None, ["model.text_path"]),
        ({"vision_tensors": 0, "text_tensors": 7}, None, ["model.vision_weights"]),
        ({"vision_tensors": 0, "text_tensors": 0}, "/runs/a/model", []),  # init_from fills both
    ],
)
def test_random_towers_names_each_tower_that_loaded_nothing(record, init_from, named):
    cfg = _tiny_model_config()
    cfg.init_from = init_from
    assert [field for field, _ in random_towers(cfg, record)] == named
