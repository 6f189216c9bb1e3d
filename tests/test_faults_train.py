"""Training faults: bad configs are one line and exit 2, worker errors end the run, one run per output_dir,
a rank stuck in a read ends the job with its stacks (exit 5) and the requeued run finishes exactly.

Unit tests call ``check_run_config`` and the run lock directly; the end-to-end ones start real processes
(``accelerate launch`` on 2 CPU processes, the sbatch script without Slurm) with timeouts, so a hang
fails the test instead of stalling the suite.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    CPU_2PROC,
    TINY_TRAIN_ARGS,
    accelerate_cmd,
    build_synth_shards,
    child_pids,
    free_port,
    model_image,
    tiny_argv,
    trainer_cmd,
    trainer_env,
)
from safetensors.torch import load_file

from retclip_dist.config import ConfigError, load_config
from retclip_dist.data.config import DataConfig
from retclip_dist.data.loader import LoaderError, build_train_data, data_loader, guarded
from retclip_dist.data.plan import plan_epoch
from retclip_dist.exit_codes import EXIT_CONFIG, EXIT_FAILED, EXIT_PEER_LOST, EXIT_STALLED, EXIT_STOPPED
from retclip_dist.launch.requeue import decide
from retclip_dist.model.tokenizer import build_tokenizer
from retclip_dist.runtime.health import read_records
from retclip_dist.shardset import read_manifest
from retclip_dist.train import runlock
from retclip_dist.train.config import RunConfig
from retclip_dist.train.metrics_log import read_metrics
from retclip_dist.train.preflight import check_run_config
from retclip_dist.train.runlock import RunLock, RunLocked

ROOT = Path(__file__).resolve().parent.parent
TINY = [*TINY_TRAIN_ARGS, "--train.epochs", "1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault-data")
    return build_synth_shards(root, 100, seed=3, raw_size=96, size=64, max_count=12, val_fraction=0.2)


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return tiny_argv(TINY, shards, out, *extra)


def _run(cmd: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=trainer_env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def _training(cmd: list[str], out: Path, **kwargs) -> tuple[subprocess.Popen, float]:
    """Start ``cmd``, a run into ``out``, and wait until it has logged a training step; returns the process
    and the deadline (240 s from the start) that a caller's further waits share."""
    proc = subprocess.Popen(cmd, env=trainer_env(), **kwargs)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and read_metrics(metrics, "train")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.2)
    return proc, deadline


def _cfg(shards: Path, out: Path, *extra: str) -> RunConfig:
    args = _args(shards, out, *extra)
    return load_config(RunConfig, args[1], args[2:])


# --- check_run_config(): every bad field is one line naming it -------------------------------------------------


def _bad_manifest(d: Path, text: str) -> Path:
    d.mkdir()
    (d / "manifest.json").write_text(text)
    return d


