"""retclip_dist.launch.submit: the sbatch script it writes, the command each node runs, its requeue hook,
its local mode, and submitit on a real Slurm cluster (straight through, and requeued after the requeue
signal: USR2 by default, USR1 when asked), where the final weights must equal those of a direct
`accelerate launch` of the same run bit for bit."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
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

from retclip_dist.launch.submit import (
    PretrainJob,
    build_executor,
    main,
    parse_args,
    sbatch_script,
    slurm_parameters,
)
from retclip_dist.runtime.health import Health


@pytest.fixture(autouse=True)
def _no_slurm_for_dry_runs(request, tmp_path, monkeypatch):
    # --dry-run must work where Slurm is not installed (a laptop, a login node without srun); CI has Slurm,
    # so the dry-run tests hide it: submitit looks for `srun` on PATH.
    if request.node.name.startswith("test_dry_run"):
        empty = tmp_path / "no-slurm-bin"
        empty.mkdir()
        monkeypatch.setenv("PATH", str(empty))


def _script_lines(argv: list[str], capsys: pytest.CaptureFixture[str]) -> set[str]:
    assert main([*argv, "--dry-run"]) == 0
    return set(capsys.readouterr().out.splitlines())


def test_dry_run_prints_sbatch_script_for_gpu_nodes(tmp_path, capsys):
    argv = ["--config", "configs/retclip_vitb16.yaml", "--nodes", "4", "--gpus-per-node", "8"]
    argv += ["--partition", "gpu", "--time-min", "600", "--log-dir", str(tmp_path)]
    lines = _script_lines(argv, capsys)
    assert {
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=600",
        # submitit's requeue hook listens for USR2; the default warning comes 120 s ahead of the limit.
        "#SBATCH --signal=USR2@120",
        f"#SBATCH --output={tmp_path}/%j_0_log.out",
        # submitit's handler and the trainer in the task are told the same signal.
        "export SUBMITIT_PREEMPT_SIGNAL=USR2",
        "export RETCLIP_REQUEUE_SIGNAL=USR2",
    } <= lines


@pytest.mark.parametrize("how", ["flag", "env"])
def test_dry_run_honours_the_configured_requeue_signal(tmp_path, capsys, monkeypatch, how):
    argv = ["--config", "configs/tiny.yaml", "--cpu", "--log-dir", str(tmp_path), "--signal-delay-s", "300"]
    if how == "flag":
        argv += ["--requeue-signal", "usr1"]
    else:
        monkeypatch.setenv("RETCLIP_REQUEUE_SIGNAL", "USR1")
    lines = _script_lines(argv, capsys)
    assert {
        "#SBATCH --signal=USR1@300",
        "export SUBMITIT_PREEMPT_SIGNAL=USR1",
        "export RETCLIP_REQUEUE_SIGNAL=USR1",
    } <= lines
    assert not [line for line in lines if "USR2" in line]


def test_dry_run_refuses_a_requeue_signal_other_than_usr1_or_usr2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "--config",
                "configs/tiny.yaml",
                "--log-dir",
                str(tmp_path),
                "--requeue-signal",
                "HUP",
                "--dry-run",
            ]
        )
    assert exited.value.code == 2
    assert "requeue signal 'HUP' is not one of USR1 or USR2" in capsys.readouterr().err


def test_dry_run_with_cpu_asks_slurm_for_no_gpus(tmp_path, capsys):
    argv = ["--config", "configs/tiny.yaml", "--cpu", "--gpus-per-node", "2", "--log-dir", str(tmp_path)]
    lines = _script_lines(argv, capsys)
    assert "#SBATCH --nodes=1" in lines
    assert not [line for line in lines if "gpu" in line]


@pytest.mark.parametrize(
    "extra",
    [
        ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu nodes", "--time-min", "600"],
        ["--cpu", "--requeue-signal", "USR1", "--signal-delay-s", "300", "--job-name", "ret clip"],
    ],
)
def test_dry_run_script_is_the_text_submitit_writes_for_the_same_job(tmp_path, monkeypatch, capsys, extra):
    """Our renderer (submitit has no public one) against submitit's own text for the executor the real
    submission builds: a changed sbatch layout in a new submitit fails here, not on a cluster."""
    import submitit.slurm.slurm as submitit_slurm  # the test may read submitit's internals

    fake_bin = tmp_path / "bin"  # submitit builds a Slurm executor only where `srun` is on PATH
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    # submitit's default signal line would name this one; ours must replace it, whatever the shell says.
    monkeypatch.setattr(submitit_slurm.SlurmJobEnvironment, "USR_SIG", "TERM")
    args = parse_args(["--config", "configs/tiny.yaml", "--log-dir", str(tmp_path / "logs"), *extra])
    executor = build_executor(args)
    theirs = executor._make_submission_file_text("<submitit task command>", "uid")
    assert (
        main(["--config", "configs/tiny.yaml", "--log-dir", str(tmp_path / "logs"), *extra, "--dry-run"]) == 0
    )
    ours = capsys.readouterr().out
    assert ours == theirs + "\n"  # print's newline
    assert sbatch_script(slurm_parameters(args), args.log_dir, "<submitit task command>") == theirs
    assert "TERM" not in theirs


def test_each_node_launches_its_share_of_all_processes():
    job = PretrainJob(
        "configs/tiny.yaml", ["--train.epochs", "2"], "configs/accelerate/multi_node.yaml", 8, 29600
    )
    assert job.command(num_nodes=4, node_rank=2, main_host="node-a") == [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "configs/accelerate/multi_node.yaml",
        "--num_machines", "4", "--machine_rank", "2", "--num_processes", "32",
        "--main_process_ip", "node-a", "--main_process_port", "29600",
        "-m", "retclip_dist.train", "--config", "configs/tiny.yaml", "--train.epochs", "2",
        "--checkpoint.resume", "auto",
    ]  # fmt: skip


# submitit calls checkpoint() from its SIGUSR2 handler, which interrupts PretrainJob.__call__ inside
# Popen.wait(); the hook must wait for the trainer's save without deadlocking on Popen's lock.
_SIGNAL_DURING_WAIT = """
import os, pathlib, signal, subprocess, sys, threading
from retclip_dist.launch.submit import PretrainJob

