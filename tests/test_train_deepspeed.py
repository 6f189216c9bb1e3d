"""DeepSpeed as docs/training.md offers it (configs/accelerate/zero2.yaml, zero3.yaml), on 2 gloo CPU processes.

A few steps of the tiny config, its towers widened to 192 so that their large matrices (ViT qkv and MLP,
BERT intermediate: over DeepSpeed's 1e5-element persistence threshold) are really sharded under ZeRO-3, as
nearly every weight of ViT-B/BERT-base is; the small ones stay whole on every rank, as they do there. The
shard set's validation split falls to the two ranks unequally (16 patients and 4: two batches against one). The logit scales are pinned (min = max = their
start) so the clamp works at every step: DDP then holds them exactly, and a ZeRO run must hold its float32
master copy, which its optimiser steps, there too. Under ZeRO-3 each rank holds a shard of every parameter,
so logging, clamping, validation, the probe, the finite check and saving all read partitioned parameters.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN_ARGS, accelerate_cmd, fake_patients, trainer_cmd, trainer_env, write_shard_set
from safetensors.torch import load_file

from retclip_dist.model.retclip import RetClip
from retclip_dist.synth import write_labelled_set
from retclip_dist.train.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parent.parent
SCALE = 2.6593  # configs/tiny.yaml's init_logit_scale
# _train sets the batch last, per run: 16 in one process, 8 on each of 2 ranks.
ARGS = [
    *TINY_TRAIN_ARGS,
    "--model.vision_kwargs", "{embed_dim: 192}",
    "--model.text_config", "{hidden_size: 192, intermediate_size: 768}",
    "--model.min_logit_scale", str(SCALE),
    "--model.max_logit_scale", str(SCALE),
    "--train.epochs", "2",
    "--train.schedule", "constant",
    "--val.every_epochs", "1",
    "--val.probe.label", "hard_exudates",
]  # fmt: skip
VAL_SAMPLES = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    """The shard set (32 training patients: 2 steps of 16 per epoch) and the probe's table, as arguments."""
    root = tmp_path_factory.mktemp("deepspeed-data")
    patients = fake_patients(32 + VAL_SAMPLES, size=64, seed=7, eye_reports_every=3)
    # Shards of 8, 4, 8: rank 0 validates val-000000 and val-000002 (16), rank 1 val-000001 (4).
    write_shard_set(root / "shards", {"train": patients[:32], "val": patients[32:]}, per_shard=[8, 4, 8])
    table = write_labelled_set(root / "probe", n_patients=40, seed=0, image_size=64)
    return [
        "--data.shards", str(root / "shards"),
        "--val.probe.table", str(table), "--val.probe.images", str(root / "probe" / "images"),
    ]  # fmt: skip


def _train(
    data: list[str], out: Path, *extra: str, zero: int | Path | None = None, ok: bool = True
) -> subprocess.CompletedProcess:
    """A run: one process, or 2 under ``zero`` (a stage's documented config, or an Accelerate config file)."""
    args = [*ARGS, *data, "--output_dir", str(out), *extra]
    if zero is None:  # one process with both partitions: the global batch of the two ZeRO ranks
        cmd = trainer_cmd(*args, "--data.batch_size", "16")
    else:
        config = zero if isinstance(zero, Path) else ROOT / f"configs/accelerate/zero{zero}.yaml"
        no_amp = ["--mixed_precision", "no"]
        cmd = accelerate_cmd(*args, "--data.batch_size", "8", config=config, launcher=no_amp)
    done = subprocess.run(cmd, env=trainer_env(), capture_output=True, text=True, timeout=900)
    assert (done.returncode == 0) == ok, (
        f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    )
    return done


