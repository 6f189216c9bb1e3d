"""Bit-exact resume where the RNG matters: BERT dropout, chunked steps and device-path augmentation.

The resume tests in test_train.py use the tiny config, which has no dropout and augments on the CPU, so
nothing in a step draws from torch's RNG and a resumed run that threw away its restored random state
would still match. Here dropout is on, every step is split into two chunks (whose RNG is recorded and
replayed), and the batches carry uint8 images and parameters that ``DeviceAugment`` applies (CPU tensors
stand in for the device). A run of 4 steps (3 per epoch) is compared with one stopped after 2 and resumed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_synth_shards, trainer_cmd, trainer_env
from safetensors.torch import load_file

from retclip_dist.train.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume-rng")
    shards = build_synth_shards(root, 24, seed=1, raw_size=48, size=48, max_count=8, val_fraction=0.0)
    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    cfg["model"]["tokenizer_path"] = str(ROOT / "configs/tiny_vocab.txt")
    # Smaller towers for speed; dropout on, as in the paper recipe's BERT.
    cfg["model"]["vision_kwargs"] = {
        "img_size": 32,
        "patch_size": 16,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
    }
    cfg["model"]["text_config"].update(
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_hidden_layers=1
    )
    cfg["data"].update(
        shards=str(shards),
        batch_size=8,
        num_workers=0,
        augment_on="device",
        image_size=32,
        decode_size=48,
        jitter=0.2,
        erase_prob=0.5,
        context_length=24,
    )
    # A constant schedule, so that the stopped run's shorter max_steps leaves the learning rates alone.
    cfg["train"].update(accum_steps=2, schedule="constant", warmup_steps=1, lr=1e-3, epochs=2)
    cfg["checkpoint"].update(every_steps=2, keep_last=1)
    cfg["log"].update(every_steps=1, trackers=[], progress=False)
    cfg["val"].update(every_epochs=0)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, shards


def _train(config: Path, out: Path, *extra: str) -> None:
    cmd = trainer_cmd("--config", str(config), "--output_dir", str(out), *extra)
    done = subprocess.run(cmd, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.slow
def test_resume_is_bit_exact_with_dropout_chunks_and_device_augmentation(setup, tmp_path):
    config, _ = setup
    _train(config, tmp_path / "full", "--train.max_steps", "4")
    _train(config, tmp_path / "split", "--train.max_steps", "2")
    assert [p.name for p in (tmp_path / "split" / "checkpoints").iterdir()] == ["step_00000002"]
    _train(config, tmp_path / "split", "--train.max_steps", "4", "--checkpoint.resume", "auto")
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl", "train")]
    assert steps == [1, 2, 3, 4]  # the second run really continued from step 2
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