flag = pathlib.Path(sys.argv[1])
job = PretrainJob("run.yaml", ["--train.epochs", "3"], "acc.yaml", 2, 29500)
trainer = "import pathlib, sys, time; time.sleep(1); pathlib.Path(sys.argv[1]).write_text('saved')"
job._proc = subprocess.Popen([sys.executable, "-c", trainer, str(flag)])
seen = []
signal.signal(signal.SIGUSR2, lambda *_: seen.append((job.checkpoint(), flag.read_text())))
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR2)).start()
code = job._proc.wait()
fresh, saved = seen[0]
print(code, saved, type(fresh.function).__name__, fresh.function.overrides, fresh.function._proc)
"""


def test_a_requeued_job_keeps_its_requeue_signal():
    job = PretrainJob("run.yaml", [], "acc.yaml", 2, 29500, "USR1")
    assert pickle.loads(pickle.dumps(job)).checkpoint().function.requeue == "USR1"


def test_checkpoint_hook_waits_for_the_trainer_inside_popen_wait(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_DURING_WAIT, str(tmp_path / "flag")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0 saved PretrainJob ['--train.epochs', '3'] None"


def submit(out_dir: Path, log_dir: Path, shards: Path, *flags: str, timeout_s: float = 120) -> str:
    cmd = [
        sys.executable, "-m", "retclip_dist.launch.submit", "--config", "configs/tiny.yaml",
        "--accelerate-config", CPU_2PROC, "--gpus-per-node", "2", "--port", str(free_port()),
        "--log-dir", str(log_dir), "--job-name", "retclip-test", *flags,
        "--", *run_overrides(shards, out_dir),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _end_rows(out_dir: Path) -> list[tuple[int, int]]:
    return [(r["step"], r["exit_code"]) for r in metrics(out_dir) if r["kind"] == "end"]


@pytest.mark.slow
@pytest.mark.dist
def test_local_mode_runs_to_completion_without_slurm(tmp_path_factory, tmp_path):
    want = reference_weights(tmp_path_factory)
    out = tmp_path / "run"
    stdout = submit(
        out, tmp_path / "submitit", shard_set(tmp_path_factory), "--local", "--wait", timeout_s=300
    )
    assert re.search(r"^job \d+ finished$", stdout, re.MULTILINE), stdout
    assert _end_rows(out) == [(TOTAL_STEPS, 0)]
    assert_same_weights(load_weights(out), want)


@pytest.fixture
def cluster() -> Iterator[None]:
    with slurm_node():
        yield


def _result(log_dir: Path, job: str) -> tuple[str, object]:
    with (log_dir / f"{job}_0_result.pkl").open("rb") as f:
        return pickle.load(f)


@pytest.mark.slow
@pytest.mark.dist
def test_submitit_slurm_run_completes_and_matches_direct_run(cluster, tmp_path_factory, tmp_path):
    want = reference_weights(tmp_path_factory)
    out, log_dir = tmp_path / "run", tmp_path / "submitit"
    stdout = submit(
        out, log_dir, shard_set(tmp_path_factory), "--cpu", "--cpus-per-task", "2", "--wait", timeout_s=300
    )
    job = re.search(r"^job (\d+)$", stdout, re.MULTILINE).group(1)
    assert f"job {job} finished" in stdout
    assert _result(log_dir, job) == ("success", 0)
    assert _end_rows(out) == [(TOTAL_STEPS, 0)]
    assert_same_weights(load_weights(out), want)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("configured", [None, "USR1"], ids=["default-usr2", "usr1"])
def test_submitit_requeues_on_its_signal_and_resumes_bit_exactly(
    cluster, tmp_path_factory, tmp_path, configured
):
    want = reference_weights(tmp_path_factory)
    sig = configured or "USR2"
    out, log_dir = tmp_path / "run", tmp_path / "submitit"
    flags = ["--cpu", "--cpus-per-task", "2", *(["--requeue-signal", configured] if configured else [])]
    stdout = submit(out, log_dir, shard_set(tmp_path_factory), *flags)
    job = re.search(r"^job (\d+)$", stdout, re.MULTILINE).group(1)
    err_log = log_dir / f"{job}_0_log.err"
    try:
        wait_for(lambda: latest_step(out) >= SIGNAL_AFTER_STEP or None, 300, f"step {SIGNAL_AFTER_STEP}")
        # What `#SBATCH --signal=USR2@120` (USR1 with --requeue-signal USR1) does ahead of the time limit:
        # signal every process of the step.
        subprocess.run(["scancel", f"--signal={sig}", job], timeout=20, check=True)
        fields = wait_for_job(job, 300, err_log)
    finally:
        cancel(job)

    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1")
    # submitit logs to the task's stdout; the trainer's own log is on stderr.
    submitit_log = (log_dir / f"{job}_0_log.out").read_text()
    assert f"Caught signal SIG{sig}" in submitit_log
    assert f"Requeued job {job}" in submitit_log
    assert "stop requested by signal; saved step" in err_log.read_text()
    assert _result(log_dir, job) == ("success", 0)
    ends = _end_rows(out)
    assert [code for _, code in ends] == [3, 0]
    assert SIGNAL_AFTER_STEP <= ends[0][0] < TOTAL_STEPS == ends[1][0]
    assert [r["step"] for r in metrics(out) if r["kind"] == "train"] == list(range(1, TOTAL_STEPS + 1))
    assert_same_weights(load_weights(out), want)


@pytest.mark.parametrize(("codes", "requeued"), [({0: 6, 1: 5}, True), ({0: 6, 1: 1}, False)])
def test_a_stalled_rank_requeues_the_job_and_a_failed_one_does_not(tmp_path, monkeypatch, codes, requeued):
    # torchrun ends the task's command with 1 whatever the ranks' codes; their health records say more.
    out = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    for rank, code in codes.items():
        Health(out, rank).exit(code, f"rank {rank} said why")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >>{calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    job = PretrainJob("configs/tiny.yaml", ["--output_dir", str(out)], "acc.yaml", 2, 29500)
    if requeued:
        with pytest.raises(SystemExit):  # as submitit leaves after its own requeue: no result is written
            job._requeue_after_a_fault("77")
        assert calls.read_text() == "requeue 77\n"
    else:
        job._requeue_after_a_fault("77")
        assert not calls.exists()
