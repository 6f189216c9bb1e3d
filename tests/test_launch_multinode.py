"""launch/pretrain.sh -> srun -> launch/node.sh -> accelerate launch, on one machine without Slurm.

Stand-ins for srun, scontrol and scancel (written by the ``fake_slurm`` fixture) give each "node" the
environment Slurm would: srun starts node.sh once per node with SLURM_NODEID/SLURM_PROCID set, so two
nodes of two gloo processes rendezvous at 127.0.0.1 exactly as on a cluster, and must train like one node
of four. The same stand-ins check the requeue path of the batch shell: the configured requeue signal,
sent to the script as ``sbatch --signal=B:SIG@120`` would, reaches every training process, which save and
exit 3, and the script requeues the job; and when one "node" is killed, then frozen, the other node's
ranks leave (exit code 6, naming the lost ranks) and the script requeues the job after each fault. Real
Slurm runs of the same script are in tests/test_slurm.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_synth_shards, child_pids, free_port

from retclip_dist.exit_codes import EXIT_STOPPED
from retclip_dist.train.metrics_log import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.dist]

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
JOB_ID = "4242"

# srun: one task per node on SLURM_NNODES "nodes", each with the variables Slurm sets per task; its exit
# status is the highest of its tasks', as srun's is. It records its pid for the scancel stand-in.
_SRUN = """#!/usr/bin/env bash
while [[ ${1:-} == -* ]]; do shift; done  # srun's own options (--kill-on-bad-exit=0)
echo $$ >"$FAKE_SLURM_DIR/srun.pid"
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_NTASKS=$SLURM_NNODES "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || { code=$?; ((code > status)) && status=$code; }
done
exit "$status"
"""
# scontrol: `show hostnames LIST` names every node 127.0.0.1; anything else (requeue) is recorded.
_SCONTROL = """#!/usr/bin/env bash
case $1 in
    show) for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done ;;
    *) echo "scontrol $*" >>"$FAKE_SLURM_DIR/calls" ;;
esac
"""
# scancel --signal=SIG JOB: like Slurm's without --batch, the signal goes to every process of the job's
# step (here: everything srun started, down to the loader workers), not to the batch shell.
_SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >>"$FAKE_SLURM_DIR/calls"
sig=${1#--signal=}
tree() { local child; for child in $(ps -o pid= --ppid "$1"); do echo "$child"; tree "$child"; done; }
for pid in $(tree "$(cat "$FAKE_SLURM_DIR/srun.pid")"); do kill -s "$sig" "$pid" 2>/dev/null || true; done
"""