BAD = [
    (["--data.batch_size=-4"], 1, "data.batch_size=-4: must be at least 1"),
    (["--data.batch_size", "0"], 1, "data.batch_size=0: must be at least 1"),
    (["--train.epochs=-1"], 1, "train.epochs=-1: must be at least 1"),
    (["--train.epochs", "0"], 1, "train.epochs=0: must be at least 1 (0 would save an untrained model)"),
    (["--train.lr=-1e-4"], 1, "train.lr=-0.0001: must be a finite number above 0"),
    (["--data.num_workers=-1"], 1, "data.num_workers=-1: must be 0 or more"),
    (["--train.max_steps", "0"], 1, "train.max_steps=0: must be at least 1"),
    (["--data.partitions", "3"], 2, "data.partitions=3: must be a multiple of the world size 2"),
    (
        ["--data.partitions", "4", "--data.batch_size", "3"],
        2,
        "data.batch_size=3: must split evenly over the 2 partitions of each rank",
    ),
    (["--train.accum_steps", "3"], 1, "train.accum_steps=3: must divide data.batch_size=8"),
    (["--data.shards", "{tmp}/nowhere"], 1, "data.shards: cannot read shard manifest {tmp}/nowhere/manifest.json"),
    (["--data.shards", "{tmp}"], 1, "data.shards: cannot read shard manifest {tmp}/manifest.json"),
    (["--data.shards", "{notjson}"], 1, "data.shards: cannot read shard manifest {notjson}/manifest.json"),
    (["--data.shards", "{notours}"], 1, "not a retclip-shards/1 manifest"),
    (["--data.train_split", "training"], 1, "data.train_split='training': "),
    (["--output_dir", "{file}/run"], 1, "output_dir='{file}/run': not writable (Not a directory)"),
    (["--checkpoint.resume", "{tmp}/step_00000009"], 1, "checkpoint.resume='{tmp}/step_00000009': "),
    (["--model.tokenizer_path", "{tmp}/vocab.txt"], 1, "model.tokenizer_path: tokenizer source {tmp}/vocab.txt"),
    (["--model.vision_weights", "{tmp}/vit.safetensors"], 1, "model.vision_weights='{tmp}/vit.safetensors': no such file"),
    (["--model.text_path", "{tmp}"], 1, "model.text_path='{tmp}': not a Hugging Face model directory"),
    (["--data.image_size", "224"], 1, "data.image_size=224: the vision tower 'vit_base_patch16_224' takes 128 px"),
    (["--data.context_length", "100"], 1, "data.context_length=100: is above the text tower's 64 positions"),
    (["--model.image_std", "[0.2, 0.0, 0.2]"], 1, "model.image_std=[0.2, 0.0, 0.2]: must be above 0 in every channel"),
    (["--model.image_mean", "[0.5, 0.5]"], 1, "model.image_mean=[0.5, 0.5]: must be three finite numbers (R, G, B)"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "world_size", "message"), BAD, ids=[" ".join(c[0]) for c in BAD])
def test_preflight_names_the_field_and_the_reason(shards, tmp_path, overrides, world_size, message):
    places = {
        "tmp": str(tmp_path),
        "notjson": str(_bad_manifest(tmp_path / "notjson", "{not json")),
        "notours": str(_bad_manifest(tmp_path / "notours", '{"format": "other"}')),
        "file": str(tmp_path / "a-file"),
    }
    (tmp_path / "a-file").write_text("")
    overrides = [o.format(**places) for o in overrides]
    with pytest.raises(ConfigError) as info:
        check_run_config(_cfg(shards, tmp_path / "run", *overrides), world_size)
    text = str(info.value)
    assert message.format(**places) in text
    assert "\n" not in text


def test_data_image_size_follows_the_model_and_a_different_one_is_refused(shards, tmp_path):
    cfg = _cfg(shards, tmp_path / "run")
    assert cfg.data.image_size is None  # configs/tiny.yaml states the side once: model.vision_kwargs.img_size
    check_run_config(cfg, 1)
    image = model_image(cfg.model)
    loader = build_train_data(cfg.data, build_tokenizer(cfg.model), 0, 1, cfg.train.seed, image)
    assert image.size == cfg.model.vision_kwargs["img_size"] == 128
    assert loader.cfg.image_size == 128
    assert loader.state_dict()["layout"]["image_size"] == 128  # what a resume compares
    with pytest.raises(ValueError, match=r"data\.image_size=64: the model takes 128 px"):
        build_train_data(
            dataclasses.replace(cfg.data, image_size=64), build_tokenizer(cfg.model), 0, 1, 0, image
        )


def test_preflight_accepts_the_tiny_config(shards, tmp_path):
    check_run_config(_cfg(shards, tmp_path / "run"), 2, check_lock=True)
    assert (tmp_path / "run").is_dir() and not list((tmp_path / "run").iterdir())


def _fake_checkpoint(out: Path, world_size: int, shards: Path | None = None, **data: object) -> Path:
    path = out / "checkpoints" / "step_00000004"
    path.mkdir(parents=True)
    state = {"step": 4, "epoch": 0, "world_size": world_size, "config": {"data": data}}
    (path / "train_state.json").write_text(json.dumps(state))
    if shards is not None:  # every rank's data position, as a run of that layout saves it
        cfg = _cfg(shards, out)
        layout = dataclasses.replace(cfg.data, **data)
        for rank in range(world_size):
            tokenizer, image = build_tokenizer(cfg.model), model_image(cfg.model)
            loader = build_train_data(layout, tokenizer, rank, world_size, cfg.train.seed, image)
            (path / f"data_rank{rank}.json").write_text(json.dumps(loader.state_dict()))
    return path


