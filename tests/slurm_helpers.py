"""Shared pieces of the launcher tests: the live-cluster check, bounded waits on Slurm jobs, and the one
uninterrupted reference run that every launcher path (sbatch, submitit, requeued or not) must reproduce
bit for bit."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from conftest import build_synth_shards, free_port
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CPU_2PROC = "configs/accelerate/cpu_2proc.yaml"
# 133 training patients, 2 processes x 8 per step: 8 steps per epoch (all but 5 patients used), 64 in all.
TOTAL_STEPS = 64
# Far enough in that the trainer has installed its signal handlers, early enough to leave most of the run.
SIGNAL_AFTER_STEP = 12
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}

T = TypeVar("T")
_memo: dict[str, object] = {}


# Node states that turn idle by themselves once the previous test's job has left the node.
_BUSY = {"alloc", "mix", "comp", "completing"}


def _node_states() -> list[str]:
    """sinfo's state of every node with the 2 CPUs each job here asks for (--cpus-per-task=2)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t %c"], capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        return []
    return [state for state, cpus in (line.split() for line in out.stdout.splitlines()) if int(cpus) >= 2]


def require_idle_slurm() -> None:
    """Skip (never fail) where no Slurm cluster is up: CI starts one with launch/local_slurm.sh.

    A node still busy with the previous test's job gets up to 60 s to become idle.
    """
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip(
            "no Slurm client here (sinfo/sbatch missing); start one with `launch/local_slurm.sh start`"
        )
    deadline = time.monotonic() + 60
    states = _node_states()
    while "idle" not in states and _BUSY & set(states) and time.monotonic() < deadline:
        time.sleep(1)
        states = _node_states()
    if "idle" not in states:
        pytest.skip(
            f"no idle Slurm node with 2 CPUs (states: {states}); see `sinfo`, `launch/local_slurm.sh`"
        )


# make test's two workers share the one local node: a Slurm test waits here for the other worker's to end,
# instead of finding the node busy and skipping.
_NODE_LOCK = Path(tempfile.gettempdir()) / "retclip-dist-slurm-tests.lock"
# The longest one Slurm test here holds the node (a requeued run: ~6 min on a quiet machine), with room.
NODE_WAIT_S = 1200


@contextlib.contextmanager
def slurm_node():
    """Hold the local cluster's node for one test (across pytest processes), once it is idle; fail naming
    the lock after NODE_WAIT_S rather than wait on a holder that never lets go."""
    with _NODE_LOCK.open("w") as lock:
        deadline = time.monotonic() + NODE_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"{_NODE_LOCK}: another Slurm test held the local node for over {NODE_WAIT_S} s"
                    )
                time.sleep(1)
        require_idle_slurm()
        yield


def job_env(**extra: str) -> dict[str, str]:
    """Environment for launchers: this venv first on PATH (for the job too) and one thread per process."""
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def shard_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 synthetic patients in 128 px shards (133 train, 27 val), built once per session."""
    if "shards" not in _memo:
        root = tmp_path_factory.mktemp("slurm_data")
        _memo["shards"] = build_synth_shards(
            root, 160, seed=0, raw_size=256, size=128, max_count=50, val_fraction=0.15, layout="zip"
        )
    return _memo["shards"]  # type: ignore[return-value]


def run_overrides(shards: Path, out_dir: Path) -> list[str]:
    """retclip-train overrides of configs/tiny.yaml shared by every run that is compared with another."""
    return [
        "--data.shards", str(shards),
        "--output_dir", str(out_dir),
        "--data.batch_size", "8",
        "--train.epochs", "8",
        # Only the signal and the end save: a resume must come from the signal's checkpoint.
        "--checkpoint.every_steps", "0",
        "--log.every_steps", "1",
        "--val.every_epochs", "1",
        "--log.progress", "false",
        "--log.trackers", "[]",
    ]  # fmt: skip


def reference_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted direct `accelerate launch` on 2 CPU processes (once per session)."""
    if "reference" not in _memo:
        out = tmp_path_factory.mktemp("reference_run")
        cmd = [
            str(VENV_BIN / "accelerate"), "launch", "--config_file", CPU_2PROC,
            "--main_process_port", str(free_port()),
            "-m", "retclip_dist.train", "--config", "configs/tiny.yaml",
            *run_overrides(shard_set(tmp_path_factory), out),
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        _memo["reference"] = load_weights(out)
    return _memo["reference"]  # type: ignore[return-value]


def load_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"{len(different)} of {len(want)} tensors differ, e.g. {different[:3]}"


def metrics(run_dir: Path) -> list[dict]:
    """Complete lines of metrics.jsonl (the trainer may be half-way through writing the last one)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line]


def latest_step(run_dir: Path) -> int:
    return max((r["step"] for r in metrics(run_dir) if r["kind"] == "train"), default=0)


def wait_for(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll ``check`` until it returns something other than None; fail naming ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value is not None:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20, check=True
    )
    return dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)


def wait_for_job(job_id: str, timeout_s: float, log: Path) -> dict[str, str]:
    """Wait for the job to finish (through any requeues); cancel it and fail with its log on timeout.

    A requeued job is held for about 2 minutes (BeginTime) before Slurm starts it again; the test does
    not need that grace period, so it moves the start time to now.
    """

    held_since: list[float] = []

    def finished() -> dict[str, str] | None:
        fields = job_fields(job_id)
        if fields["JobState"] == "PENDING" and fields["Reason"] == "BeginTime" and fields["Restarts"] != "0":
            # slurmd compares credential times in whole seconds: a requeued job started within the second
            # of its requeue is killed as "Job credential revoked". Slurm's own hold avoids that; ours
            # waits a few seconds.
            if not held_since:
                held_since.append(time.monotonic())
            if time.monotonic() - held_since[0] >= 3:
                subprocess.run(
                    ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=20, check=True
                )
        return fields if fields["JobState"] in FINISHED else None

    try:
        return wait_for(finished, timeout_s, f"Slurm job {job_id}")
    except AssertionError as exc:
        subprocess.run(["scancel", job_id], timeout=20)
        tail = log.read_text()[-4000:] if log.exists() else "(no log)"
        raise AssertionError(f"{exc}; log {log}:\n{tail}") from None


def cancel(job_id: str) -> None:
    """Leave nothing behind on the shared cluster when a test fails half-way."""
    if job_fields(job_id)["JobState"] not in FINISHED:
        subprocess.run(["scancel", job_id], timeout=20)
