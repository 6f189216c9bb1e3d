"""End-to-end training runs of the tiny config on CPU: equivalence across ranks, resume, signals.

DeepSpeed ZeRO-2 and ZeRO-3 have their own file (test_train_deepspeed.py)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import (
    TINY_ARGS,
    accelerate_cmd,
    build_synth_shards,
    tiny_argv,
    tiny_model_config,
    trainer_cmd,
    trainer_env,
)
from safetensors.torch import load_file

from retclip_dist.config import from_dict
from retclip_dist.data.augment import DeviceAugment
from retclip_dist.data.samples import REPORT_HASH
from retclip_dist.data.validation import build_val_data
from retclip_dist.model.retclip import RetClip
from retclip_dist.model.tokenizer import build_tokenizer
from retclip_dist.model.vocab import write_vocab
from retclip_dist.train.config import RunConfig, TrainSection
from retclip_dist.train.loop import train_step
from retclip_dist.train.metrics_log import read_metrics
from retclip_dist.train.validate import recall_at_k

ROOT = Path(__file__).resolve().parent.parent
# conftest's TINY_ARGS over 2 epochs with validation, checkpoints every 2 steps.
BASE = [
    *TINY_ARGS,
    "--data.partitions", "2",
    "--train.epochs", "2",
    "--train.warmup_steps", "2",
    "--val.every_epochs", "1",
    "--checkpoint.every_steps", "2",
    "--checkpoint.keep_last", "2",
]  # fmt: skip


@pytest.mark.parametrize(("push", "low", "want"), [(-1.0, None, math.log(100)), (1.0, 0.0, 0.0)])
def test_a_step_that_pushes_the_logit_scales_past_the_clamp_leaves_them_at_its_bound(
    tmp_path, push, low, want
):
    """The trainer's step (train_step) clamps after the optimiser: a loss that drives every log-scale far
    past the bound (up past ln 100; down past the release's lower bound 0) leaves each exactly on it."""
    cfg = tiny_model_config(write_vocab(tmp_path / "vocab.txt", ["left", "eye", "disc"]))
    cfg.min_logit_scale = low
    torch.manual_seed(0)
    model = RetClip(cfg)
    tokenizer = build_tokenizer(cfg)
    batch = {
        "left": torch.randn(2, 3, 32, 32),
        "right": torch.randn(2, 3, 32, 32),
        **tokenizer(["left eye", "disc"], padding=True, return_tensors="pt", return_token_type_ids=False),
        REPORT_HASH: torch.tensor([1, 2]),
    }

    def loss_fn(out, report_hash):  # d loss / d log-scale = push * exp(log-scale): 10+ per step at lr 1
        total = push * torch.cat(list(out.logit_scale)).sum()
        return total, {"total": total}

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {k: v.item() for k, v in model.logit_scale.items()}
    train_step(model, optimizer, batch, lambda b: b, loss_fn, Accelerator(cpu=True), TrainSection(), 1.0)
    after = {k: v.item() for k, v in model.logit_scale.items()}
    assert all(
        abs(before[k] - push * math.exp(before[k]) - want) > 1 for k in before
    )  # far past it unclamped
    assert after == pytest.approx(dict.fromkeys(before, want), abs=1e-6)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    return build_synth_shards(root, 100, seed=3, raw_size=96, size=64, max_count=12, val_fraction=0.2)


def _command(shards: Path, out: Path, processes: int, extra: list[str], accelerate_config: str) -> list[str]:
    args = tiny_argv(BASE, shards, out, *extra)
    if processes == 1:
        return trainer_cmd(*args)
    return accelerate_cmd(*args, config=ROOT / accelerate_config, processes=processes)


def train(
    shards: Path,
    out: Path,
    *extra: str,
    processes: int = 1,
    accelerate_config: str = "configs/accelerate/cpu_2proc.yaml",
    expect: int = 0,
) -> subprocess.CompletedProcess:
    cmd = _command(shards, out, processes, list(extra), accelerate_config)
    done = subprocess.run(cmd, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def start(shards: Path, out: Path, *extra: str, processes: int = 1) -> subprocess.Popen:
    cmd = _command(shards, out, processes, list(extra), "configs/accelerate/cpu_2proc.yaml")
    # Its own process group, so a test can signal the trainer and its loader workers together, as
    # Slurm does on preemption.
    return subprocess.Popen(
        cmd,
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def losses(out: Path) -> list[float]:
    rows = read_metrics(out / "metrics.jsonl", "train")
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"])]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=name)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early ({proc.returncode}): {proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """One uninterrupted single-process run; other tests compare against it."""
    out = tmp_path_factory.mktemp("reference")
    train(shards, out, "--data.batch_size", "16")
    return out


def _recomputed_recall(out: Path) -> dict[str, float]:
    """Validation recall of a run's saved model, computed here from the val shards and the model alone."""
    cfg = from_dict(RunConfig, json.loads((out / "config.json").read_text()))
    model = RetClip.from_pretrained(out / "model").eval()
    prepare = DeviceAugment(model.image_input, "cpu")
    rows = []
    with torch.no_grad():
        for batch in build_val_data(cfg.data, build_tokenizer(cfg.model), 0, 1, model.image_input):
            out = model(prepare(batch))
            for i, key in enumerate(batch["keys"]):
                reports = (batch["reports"][i], batch["left_reports"][i], batch["right_reports"][i])
                rows.append((key, reports, [f[i] for f in out.image], [f[i] for f in out.text]))
    rows.sort(key=lambda r: r[0])
    scores = {}
    for level, name in enumerate(("patient", "left", "right")):
        found = recall_at_k(
            torch.stack([r[2][level] for r in rows]),
            torch.stack([r[3][level] for r in rows]),
            [r[1][level] for r in rows],
        )
        scores.update({f"{name}/{k}": v for k, v in found.items()})
    return scores


@pytest.mark.slow
def test_single_process_run_writes_everything(shards, reference):
    rows = read_metrics(reference / "metrics.jsonl", "train")
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(rows) + 1))
    assert len(rows) >= 6
    for key in ("loss_patient", "loss_left", "loss_right", "scale_patient", "lr", "patients_per_s"):
        assert all(key in r for r in rows), key
    assert all(r["skipped_samples"] == 0 for r in rows)
    val = read_metrics(reference / "metrics.jsonl", "val")
    assert len(val) == 2  # after each of the two epochs
    # The last validation ran on the final weights: recomputed from the saved model, it is the same.
    assert val[-1]["step"] == rows[-1]["step"]
    assert {k: val[-1][k] for k in _recomputed_recall(reference)} == _recomputed_recall(reference)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert val[-1]["samples"] == manifest["splits"]["val"]["samples"]
    # Each epoch accounts for every training patient: all used but the remainder of the global batch (16).
    patients = manifest["splits"]["train"]["samples"]
    epochs = read_metrics(reference / "metrics.jsonl", "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert [r["step"] for r in epochs] == [patients // 16, 2 * (patients // 16)]
    for r in epochs:
        assert r["patients_used"] == patients // 16 * 16
        assert r["patients_used"] + r["patients_unused"] == patients
        assert r["skipped_samples"] == 0
    assert read_metrics(reference / "metrics.jsonl", "end")[-1]["exit_code"] == 0
    kept = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert len(kept) == 2 and all(not name.endswith(".tmp") for name in kept)
    model = RetClip.from_pretrained(reference / "model")
    assert_same_weights(weights(reference), {k: v for k, v in model.state_dict().items()})


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_match_one_process(shards, reference, tmp_path):
    # With data.partitions=2, one process at batch 16 and two at batch 8 see the same global batches.
    done = train(shards, tmp_path, processes=2)
    epochs = read_metrics(tmp_path / "metrics.jsonl", "epoch")
    assert epochs == read_metrics(reference / "metrics.jsonl", "epoch")
    first = epochs[0]
    assert (
        f"epoch 0 done: {first['patients_used']} of {first['patients_used'] + first['patients_unused']} "
        f"patients used, {first['patients_unused']} unused"
    ) in done.stderr
    one, two = losses(reference), losses(tmp_path)
    assert len(one) == len(two)
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)
    # Float32 sums in another order differ in the last bits; Adam's normalisation magnifies that on
    # parameters whose gradients are near zero (attention biases here), to about 5e-5 after 7 steps.
    assert_same_weights(weights(reference), weights(tmp_path), atol=2e-4)


@pytest.mark.slow
def test_chunked_accumulation_matches_one_batch(shards, reference, tmp_path):
    train(shards, tmp_path, "--data.batch_size", "16", "--train.accum_steps", "4")
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path)), torch.tensor(losses(reference)), rtol=1e-5, atol=1e-5
    )
    assert_same_weights(weights(reference), weights(tmp_path), atol=2e-4)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(shards, reference, tmp_path):
    proc = start(shards, tmp_path, "--data.batch_size", "16")
    wait_for(lambda: (tmp_path / "checkpoints" / "step_00000004" / "train_state.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "model").exists()
    train(shards, tmp_path, "--data.batch_size", "16", "--checkpoint.resume", "auto")
    assert_same_weights(weights(reference), weights(tmp_path))


@pytest.mark.slow
def test_sigterm_saves_then_resume_is_bit_exact(shards, reference, tmp_path):
    workers = ("--data.num_workers", "1")  # the workers get the signal too and must outlive the save
    proc = start(shards, tmp_path, "--data.batch_size", "16", "--checkpoint.every_steps", "0", *workers)
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(read_metrics(metrics, "train")) >= 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, output[-3000:]
    saved = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step_")
    assert not (tmp_path / "model").exists()
    train(shards, tmp_path, "--data.batch_size", "16", "--checkpoint.resume", "auto", *workers)
    assert_same_weights(weights(reference), weights(tmp_path))


# (processes, workers) stopped, (processes, workers) resumed, and the batch message of the resume.
RESHAPES = [
    ((2, 0), (1, 0), "data.batch_size 8 -> 16, keeping the global batch of 16"),
    ((1, 0), (2, 0), "data.batch_size 16 -> 8, keeping the global batch of 16"),
    ((2, 2), (2, 1), ""),
]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize(("before", "after", "message"), RESHAPES, ids=["2-to-1", "1-to-2", "2x2-to-2x1"])
def test_sigterm_then_resume_on_another_shape_finishes_the_run(
    shards, reference, tmp_path, before, after, message
):
    # Stopped by SIGTERM mid-epoch; resumed with the config's per-rank batch (the saved one), which
    # follows the new world size; the rest of the epoch is re-planned (patient by patient: see
    # test_data_loader.py's test_resume_on_another_layout_uses_the_epochs_patients_once).
    (n, w), (n2, w2) = before, after
    batch = ["--data.batch_size", str(16 // n)]
    extra = [*batch, "--checkpoint.every_steps", "0", "--data.num_workers", str(w)]
    proc = start(shards, tmp_path, *extra, processes=n)
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(read_metrics(metrics, "train")) >= 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    # The ranks save and exit 3; under accelerate launch torchrun's agent, signalled too, reports failure.
    assert proc.returncode != 0 and "stop requested by signal; saved step" in output, output[-3000:]
    assert not (tmp_path / "model").exists()
    stopped = max(r["step"] for r in read_metrics(metrics, "train"))
    done = train(
        shards, tmp_path, *batch, "--data.num_workers", str(w2), "--checkpoint.resume", "auto", processes=n2
    )
    assert message in done.stderr
    assert f"epoch 0 continues on another data layout after step {stopped}" in done.stderr
    reference_steps = [r["step"] for r in read_metrics(reference / "metrics.jsonl", "train")]
    steps = [r["step"] for r in read_metrics(metrics, "train")]
    # Steps after the checkpoint once each, up to the same end as an uninterrupted run.
    assert steps == reference_steps == list(range(1, len(steps) + 1))
    # Every epoch accounts for the same patients as the uninterrupted run (the reshaped one included).
    assert read_metrics(metrics, "epoch") == read_metrics(reference / "metrics.jsonl", "epoch")
    assert (tmp_path / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_nonfinite_loss_stops_with_last_good_checkpoint(shards, tmp_path):
    done = train(shards, tmp_path, "--train.lr", "1e30", "--checkpoint.every_steps", "1", expect=4)
    assert "non-finite" in done.stderr or "loss became" in done.stderr
    kept = sorted((tmp_path / "checkpoints").iterdir())
    assert kept, "no checkpoint was kept"
    state = load_file(str(kept[-1] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_a_nonfinite_loss_between_agreements_ends_the_run_before_the_epochs_end_uses_it(shards, tmp_path):
    # No step of the first epoch logs, saves or checks: the epoch's end is the first agreement.
    quiet = (
        "--log.every_steps",
        "100",
        "--checkpoint.every_steps",
        "100",
        "--train.check_every_steps",
        "100",
    )
    done = train(shards, tmp_path, "--train.lr", "1e30", *quiet, expect=4)
    assert "loss became non-finite by step" in done.stderr
    rows = read_metrics(tmp_path / "metrics.jsonl")
    # Neither the epoch's record nor its validation saw the broken weights, and nothing was saved.
    assert [r["kind"] for r in rows] == ["weights"]
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.slow
def test_the_models_card_counts_the_data_and_names_nothing(shards, reference):
    """The card of a real run: the manifest's counts, its steps, the last validation record and its
    changes to its preset, and none of the shard set's patient ids, reports or image paths, nor a path of
    the run's."""
    text = (reference / "model" / "README.md").read_text()
    manifest = json.loads((shards / "manifest.json").read_text())
    for split, totals in manifest["splits"].items():
        assert f"| {split} | {totals['samples']:,} | {totals['shards']:,} |" in text
    steps = read_metrics(reference / "metrics.jsonl", "train")[-1]["step"]
    assert (
        f"{steps:,} optimiser steps, 2 epochs completed, {steps * 16:,} patients fed, on 1 process(es)"
        in text
    )
    last = read_metrics(reference / "metrics.jsonl", "val")[-1]
    assert f"after step {last['step']:,}" in text
    recall = [last[f"patient/i2t_r{k}"] for k in (1, 5, 10)]
    assert "| patient | {:.3f} | {:.3f} | {:.3f} |".format(*recall) in text
    train_ms = sum(
        r["step_ms"] + r["data_wait_ms"] for r in read_metrics(reference / "metrics.jsonl", "train")
    )
    assert f"included): {train_ms / 1e3:.1f} s." in text  # every step is logged here: one step per record
    assert "Settings that differ from the project preset `configs/tiny.yaml`:" in text
    assert "- `train.epochs`: 2" in text and "- `data.partitions`: 2" in text
    assert "values left out (paths and names): data.shards, model.tokenizer_path, output_dir." in text
    with (shards.parent / "raw" / "patients.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    private = [r[k] for r in rows for k in ("patient_id", "left_image", "right_image", "report")]
    private += [str(shards.parent), str(reference), str(ROOT), "pytest-of", socket.gethostname()]
    found = [value for value in private if value in text]
    assert not found, found


@pytest.mark.slow
def test_fresh_run_refuses_an_output_dir_with_checkpoints(shards, reference):
    done = train(shards, reference, "--data.batch_size", "16", expect=2)
    assert "already holds checkpoints" in done.stderr
    assert "--checkpoint.resume auto" in done.stderr


def test_bad_override_is_a_clear_error(tmp_path):
    done = subprocess.run(
        trainer_cmd("--config", str(ROOT / "configs/tiny.yaml"), "--train.lrr", "1"),
        capture_output=True,
        text=True,
        env=trainer_env(),
        timeout=120,
    )
    assert done.returncode == 2
    assert "unknown key(s) ['lrr']" in done.stderr


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_weights(shards, tmp_path):
    train(shards, tmp_path, "--train.compile", "true", "--train.max_steps", "2", "--val.every_epochs", "0")
    assert losses(tmp_path) and all(torch.isfinite(torch.tensor(losses(tmp_path))))
    # save_pretrained unwraps torch.compile: the final model has the plain parameter names.
    assert not [k for k in weights(tmp_path) if "_orig_mod" in k]
    RetClip.from_pretrained(tmp_path / "model")