def test_preflight_resumes_on_another_shape_with_the_same_global_batch(shards, tmp_path):
    out = tmp_path / "run"
    path = _fake_checkpoint(out, 2, shards, batch_size=8, partitions=2, num_workers=0)
    check_run_config(_cfg(shards, out, "--checkpoint.resume", "auto"), 2)  # the same layout resumes
    # Other workers and partitions on the same world size: the loader re-plans the epoch's rest.
    check_run_config(_cfg(shards, out, "--checkpoint.resume", "auto", "--data.num_workers", "2"), 2)
    # 1 process: the config's per-rank batch (the saved one) becomes the global batch, with a warning.
    cfg = _cfg(shards, out, "--checkpoint.resume", "auto", "--data.num_workers", "2")
    check_run_config(cfg, 1)
    assert (cfg.data.batch_size, cfg.data.partitions) == (16, 2)
    cfg = _cfg(shards, out, "--checkpoint.resume", "auto", "--data.batch_size", "4", "--data.partitions", "2")
    check_run_config(cfg, 4)  # 4 processes do not divide the explicit 2 partitions: one per process
    assert (cfg.data.batch_size, cfg.data.partitions) == (4, None)
    with pytest.raises(ConfigError) as info:
        check_run_config(_cfg(shards, out, "--checkpoint.resume", str(path)), 3)
    assert str(info.value) == (
        f"checkpoint.resume: {path} was saved with a global batch of 16 patients (8 x 2 processes), which 3 "
        "processes cannot share equally; resume on 1, 2, 4, 8, 16 processes"
    )
    with pytest.raises(ConfigError) as info:
        check_run_config(_cfg(shards, out, "--checkpoint.resume", "auto", "--data.batch_size", "4"), 2)
    assert str(info.value) == (
        f"data.batch_size=4: {path} was saved with a global batch of 16 patients; a resume on 2 processes "
        "keeps it with data.batch_size=8 (or start a new --output_dir)"
    )


def test_preflight_refuses_a_fresh_run_over_checkpoints(shards, tmp_path):
    out = tmp_path / "run"
    _fake_checkpoint(out, 1, batch_size=8, partitions=2, num_workers=0)
    with pytest.raises(
        ConfigError, match=r"already holds checkpoints .newest step_00000004.: pass --checkpoint"
    ):
        check_run_config(_cfg(shards, out), 1)


# --- loader workers: an error ends them, at once --------------------------------------------------------

_WORKER_ERROR = textwrap.dedent(
    """
    import multiprocessing, sys, torch
    from retclip_dist.data.config import DataConfig
    from retclip_dist.data.loader import LoaderError, build_train_data, data_loader, guarded

    class Broken(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield 1
            raise ValueError("every shard is empty")

    if __name__ == "__main__":  # workers import this script to find Broken
        try:
            list(guarded(data_loader(Broken(), DataConfig(num_workers=2, pin_memory=False)), "training data"))
        except LoaderError as exc:
            print(exc, len(multiprocessing.active_children()))
            sys.exit(1)
    """
)


@pytest.mark.slow  # the subprocess imports torch and starts its loader's fork server
def test_a_worker_error_is_one_line_and_the_process_exits(tmp_path):
    # Before: the workers ignore SIGTERM, so multiprocessing's exit handler waited for them forever.
    script = tmp_path / "worker_error.py"
    script.write_text(_WORKER_ERROR)
    # 8 s of CPU; the bound is for a hang (before the fix: forever), with room for a loaded 2-core machine.
    done = _run([sys.executable, str(script)], timeout=240)
    assert done.returncode == 1, done.stderr
    assert done.stdout == "training data: ValueError: every shard is empty 0\n"
    assert "Traceback" not in done.stderr


def test_an_error_in_process_is_one_line_too():
    class Broken(torch.utils.data.IterableDataset):
        def __iter__(self):
            raise ValueError("no usable sample")
            yield

    with pytest.raises(LoaderError, match=r"^validation data: ValueError: no usable sample$"):
        list(guarded(data_loader(Broken(), DataConfig(num_workers=0)), "validation data"))


# --- run lock ---------------------------------------------------------------------------------------------

