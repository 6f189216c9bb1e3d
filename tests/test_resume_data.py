"""End to end, one CPU process: a resume continues the data where it stopped or refuses (one line, exit 2),
and the epoch record counts what was trained on, so a patient read twice shows.

One tiny run stopped at step 6 (epoch 1, step 2 of 4) is copied and resumed the ways users do it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import TINY_TRAIN_ARGS, build_synth_shards, tiny_argv, trainer_cmd, trainer_env

from retclip_dist.exit_codes import EXIT_CONFIG
from retclip_dist.train.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parent.parent
ARGS = [
    *TINY_TRAIN_ARGS,
    "--data.batch_size", "16",
    "--train.epochs", "3",
    "--train.warmup_steps", "2",
    "--val.every_epochs", "0",
]  # fmt: skip
# 77 training patients, global batch 16: 4 steps per epoch, 13 patients past the last whole batch.
USED, STEPS = 64, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume-data")
    return build_synth_shards(root, 100, seed=3, raw_size=96, size=64, max_count=12, val_fraction=0.2)


def _run(shards: Path, out: Path, *extra: str, code: str | None = None) -> subprocess.CompletedProcess:
    args = tiny_argv(ARGS, shards, out, *extra)
    cmd = trainer_cmd(*args) if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, env=trainer_env(), capture_output=True, text=True, timeout=600)


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def stopped(shards, tmp_path_factory) -> Path:
    """A run whose last checkpoint is step 6, inside epoch 1."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    _ok(_run(shards, out, "--train.max_steps", "6"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006"]
    return out


def _copy(stopped: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    return out


def _epochs(out: Path) -> dict[int, dict]:
    return {r["epoch"]: r for r in read_metrics(out / "metrics.jsonl", "epoch")}


@pytest.mark.slow
def test_a_resume_with_another_shuffle_buffer_uses_every_patient_of_the_epoch_once(shards, stopped, tmp_path):
    # The reproduction: stopped at step 6 with data.shuffle_buffer 200, resumed with 7. It used to
    # continue as if nothing had changed (no message, exit 0), re-reading some patients and skipping others.
    out = _copy(stopped, tmp_path)
    done = _ok(
        _run(
            shards, out, "--train.max_steps", "8", "--checkpoint.resume", "auto", "--data.shuffle_buffer", "7"
        )
    )
    assert "data position saved on another layout (data.shuffle_buffer: saved 200, now 7)" in done.stderr
    assert "epoch 1 continues on another data layout after step 2" in done.stderr
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")] == list(range(1, 9))
    # Counted from the rows trained on, before and after the resume: each patient once.
    record = _epochs(out)[1]
    assert (record["step"], record["patients_used"], record["patients_read_twice"]) == (8, USED, 0)
    assert record["patients_used"] + record["patients_unused"] == 77


@pytest.mark.slow
def test_a_resume_that_changes_the_data_order_is_one_line_and_exit_2(shards, stopped, tmp_path):
    out = _copy(stopped, tmp_path)
    path = out / "checkpoints" / "step_00000006"
    for extra in (["--check"], []):  # found by the config check, with --check or before training
        done = _run(shards, out, "--checkpoint.resume", "auto", "--train.seed", "1", *extra)
        assert done.returncode == EXIT_CONFIG, done.stderr[-3000:]
        assert done.stderr.strip().splitlines() == [
            f"retclip-train: checkpoint.resume: {path}: train.seed: saved 0, now 1; resume with the saved value, "
            "or pass --checkpoint.reset_data true to start epoch 1's data from its first patient (patients it "
            "already used are read again)"
        ]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006"]


@pytest.mark.slow
def test_a_checkpoint_without_its_data_position_resumes_only_with_reset_data(shards, stopped, tmp_path):
    out = _copy(stopped, tmp_path)
    path = out / "checkpoints" / "step_00000006"
    (path / "data_rank0.json").unlink()
    done = _run(shards, out, "--checkpoint.resume", "auto", "--train.max_steps", "10")
    assert done.returncode == EXIT_CONFIG
    assert f"{path} has no data position (data_rank0.json): pass --checkpoint.reset_data true" in done.stderr
    done = _ok(
        _run(
            shards,
            out,
            "--checkpoint.resume",
            "auto",
            "--train.max_steps",
            "10",
            "--checkpoint.reset_data",
            "true",
        )
    )
    assert (
        f"checkpoint.reset_data: the data position of {path} cannot be continued (no data_rank*.json); epoch 1 "
        "starts again from its first patient at step 6"
    ) in done.stderr
    # Epoch 1 ran whole from step 6: its 4 steps end at step 10, every patient once.
    record = _epochs(out)[1]
    assert (record["step"], record["patients_used"], record["patients_read_twice"]) == (10, USED, 0)


# The trainer with one stream that, after its first patient, serves that patient again instead of the next:
# the kind of off-by-one a wrong resume position makes.
_READS_ONE_PATIENT_TWICE = textwrap.dedent(
    """
    import sys
    from retclip_dist.data import loader
    from retclip_dist.train.cli import main

    real, done = loader.stream_samples, []

    def reads_one_twice(*args, **kwargs):
        stream = real(*args, **kwargs)
        if not done:
            done.append(True)
            first = next(stream)
            yield first
            position, _ = next(stream)
            yield position, first[1]
        yield from stream

    loader.stream_samples = reads_one_twice
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_a_loader_that_reads_a_patient_twice_is_caught_by_the_epoch_record(shards, tmp_path):
    # Caught = counted in the record and an error line in the log; the run itself goes on (see docs/training.md).
    done = _ok(_run(shards, tmp_path / "run", "--train.epochs", "1", code=_READS_ONE_PATIENT_TWICE))
    record = _epochs(tmp_path / "run")[0]
    assert (record["patients_read_twice"], record["patients_used"], record["patients_unused"]) == (
        1,
        USED - 1,
        14,
    )
    assert record["patients_reused"] == record["skipped_samples"] == 0
    errors = [line for line in done.stderr.splitlines() if "patients_read_twice" in line]
    assert len(errors) == 1 and "epoch 0: 1 rows repeated a patient already trained on" in errors[0], errors


@pytest.mark.slow
def test_the_first_step_after_a_resume_records_how_long_the_resume_took(stopped, shards, tmp_path):
    out = _copy(stopped, tmp_path)
    assert not any("resume_s" in r for r in read_metrics(out / "metrics.jsonl", "train"))  # a fresh start
    began = time.monotonic()
    _ok(_run(shards, out, "--checkpoint.resume", "auto", "--log.every_steps", "5"))
    took = time.monotonic() - began
    after = [r for r in read_metrics(out / "metrics.jsonl", "train") if r["step"] > 6]
    # Step 7 is written although log.every_steps says 10 and 12 (the last): it carries the resume's cost.
    assert [r["step"] for r in after] == [7, 10, 12]
    assert [("resume_s" in r) for r in after] == [True, False, False]
    assert 0 < after[0]["resume_s"] < took