def _losses(out: Path) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_metrics(out / "metrics.jsonl", "train")])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def _master_scales(checkpoint: Path) -> dict[str, float]:
    """The logit scales of DeepSpeed's float32 master weights, from the optimiser's shards on disk."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
    return {k: v.item() for k, v in state.items() if k.startswith("logit_scale.")}


@pytest.fixture(scope="module")
def ddp(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    _train(data, out)
    return out


@pytest.fixture(scope="module")
def zero3(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3") / "run"
    _train(data, out, zero=3)
    return out


@pytest.mark.slow
@pytest.mark.dist
def test_zero2_trains_as_ddp_and_holds_the_master_scales_at_the_cap(data, ddp, tmp_path):
    _train(data, tmp_path, zero=2)
    torch.testing.assert_close(_losses(tmp_path), _losses(ddp), rtol=1e-5, atol=1e-5)
    assert len(_losses(tmp_path)) == 4
    assert _master_scales(tmp_path / "checkpoints" / "step_00000004") == pytest.approx(
        {f"logit_scale.{level}": SCALE for level in ("patient", "left", "right")}, abs=1e-6
    )


@pytest.mark.slow
@pytest.mark.dist
def test_zero3_trains_validates_unequal_shares_probes_and_saves(ddp, zero3):
    torch.testing.assert_close(_losses(zero3), _losses(ddp), rtol=1e-5, atol=1e-5)
    # The logged scales are read from gathered shards; the master copy stays at the cap underneath.
    scales = [r["scale_patient"] for r in read_metrics(zero3 / "metrics.jsonl", "train")]
    assert scales == pytest.approx([torch.tensor(SCALE).exp().item()] * 4)
    assert _master_scales(zero3 / "checkpoints" / "step_00000004") == pytest.approx(
        {f"logit_scale.{level}": SCALE for level in ("patient", "left", "right")}, abs=1e-6
    )
    # Both validations scored the whole split though rank 1 ran out of batches first; the numbers are
    # those of the same model trained without sharding.
    val, val_ddp = (read_metrics(out / "metrics.jsonl", "val") for out in (zero3, ddp))
    assert [r["samples"] for r in val] == [VAL_SAMPLES, VAL_SAMPLES]
    for mine, theirs in zip(val, val_ddp, strict=True):
        assert mine["step"] == theirs["step"]
        assert {k: v for k, v in mine.items() if "/" in k} == pytest.approx(
            {k: v for k, v in theirs.items() if "/" in k}, abs=1e-6
        )
    # The probe embedded on every rank (a ZeRO-3 forward is a collective; rank 0 alone would wait forever
    # or read empty shards). Its AUROC is not compared: ZeRO-3's own linear layers round differently (about
    # 2e-6 on these features), which is enough to change the C picked on a 16-image validation split.
    probes = read_metrics(zero3 / "metrics.jsonl", "probe")
    assert [(r["step"], r["test_images"]) for r in probes] == [(2, 16), (4, 16)]
    assert all("error" not in r and 0 <= r["auroc"] <= 1 for r in probes)
    # The final model holds the full weights, gathered from the shards. BERT's attention key biases are left
    # out: their true gradient is 0 (softmax ignores a shift), so Adam turns rounding noise into lr-sized steps.
    full, ref = _weights(zero3), _weights(ddp)
    assert full.keys() == ref.keys()
    for name in (n for n in full if not n.endswith("attention.self.key.bias")):
        torch.testing.assert_close(full[name], ref[name], rtol=0, atol=1e-4, msg=name)
    RetClip.from_pretrained(zero3 / "model")
    assert read_metrics(zero3 / "metrics.jsonl", "end")[-1]["exit_code"] == 0


@pytest.mark.slow
@pytest.mark.dist
def test_zero3_stopped_mid_epoch_resumes_exactly(data, zero3, tmp_path):
    _train(data, tmp_path, "--train.max_steps", "3", zero=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]
    (tmp_path / "model").rename(tmp_path / "model-at-3")
    _train(data, tmp_path, "--train.max_steps", "4", "--checkpoint.resume", "auto", zero=3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", "train")] == [1, 2, 3, 4]
    resumed, full = _weights(tmp_path), _weights(zero3)
    assert resumed.keys() == full.keys()
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    epochs = read_metrics(tmp_path / "metrics.jsonl", "epoch")
    assert [(r["epoch"], r["patients_used"], r["patients_read_twice"]) for r in epochs] == [
        (0, 32, 0),
        (1, 32, 0),
    ]


@pytest.mark.slow
@pytest.mark.dist
def test_zero3_does_not_save_weights_that_became_non_finite(data, tmp_path):
    # AdamW's decay factor 1 - lr x weight_decay overflows float32: the first update makes the decayed master
    # weights infinite, while the first loss, computed before it, is finite. So only the check before the
    # save can see them, and it reads every rank's shard of the weights. Here no parameter stays whole on
    # any rank (persistence threshold 0): a check of the module's own tensors would see empty ones only.
    ds = tmp_path / "ds_zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    (tmp_path / "zero3.yaml").write_text(
        f"compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config: {{deepspeed_config_file: {ds}, zero3_init_flag: false}}\n"
        "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nuse_cpu: false\n"
    )
    extra = ["--train.lr", "3e37", "--train.weight_decay", "100", "--checkpoint.every_steps", "1"]
    done = _train(data, tmp_path / "run", *extra, zero=tmp_path / "zero3.yaml", ok=False)
    assert "weights became non-finite at step 1; not saving them" in done.stderr, done.stderr[-4000:]
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))