@pytest.fixture
def fake_slurm(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    for name, text in (("srun", _SRUN), ("scontrol", _SCONTROL), ("scancel", _SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 60 training patients: 3 global batches of 16 per epoch; no val split, so no validation.
    root = tmp_path_factory.mktemp("multinode-data")
    return build_synth_shards(root, 60, seed=1, raw_size=96, size=64, max_count=20, val_fraction=0.0)


def overrides(shards: Path, out: Path, per_rank_batch: int, *extra: str) -> list[str]:
    return [
        "--data.shards", str(shards),
        "--output_dir", str(out),
        "--data.batch_size", str(per_rank_batch),
        "--data.num_workers", "0",
        "--data.partitions", "4",  # the same data order whatever the layout
        "--train.warmup_steps", "1",
        "--log.every_steps", "1",
        "--val.every_epochs", "0",
        "--checkpoint.every_steps", "0",
        "--log.trackers", "[]",
        "--log.progress", "false",
        *extra,
    ]  # fmt: skip


def job_env(fake_slurm: Path, nodes: int, per_node: int, **extra: str) -> dict[str, str]:
    """What sbatch and the cluster give the batch shell: job id, node count and list; our knobs on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RETCLIP_"))}
    return {
        **env,
        "PATH": os.pathsep.join([str(fake_slurm), str(VENV_BIN), env.get("PATH", "")]),
        "FAKE_SLURM_DIR": str(fake_slurm),
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": f"node[1-{nodes}]",
        "GPUS_PER_NODE": str(per_node),
        "ACCELERATE_CONFIG": "configs/accelerate/cpu_2proc.yaml",
        "MAIN_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def pretrain(env: dict[str, str], args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", "launch/pretrain.sh", "configs/tiny.yaml", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout_s: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"pretrain.sh did not finish within {timeout_s} s:\n{out[-4000:]}")
    return out


def test_two_nodes_of_two_train_like_one_node_of_four(fake_slurm, shards, tmp_path):
    runs = {}
    for nodes, per_node in ((2, 2), (1, 4)):
        out = tmp_path / f"run-{nodes}x{per_node}"
        args = overrides(shards, out, 4, "--train.max_steps", "3")
        env = job_env(fake_slurm, nodes, per_node)
        proc = pretrain(env, args)
        log = finish(proc, 300)  # a bound for a loaded 2-core machine, not a measure
        assert proc.returncode == 0, log[-4000:]
        main = f"main 127.0.0.1:{env['MAIN_PORT']}, requeue signal USR2"
        assert f"{nodes} node(s) x {per_node} process(es), {main}" in log
        assert "4 processes x 4 patients per step" in log
        runs[nodes, per_node] = out

    two, one = (read_metrics(runs[k] / "metrics.jsonl", "train") for k in ((2, 2), (1, 4)))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(two, one, strict=True):
        for key in ("loss", "loss_patient", "loss_left", "loss_right"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key)
    # Training moved the loss: equal losses are not two runs that did nothing.
    assert two[0]["loss"] != two[-1]["loss"]
    for out in runs.values():
        ends = read_metrics(out / "metrics.jsonl", "end")
        assert [(r["step"], r["exit_code"], r["skipped_samples"]) for r in ends] == [(3, 0, 0)]


def test_configured_requeue_signal_makes_the_trainers_save_and_the_job_requeue(fake_slurm, shards, tmp_path):
    # USR1, not the default USR2: what `RETCLIP_REQUEUE_SIGNAL=USR1 sbatch --signal=B:USR1@120` does
    # ahead of the time limit, on one node of two processes.
    out = tmp_path / "run"
    env = job_env(fake_slurm, 1, 2, RETCLIP_REQUEUE_SIGNAL="USR1")
    # One loader worker per rank: scancel's signal reaches it too, and it must outlive the save.
    proc = pretrain(env, overrides(shards, out, 8, "--train.epochs", "50", "--data.num_workers", "1"))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240  # a bound for a loaded machine, not a measure
    while not (metrics.exists() and len(read_metrics(metrics, "train")) >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no second step (exit {proc.poll()}):\n{finish(proc, 30)[-4000:]}")
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGUSR1)  # the batch shell only, as --signal=B: does
    log = finish(proc, 90)

    # Every rank saved and exited 3; torchrun's agent turns a rank's 3 into its own 1, so the script's
    # status says only "not done" (Slurm ignores it: the job is requeued).
    assert proc.returncode != 0, log[-4000:]
    assert "requeue signal USR1" in log
    assert "retclip: USR1 received, asking the training processes to save and stop (USR1)" in log
    assert "stop requested by signal; saved step" in log
    calls = (fake_slurm / "calls").read_text().splitlines()
    assert calls == [f"scancel --signal=USR1 {JOB_ID}", f"scontrol requeue {JOB_ID}"]
    (end,) = read_metrics(metrics, "end")
    assert end["exit_code"] == EXIT_STOPPED
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{end['step']:08d}"]
    assert not (out / "model").exists()


# --- a dead node, a frozen node ------------------------------------------------------------------


def node_processes(fake_slurm: Path, node: int) -> list[int]:
    """Every process of one "node": the accelerate launcher srun started with SLURM_NODEID=node, its
    ranks and their helpers (fork server, resource tracker)."""
    srun = int((fake_slurm / "srun.pid").read_text())
    tops = []
    for pid in child_pids(srun):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_NODEID={node}".encode() in environ:
            tops.append(pid)
    out, todo = [], list(tops)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += child_pids(pid)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def ranks_of(procs: list[int]) -> list[int]:
    """The training processes among ``procs`` (``python -m retclip_dist.train``)."""
    out = []
    for pid in procs:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"retclip_dist.train" in cmd and b"launch" not in cmd:  # not the accelerate launcher
            out.append(pid)
    return out


COLLECTIVE_S = 35  # train.collective_timeout_s of the node tests; above health.SILENT_S (30 s)


def fault_node_1(
    fake_slurm: Path, env: dict[str, str], args: list[str], out: Path, after_step: int, sig: int, log: Path
) -> tuple[float, str]:
    """Run pretrain.sh on 2 nodes; once training is past ``after_step``, send ``sig`` to every process of
    node 1. Returns how long node 0's ranks took to exit after it, and the job log."""
    metrics = out / "metrics.jsonl"
    earlier = len(read_metrics(metrics, "train")) if metrics.exists() else 0

    def past() -> bool:  # a step after ``after_step`` by this run (the file holds earlier runs' records)
        rows = read_metrics(metrics, "train")[earlier:] if metrics.exists() else []
        return bool(rows) and rows[-1]["step"] > after_step

    with log.open("w") as sink:
        proc = subprocess.Popen(
            ["bash", "launch/pretrain.sh", "configs/tiny.yaml", *args],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 240
            while not past():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            node0 = ranks_of(node_processes(fake_slurm, 0))
            node1 = node_processes(fake_slurm, 1)
            assert len(node0) == 2 and len(ranks_of(node1)) == 2, (node0, node1)
            hit = time.monotonic()
            for pid in node1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            while any(alive(p) for p in node0):
                assert time.monotonic() - hit < COLLECTIVE_S + 60, "node 0's ranks still wait"
                time.sleep(0.2)
            took = time.monotonic() - hit
            # What Slurm does to a frozen node once srun's --wait is over (and to any job it requeues).
            for pid in node1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return took, log.read_text()


def test_a_killed_then_a_frozen_node_end_the_other_nodes_ranks_and_the_requeued_run_resumes_exactly(
    fake_slurm, shards, tmp_path
):
    out = tmp_path / "run"
    # 60 patients, 4 ranks x 4: 3 steps per epoch, 12 steps; a checkpoint every 3 steps.
    args = overrides(shards, out, 4, "--train.epochs", "4", "--checkpoint.every_steps", "3")
    args += ["--train.collective_timeout_s", str(COLLECTIVE_S)]
    env = job_env(fake_slurm, 2, 2, SLURM_RESTART_COUNT="0")

    # Node 1 dies (its processes killed) after step 4: node 0 sees the connections close at once.
    took, text = fault_node_1(fake_slurm, env, args, out, 3, signal.SIGKILL, tmp_path / "killed.log")
    assert took < 30, (took, text[-3000:])
    for rank in (0, 1):
        line = next(x for x in text.splitlines() if x.startswith(f"retclip-train: rank {rank}: lost contact"))
        assert "rank 2 on" in line and "rank 3 on" in line and "(its process is gone)" in line, line
    assert "retclip: requeueing: rank 0 ended with exit code 6" in text, text[-3000:]
    first = read_metrics(out / "metrics.jsonl", "train")

    # Requeued, it resumes from the checkpoint of step 3; node 1 then freezes (its processes stopped):
    # node 0 gives up after the collective timeout and names the silent ranks from their health records.
    env["SLURM_RESTART_COUNT"] = "1"
    took, text = fault_node_1(fake_slurm, env, args, out, 7, signal.SIGSTOP, tmp_path / "frozen.log")
    assert COLLECTIVE_S - 5 < took < COLLECTIVE_S + 60, (took, text[-3000:])
    # The node-0 rank whose collective times out first leaves; the other may then see its connection close
    # instead: one of them names the timeout, and both name the silent ranks.
    lines = [x for x in text.splitlines() if re.match(r"retclip-train: rank [01]: lost contact with", x)]
    assert len(lines) == 2 and any("Timed out waiting" in x for x in lines), lines
    assert all("rank 2 on" in x and "rank 3 on" in x for x in lines), lines
    assert "retclip: requeueing: rank 0 ended with exit code 6" in text, text[-3000:]
    calls = (fake_slurm / "calls").read_text().splitlines()
    assert calls == [f"scontrol requeue {JOB_ID}"] * 2

    # The requeued run resumed exactly: the steps it ran again after the checkpoint (4 and on, up to
    # where node 1 died) gave the losses of their first run.
    second = read_metrics(out / "metrics.jsonl", "train")[len(first) :]
    assert "resuming at step 3" in text, text[-3000:]
    assert second[0]["step"] == 4 and second[-1]["step"] > 7
    again = [row for row in second if row["step"] <= first[-1]["step"]]
    assert again, (first, second)
    for row in again:
        before = next(r for r in first if r["step"] == row["step"])
        for key in ("loss", "loss_patient", "loss_left", "loss_right"):
            assert row[key] == before[key], (row["step"], key)