_HOLD = textwrap.dedent(
    """
    import sys, time
    from retclip_dist.train.runlock import RunLock
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def _holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(directory)], env=trainer_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "held\n"
    return proc


@pytest.mark.slow
def test_second_run_is_refused_and_a_dead_holders_lock_is_taken_over(shards, tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        with pytest.raises(
            RunLocked, match=f"is in use by another run .pid {holder.pid} on {socket.gethostname()}"
        ):
            RunLock(out).acquire()
        done = _run(trainer_cmd("--check", *_args(shards, out)), timeout=120)
        assert done.returncode == EXIT_CONFIG
        assert done.stderr.count(f"is in use by another run (pid {holder.pid} on") == 1
        assert len(done.stderr.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    # Its pid is gone (SIGKILL: no chance to remove the file); the lock is stale and taken over.
    assert json.loads((out / runlock.LOCK_NAME).read_text())["pid"] == holder.pid
    lock = RunLock(out).acquire()
    assert json.loads((out / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / runlock.LOCK_NAME).exists()


def _write_lock(out: Path, **fields: object) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": "then", **fields}
    path = out / runlock.LOCK_NAME
    path.write_text(json.dumps(record))
    return path


def test_lock_from_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    path = _write_lock(tmp_path, host="node-17", pid=4242)
    with pytest.raises(RunLocked, match="pid 4242 on node-17"):
        RunLock(tmp_path).acquire()
    old = time.time() - runlock.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    RunLock(tmp_path).acquire().release()


def test_lock_holder_pid_reused_by_another_process_is_stale(tmp_path):
    # pid 1 is alive, but it is not the process that took the lock.
    _write_lock(tmp_path, pid=1, proc_start="0")
    RunLock(tmp_path).acquire().release()


def test_lock_from_an_earlier_run_of_the_same_slurm_job_is_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _write_lock(tmp_path, host="node-17", pid=4242, slurm_job="77.0")
    RunLock(tmp_path).acquire().release()
    _write_lock(tmp_path, host="node-17", pid=4242, slurm_job="78.0")
    with pytest.raises(RunLocked):
        RunLock(tmp_path).acquire()


# --- processes outlive nothing: ranks go with their launcher -------------------------------------------

_LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys, time
    child = "from retclip_dist.runtime.lifetime import exit_with_parent; import time; exit_with_parent(); print('ready', flush=True); time.sleep(120)"
    # Its own session, as torchrun starts ranks: killing our process group does not reach it.
    proc = subprocess.Popen([sys.executable, "-c", child], start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\\n"
    print(proc.pid, flush=True)
    time.sleep(120)
    """
)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie waits for a reaper, but runs no more


def _wait_gone(pids: list[int], timeout: float) -> float:
    start = time.monotonic()
    while not all(_gone(p) for p in pids):
        assert time.monotonic() - start < timeout, f"still running: {[p for p in pids if not _gone(p)]}"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_process_in_its_own_session_dies_with_its_parent():
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER],
        env=trainer_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child = int(launcher.stdout.readline())
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    _wait_gone([child], timeout=5)


# --- end to end ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.dist
def test_killing_the_launchers_process_group_ends_the_ranks_and_their_workers(shards, tmp_path):
    out = tmp_path / "run"
    cmd = accelerate_cmd(*_args(shards, out, "--train.epochs", "50", "--data.num_workers", "1"))
    launcher, deadline = _training(
        cmd, out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    # Loader workers start anew with each epoch's iterator, from each rank's fork server (a child of the
    # rank, beside multiprocessing's resource tracker): wait until both ranks have a worker.
    while True:
        ranks = child_pids(launcher.pid)
        helpers = [h for r in ranks for h in child_pids(r)]
        workers = [w for h in helpers for w in child_pids(h)]
        if len(ranks) == 2 and len(workers) >= 2:
            break
        assert launcher.poll() is None and time.monotonic() < deadline, (ranks, helpers, workers)
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)  # what a scheduler or a closed terminal does
    launcher.wait()
    # A loaded machine (make test's second worker beside this one) can take seconds to reap a dozen processes;
    # an orphan would outlive any bound.
    _wait_gone(ranks + helpers + workers, timeout=30)
    # The next run finds the lock stale (its holder is dead) and resumes.
    runlock.check(out)


