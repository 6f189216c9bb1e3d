"""launch/pretrain.sh on a real Slurm cluster (the one-node CPU cluster of launch/local_slurm.sh).

Every test submits the tiny config on 2 CPU processes and compares the final weights, bit for bit, with
a direct `accelerate launch` of the same run: once straight through; signalled half-way the way Slurm
warns of a time limit (the requeue signal to the batch shell: USR2 by default, USR1 when
RETCLIP_REQUEUE_SIGNAL says so); once preempted (SIGTERM to every process, then a requeue). The
interrupted runs must be requeued and resume from the checkpoint saved on the signal.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from slurm_helpers import (
    CPU_2PROC,
    REPO,
    SIGNAL_AFTER_STEP,
    TOTAL_STEPS,
    assert_same_weights,
    cancel,
    job_env,
    latest_step,
    load_weights,
    metrics,
    reference_weights,
    run_overrides,
    shard_set,
    slurm_node,
    wait_for,
    wait_for_job,
)

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def submit(shards: Path, out_dir: Path, log: Path, **env_extra: str) -> str:
    """sbatch launch/pretrain.sh on the CPU cluster: no GPUs, 2 CPU processes from cpu_2proc.yaml."""
    cmd = [
        "sbatch", "--parsable", "--nodes=1", "--job-name=retclip-test",
        # The script asks for 8 GPUs and 16 cores per node; this node has no GPU and 2 cores.
        "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}",
        "launch/pretrain.sh", "configs/tiny.yaml", *run_overrides(shards, out_dir),
    ]  # fmt: skip
    env = job_env(GPUS_PER_NODE="2", ACCELERATE_CONFIG=CPU_2PROC, MAIN_PORT=str(free_port()), **env_extra)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


@pytest.fixture
def cluster() -> Iterator[None]:
    with slurm_node():
        yield


def test_sbatch_run_completes_and_matches_direct_run(cluster, tmp_path_factory, tmp_path):
    want = reference_weights(tmp_path_factory)
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(shard_set(tmp_path_factory), out, log)
    try:
        fields = wait_for_job(job, 240, log)
    finally:
        cancel(job)

    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "0")
    text = log.read_text()
    assert f"retclip: job {job} restart 0: 1 node(s) x 2 process(es)" in text
    assert "retclip: training exited with status 0" in text
    rows = metrics(out)
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, TOTAL_STEPS + 1))
    end = rows[-1]
    assert (end["kind"], end["step"], end["exit_code"], end["skipped_samples"]) == ("end", TOTAL_STEPS, 0, 0)
    assert [r["epoch"] for r in rows if r["kind"] == "val"] == list(range(1, 9))
    assert sorted(p.name for p in (out / "model").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer",
    ]
    assert_same_weights(load_weights(out), want)


def run_interrupted(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, interrupt: list[str], **env_extra: str
) -> Path:
    """Submit, run ``interrupt`` once training is past SIGNAL_AFTER_STEP, and wait through the requeue.

    Asserts what any requeued run must show; returns the run directory for the test's own checks.
    """
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(shard_set(tmp_path_factory), out, log, **env_extra)
    try:
        wait_for(lambda: latest_step(out) >= SIGNAL_AFTER_STEP or None, 300, f"step {SIGNAL_AFTER_STEP}")
        subprocess.run([*interrupt, job], timeout=20, check=True)
        fields = wait_for_job(job, 300, log)
    finally:
        cancel(job)

    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1")
    assert f"retclip: job {job} restart 1: 1 node(s) x 2 process(es)" in log.read_text()
    return out


def assert_resumed_from_the_stop(out: Path, log: Path, want: dict) -> None:
    rows = metrics(out)
    ends = [r for r in rows if r["kind"] == "end"]
    assert [r["exit_code"] for r in ends] == [3, 0]
    stopped = ends[0]["step"]
    assert SIGNAL_AFTER_STEP <= stopped < TOTAL_STEPS
    # The second attempt picks up right after the signal's checkpoint, not from step 1.
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, TOTAL_STEPS + 1))
    resumed = [r for r in rows[rows.index(ends[0]) + 1 :] if r["kind"] == "train"]
    assert resumed[0]["step"] == stopped + 1
    # A stop on an epoch's last step leaves that epoch's record to the resumed run: once, not twice.
    epochs = [r["epoch"] for r in rows if r["kind"] == "epoch"]
    assert epochs == sorted(set(epochs)), epochs
    assert re.search(r"resuming at step (\d+)", log.read_text()).group(1) == str(stopped)
    assert_same_weights(load_weights(out), want)


@pytest.mark.parametrize("configured", [None, "USR1"], ids=["default-usr2", "usr1"])
def test_time_limit_signal_requeues_and_resumes_bit_exactly(cluster, tmp_path_factory, tmp_path, configured):
    want = reference_weights(tmp_path_factory)
    sig = configured or "USR2"
    env = {"RETCLIP_REQUEUE_SIGNAL": configured} if configured else {}
    # What `#SBATCH --signal=B:USR2@120` (or `sbatch --signal=B:USR1@120` with RETCLIP_REQUEUE_SIGNAL=USR1)
    # does ahead of the time limit: signal the batch shell only.
    out = run_interrupted(tmp_path_factory, tmp_path, ["scancel", f"--signal={sig}", "--batch"], **env)
    text = (tmp_path / "job.out").read_text()
    assert f"requeue signal {sig}" in text
    assert f"retclip: {sig} received, asking the training processes to save and stop ({sig})" in text
    assert "retclip: requeueing job" in text
    assert_resumed_from_the_stop(out, tmp_path / "job.out", want)


def test_preemption_sigterm_requeues_and_resumes_bit_exactly(cluster, tmp_path_factory, tmp_path):
    want = reference_weights(tmp_path_factory)
    # What preemption with PreemptMode=REQUEUE does: SIGTERM to every process of the job, then requeue.
    out = run_interrupted(tmp_path_factory, tmp_path, ["scontrol", "requeue"])
    assert_resumed_from_the_stop(out, tmp_path / "job.out", want)