@pytest.mark.slow
@pytest.mark.dist
def test_when_one_rank_dies_the_other_leaves_its_collective_within_seconds(shards, tmp_path):
    out = tmp_path / "run"
    cmd = accelerate_cmd(*_args(shards, out, "--train.epochs", "50"))
    launcher, _ = _training(cmd, out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rank0 = json.loads((out / runlock.LOCK_NAME).read_text())["pid"]  # the main process holds the lock
    os.kill(rank0, signal.SIGKILL)
    output, _ = launcher.communicate(timeout=120)  # a bound for a loaded machine, not the measure
    assert launcher.returncode != 0
    # Rank 1 left its collective by itself and said why: torchrun's teardown would have ended it with a
    # stop signal (exit code 3), and the collective's own timeout (300 s) comes after the bound above.
    rank1 = read_records(out)[1]["exit"]
    assert rank1["code"] == EXIT_PEER_LOST, rank1
    assert output.count("retclip-train: rank 1: lost contact with another rank") == 1, output[-3000:]
    assert "[rank1]: Traceback" not in output


@pytest.mark.slow
@pytest.mark.dist
def test_every_shard_empty_ends_both_ranks_with_one_line_each(shards, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text((shards / "manifest.json").read_text())
    for tar in shards.glob("*.tar"):
        (empty / tar.name).write_bytes(b"")
    out = tmp_path / "run"
    done = _run(accelerate_cmd(*_args(empty, out, "--data.num_workers", "1")), timeout=240)  # raises past it
    assert done.returncode != 0
    # Each rank ended on the data error itself (not on a lost peer or a stall after the other left).
    ends = {rank: rec["exit"] for rank, rec in read_records(out).items()}
    assert sorted(ends) == [0, 1], ends
    assert all(e["code"] == EXIT_FAILED and "no usable sample in " in e["reason"] for e in ends.values()), (
        ends
    )
    for rank in (0, 1):
        lines = [
            line for line in done.stderr.splitlines() if line.startswith(f"retclip-train: rank {rank}: ")
        ]
        assert len(lines) == 1, done.stderr[-3000:]
        assert "training data (epoch 0): ValueError: no usable sample in " in lines[0]
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr
    assert not (out / runlock.LOCK_NAME).exists()  # released on the error path


@pytest.mark.slow
@pytest.mark.dist
def test_a_bad_config_is_one_line_and_exit_2_under_launch(shards, tmp_path):
    cmd = trainer_cmd("--launch", CPU_2PROC, "--main_process_port", str(free_port()))
    done = _run([*cmd, *_args(shards, tmp_path / "run", "--data.batch_size=-4")], timeout=120)
    assert done.returncode == EXIT_CONFIG
    output = done.stdout + done.stderr
    assert output.count("data.batch_size=-4: must be at least 1") == 1
    assert output.strip() == "retclip-train: data.batch_size=-4: must be at least 1"


@pytest.mark.slow
@pytest.mark.dist
def test_a_bad_config_under_bare_accelerate_launch_is_printed_by_rank_0_only(shards, tmp_path):
    done = _run(accelerate_cmd(*_args(shards, tmp_path / "run", "--train.epochs", "0")), timeout=180)
    assert done.returncode != 0
    assert done.stderr.count("retclip-train: train.epochs=0: must be at least 1") == 1
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr


@pytest.mark.slow
def test_sbatch_script_checks_the_config_once_before_srun(shards, tmp_path):
    env = {**trainer_env(), "GPUS_PER_NODE": "2", "PYTHON": sys.executable}
    args = _args(shards, tmp_path / "run", "--train.lr=-1")[1:]  # pretrain.sh takes the config path first
    done = subprocess.run(
        ["bash", str(ROOT / "launch/pretrain.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == EXIT_CONFIG
    assert done.stderr.strip() == "retclip-train: train.lr=-1.0: must be a finite number above 0"
    assert "retclip: job" not in done.stdout  # srun never ran


@pytest.mark.slow
def test_submitit_launcher_checks_the_config_before_submitting(shards, tmp_path):
    cmd = [sys.executable, "-m", "retclip_dist.launch.submit", "--local", "--config", TINY[1]]
    cmd += ["--cpu", "--gpus-per-node", "2", "--log-dir", str(tmp_path / "logs"), "--"]
    done = _run([*cmd, *_args(shards, tmp_path / "run", "--data.num_workers=-1")[2:]], timeout=120)
    assert done.returncode == EXIT_CONFIG
    assert done.stderr.strip() == "retclip-train: data.num_workers=-1: must be 0 or more"
    assert not (tmp_path / "logs").exists()  # nothing was submitted


def _damage_first_sample(tar: Path) -> str:
    """Replace the first left-eye JPEG of a shard with bytes that are no image; returns its key."""
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    key = next(m.name for m, _ in members if m.name.endswith(".left.jpg"))
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as dst:
        for member, data in members:
            if member.name == key:
                data = b"not a jpeg" * 10
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return key


@pytest.mark.slow
@pytest.mark.dist
def test_end_and_val_records_sum_skipped_samples_over_ranks(shards, tmp_path):
    damaged = tmp_path / "shards"
    damaged.mkdir()
    for f in shards.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    # Validation: rank r reads val shards [r::2] in name order, so only rank 1 meets this damage.
    _damage_first_sample(damaged / "val-000001.tar")
    for tar in damaged.glob("train-*.tar"):
        _damage_first_sample(tar)
    out = tmp_path / "run"
    cmd = trainer_cmd("--launch", CPU_2PROC, "--main_process_port", str(free_port()))
    done = _run(
        [*cmd, *_args(damaged, out, "--train.max_steps", "3", "--val.every_epochs", "1")], timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "skipped 1 sample(s), corrupt_image" in line]
    val = read_metrics(out / "metrics.jsonl", "val")
    assert [r["skipped_samples"] for r in val] == [1]
    assert all("[rank 1]" in line for line in warnings if "val-000001" in line)
    train_skips = {r: sum(f"[rank {r}]" in w and "/train-" in w for w in warnings) for r in (0, 1)}
    assert train_skips[0] > 0 and train_skips[1] > 0, done.stderr[-3000:]
    end = read_metrics(out / "metrics.jsonl", "end")[-1]
    assert end["skipped_samples"] == train_skips[0] + train_skips[1]
    assert not (out / runlock.LOCK_NAME).exists()  # released on a normal exit

    # The checkpoint was saved by 2 processes with batch 8: one process resumes it at batch 16 (the
    # global batch), not at batch 5.
    again = _run(trainer_cmd(*_args(damaged, out, "--checkpoint.resume", "auto", "--data.batch_size", "5")))
    assert again.returncode == EXIT_CONFIG
    assert again.stderr.count("data.batch_size=5: ") == 1
    assert (
        "was saved with a global batch of 16 patients; a resume on 1 processes keeps it with" in again.stderr
    )
    assert "Traceback" not in again.stderr


@pytest.mark.slow
def test_a_live_run_holds_its_output_dir_until_it_stops(shards, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        trainer_cmd(*_args(shards, out, "--train.epochs", "50", "--data.num_workers", "1")),
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and read_metrics(metrics, "train")):
        assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
        time.sleep(0.2)
    second = _run(trainer_cmd(*_args(shards, out, "--checkpoint.resume", "auto")), timeout=120)
    assert second.returncode == EXIT_CONFIG
    assert second.stderr.count(f"is in use by another run (pid {first.pid} on {socket.gethostname()}") == 1
    assert len(second.stderr.strip().splitlines()) == 1
    os.killpg(first.pid, signal.SIGTERM)  # a stop signal: it saves, exits 3 and gives the lock back
    output, _ = first.communicate(timeout=120)
    assert first.returncode == EXIT_STOPPED, output[-3000:]
    assert not (out / runlock.LOCK_NAME).exists()


# --- a stuck rank ends the job with the reason ----------------------------------------------------------

STALL_S = (
    60  # train.stall_timeout_s of the stuck run: above a first batch (fork server, decode) on a busy machine
)


def _late_shard_of_rank_1(shards: Path, per_rank_batch: int) -> str:
    """A tar that only rank 1 reads in epoch 0 (2 ranks, 2 partitions, one worker each), and not first."""
    train = read_manifest(str(shards)).split("train")
    plan = plan_epoch(train, 2, 1, per_rank_batch, 0, 0)
    of_rank_0 = {r.shard.url for r in plan.streams[0][0]}
    late = [r.shard.url for r in plan.streams[1][0][2:] if r.shard.url not in of_rank_0]
    assert late, plan.streams
    return Path(late[0]).name


def _run_logged(cmd: list[str], env: dict[str, str], log: Path, metrics: Path, timeout_s: float) -> float:
    """``cmd`` with its output in ``log``; returns the seconds from its last training step to its end."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        steps, last = 0, time.monotonic()
        while proc.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"the run did not end within {timeout_s} s:\n{log.read_text()[-4000:]}")
            now = len(read_metrics(metrics, "train")) if metrics.exists() else 0
            if now != steps:
                steps, last = now, time.monotonic()
            time.sleep(0.2)
    return time.monotonic() - last


@pytest.mark.slow
@pytest.mark.dist
def test_a_hung_read_on_rank_1_ends_the_job_with_its_stack_and_the_requeued_run_finishes_exactly(
    shards, tmp_path
):
    # A shard on a hung mount: reading it blocks forever (a FIFO nobody writes).
    hung = tmp_path / "shards"
    shutil.copytree(shards, hung)
    stuck = _late_shard_of_rank_1(hung, 8)
    (hung / stuck).unlink()
    os.mkfifo(hung / stuck)
    common = [
        "--data.num_workers", "1",
        "--data.shuffle_buffer", "2",  # reads only a little ahead: the hang comes mid-epoch
        "--train.epochs", "2",
        "--checkpoint.every_steps", "1",
        "--val.every_epochs", "0",
        "--train.stall_timeout_s", str(STALL_S),
    ]  # fmt: skip
    out = tmp_path / "run"
    # As under Slurm (job 77, first run): the ranks' health records name the attempt the launchers ask about.
    env = {**trainer_env(), "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"}
    log = tmp_path / "stalled.log"
    tail = _run_logged(accelerate_cmd(*_args(hung, out, *common)), env, log, out / "metrics.jsonl", 420)
    text = log.read_text()

    # Rank 1 wrote its stacks and one line naming the stuck frame and the shard; the job ended well within
    # the stall timeout plus a minute of its last step; the launchers requeue it.
    assert tail < STALL_S + 60, (tail, text[-4000:])
    lines = [
        line for line in text.splitlines() if line.startswith("retclip-train: rank") and "no progress" in line
    ]
    assert len(lines) == 1 and lines[0].startswith("retclip-train: rank 1: no progress for "), text[-4000:]
    assert "waiting for training data" in lines[0]
    assert "in read_shard" in lines[0] and f"reading shard {hung / stuck}" in lines[0], lines[0]
    assert "retclip-train: rank 1: loader worker pid" in text  # the worker's stacks are in the log
    assert "retclip-train: rank 0: lost contact with another rank" in text
    assert "(exited with code 5)" in text  # rank 0 names the rank it lost, from its health record
    records = read_records(out)
    assert {r: rec["exit"]["code"] for r, rec in records.items()} == {0: EXIT_PEER_LOST, 1: EXIT_STALLED}
    decision = decide(out, "77.0", max_fault_requeues=3)  # what pretrain.sh and the submitit task ask
    assert decision.requeue and decision.line.startswith(
        "requeueing: rank 1 ended with exit code 5 (rank 1: no"
    )
    stopped_at = read_metrics(out / "metrics.jsonl", "train")[-1]["step"]

    # The mount is back: the requeued job resumes and ends with the weights of a run never stuck.
    (hung / stuck).unlink()
    shutil.copy(shards / stuck, hung / stuck)
    env["SLURM_RESTART_COUNT"] = "1"
    log = tmp_path / "resumed.log"
    resumed = accelerate_cmd(*_args(hung, out, *common, "--checkpoint.resume", "auto"))
    _run_logged(resumed, env, log, out / "metrics.jsonl", 300)
    assert f"resuming at step {stopped_at}" in log.read_text(), log.read_text()[-3000:]
    reference = tmp_path / "reference"
    done = _run(accelerate_cmd(*_args(shards, reference, *common)))
    assert done.returncode == 0, done.stderr[-3000:]
    (last,) = read_metrics(reference / "metrics.jsonl", "end")
    assert 0 < stopped_at < last["step"]
    ends = read_metrics(out / "metrics.jsonl", "end")
    assert [(r["step"], r["exit_code"]) for r in ends] == [(last["step"], 0)]
    got = load_file(out / "model" / "model.safetensors")
    want = load_file(reference / "model" / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
