"""Submit pretraining through submitit: one task per node, each running ``accelerate launch``.

    python -m retclip_dist.launch.submit --config configs/retclip_vitb16.yaml --nodes 4 \
        --gpus-per-node 8 --partition gpu -- --data.shards /data/shards

The job is a ``submitit.helpers.Checkpointable``. When Slurm warns of the time limit or preempts the job,
it signals every process of the step: the training processes save a checkpoint and exit, submitit calls
``checkpoint()`` in the task, which waits for that save, and the job is requeued with
``--checkpoint.resume auto``. A rank that stalled or lost a peer (exit code 5 or 6) requeues the job too,
up to ``train.max_fault_requeues`` times in a row without a newer checkpoint (``launch/requeue.py``).
``--local`` runs the same job with submitit's local executor (no Slurm).
``--cpu`` asks Slurm for no GPUs (tests, CPU clusters); the trainer runs each process on the CPU itself.

The warning signal is the requeue signal of ``retclip_dist.runtime.stop_signals`` (USR2, submitit's own
default; ``--requeue-signal USR1`` or ``RETCLIP_REQUEUE_SIGNAL=USR1`` to change it). It is one setting
for three listeners: the ``#SBATCH --signal`` line, submitit's handler in the task (which reads
``SUBMITIT_PREEMPT_SIGNAL`` when it is imported, so the script exports it before ``srun``) and the
trainer (``RETCLIP_REQUEUE_SIGNAL``, exported too).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from retclip_dist.config import load_config
from retclip_dist.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_STOPPED
from retclip_dist.launch.requeue import decide
from retclip_dist.runtime.env import slurm_job
from retclip_dist.runtime.stop_signals import (
    DEFAULT_REQUEUE_SIGNAL,
    LAUNCHER_IGNORES,
    REQUEUE_SIGNAL_ENV,
    requeue_signal,
    short_name,
)
from retclip_dist.train.config import RunConfig

# submitit's handler in the task listens for the signal this variable names (USR2 if unset), read once
# when submitit is imported (submitit 1.5: JobEnvironment.USR_SIG).
_SUBMITIT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"


def _ignore(signals: tuple[signal.Signals, ...]) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


class PretrainJob(Checkpointable):
    """One node's share of a run; picklable (it is what submitit stores and resubmits)."""

    # A job pickled before the requeue signal was configurable has no attribute of its own: it used USR2.
    requeue = short_name(DEFAULT_REQUEUE_SIGNAL)

    def __init__(
        self,
        config: str,
        overrides: list[str],
        accelerate_config: str,
        gpus_per_node: int,
        port: int,
        requeue: str = short_name(DEFAULT_REQUEUE_SIGNAL),
    ) -> None:
        self.config = config
        self.overrides = overrides
        self.accelerate_config = accelerate_config
        self.gpus_per_node = gpus_per_node
        self.port = port
        self.requeue = requeue  # the requeue signal's short name, e.g. "USR2"
        self._proc: subprocess.Popen | None = None

    def command(self, num_nodes: int, node_rank: int, main_host: str) -> list[str]:
        # The interpreter that unpickled this job is the submitter's environment; PATH on the node may not be.
        # No `--cpu`: it makes `accelerate launch` start one process whatever the config says.
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            self.accelerate_config,
            "--num_machines",
            str(num_nodes),
            "--machine_rank",
            str(node_rank),
            "--num_processes",
            str(num_nodes * self.gpus_per_node),
            "--main_process_ip",
            main_host,
            "--main_process_port",
            str(self.port),
            "-m",
            "retclip_dist.train",
            "--config",
            self.config,
            *self.overrides,
            "--checkpoint.resume",
            "auto",
        ]

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        cmd = self.command(env.num_nodes, env.node, env.hostnames[0] if env.hostnames else "127.0.0.1")
        print("retclip submit:", " ".join(cmd), flush=True)
        # The trainer is told the requeue signal itself, whatever the job's environment says; the launcher
        # between it and us ignores the stop signals, so it cannot die of one meant for the trainer.
        child_env = {**os.environ, REQUEUE_SIGNAL_ENV: self.requeue}
        ignore = functools.partial(_ignore, LAUNCHER_IGNORES)
        self._proc = subprocess.Popen(cmd, env=child_env, preexec_fn=ignore)
        code = self._proc.wait()
        if code != EXIT_OK:
            self._requeue_after_a_fault(env.job_id)
            raise RuntimeError(
                f"training exited with status {code} ({EXIT_STOPPED}: it saved a checkpoint and stopped on a signal; "
                "resubmit to resume); see the log above"
            )
        return code

    def _requeue_after_a_fault(self, job_id: str) -> None:
        """Requeue the job (and leave without a result, as submitit does on its own requeue) when a rank
        stalled or lost a peer (exit code 5 or 6), within train.max_fault_requeues (launch/requeue.py).
        torchrun's status is 1 whatever the ranks' codes; their health records hold the codes."""
        attempt = slurm_job()
        if attempt is None:
            return  # submitit's local executor: there is no queue to go back to
        cfg = load_config(RunConfig, self.config, [*self.overrides, "--checkpoint.resume", "auto"])
        decision = decide(cfg.output_dir, attempt, cfg.train.max_fault_requeues)
        print(f"retclip submit: {decision.line}", flush=True)
        if decision.requeue:
            # Another node's task may have requeued the job already; either way this attempt is over.
            subprocess.run(["scontrol", "requeue", job_id], timeout=60, check=False)
            sys.exit(-1)

    def checkpoint(self, *args: object, **kwargs: object) -> DelayedSubmission:
        # Slurm signalled the trainer along with us: let it finish its checkpoint before requeueing.
        # This runs in a signal handler that interrupted Popen.wait() in __call__, which holds a
        # non-reentrant lock, so waiting through Popen again would deadlock; waitid with WNOWAIT
        # waits for the exit without reaping the child.
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOWAIT)
        fresh = PretrainJob(
            self.config, self.overrides, self.accelerate_config, self.gpus_per_node, self.port, self.requeue
        )
        return DelayedSubmission(fresh)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"] = None
        return state


def slurm_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The job's sbatch settings in ``submitit.SlurmExecutor``'s own parameter names: what the executor
    submits and what ``--dry-run`` prints (``sbatch_script``)."""
    params: dict[str, Any] = {
        "job_name": args.job_name,
        "nodes": args.nodes,
        "ntasks_per_node": 1,
        "time": args.time_min,
        "cpus_per_task": args.cpus_per_task,
        # submitit writes `--signal=<its USR_SIG>@delay` from the submitting process's environment; this
        # line replaces it so that it names our signal whatever that environment holds.
        "additional_parameters": {"signal": f"{args.requeue_signal}@{args.signal_delay_s}"},
        "setup": _signal_exports(args.requeue_signal),
    }
    if args.gpus_per_node and not args.cpu:
        params["gpus_per_node"] = args.gpus_per_node
    if args.partition:
        params["partition"] = args.partition
    return params


def _signal_exports(requeue: str) -> list[str]:
    """The job's environment, passed explicitly: lines the job runs before the task starts, so that
    submitit's handler and the trainer hear the same signal whatever the submitting shell exported and
    even on clusters that submit with --export=NONE."""
    return [f"export {_SUBMITIT_SIGNAL_ENV}={requeue}", f"export {REQUEUE_SIGNAL_ENV}={requeue}"]


# What submitit's sbatch script writes for every job (submitit 1.5: its default and fixed lines).
_SUBMITIT_FIXED = {"wckey": "submitit", "open-mode": "append"}


def _sbatch_flag(key: str, value: object) -> str:
    key = key.replace("_", "-")
    return f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={shlex.quote(str(value))}"


def sbatch_script(params: dict[str, Any], folder: str | Path, command: str) -> str:
    """The sbatch script ``submitit.SlurmExecutor`` writes for one job of ``params`` (its parameter
    names, as ``slurm_parameters`` gives them), for ``--dry-run``: submitit has no public call that
    renders without submitting. tests/test_submit.py compares it with submitit's own text."""
    params = dict(params)
    setup = params.pop("setup", None)
    extra = params.pop("additional_parameters", {})
    log = Path(folder).expanduser().absolute()  # submitit's log names: JOBID_TASK_log.out/.err
    out, err = f"{log}/%j_%t_log.out", f"{log}/%j_%t_log.err"
    flags = {**_SUBMITIT_FIXED, **params, "output": out.replace("%t", "0"), "error": err.replace("%t", "0")}
    flags.update(extra)
    lines = ["#!/bin/bash", "", "# Parameters"]
    lines += [_sbatch_flag(k, flags[k]) for k in sorted(flags)]  # submitit's order: by its own key
    if setup:
        lines += ["", "# setup", *setup]
    srun = shlex.join(["srun", "--unbuffered", "--output", out, "--error", err])
    lines += ["", "# command", "export SUBMITIT_EXECUTOR=slurm", f"{srun} {command}", ""]
    return "\n".join(lines)


def build_executor(args: argparse.Namespace) -> submitit.Executor:
    if args.local:
        executor = submitit.AutoExecutor(folder=args.log_dir, cluster="local")
        executor.update_parameters(
            name=args.job_name,
            nodes=args.nodes,
            tasks_per_node=1,
            timeout_min=args.time_min,
            cpus_per_task=args.cpus_per_task,
            local_setup=_signal_exports(args.requeue_signal),
        )
        return executor
    # Named, not detected: detection would fall back to the local executor where sbatch is missing.
    executor = submitit.SlurmExecutor(folder=args.log_dir)
    executor.update_parameters(**slurm_parameters(args))
    return executor


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m retclip_dist.launch.submit",
        description="Submit RET-CLIP pretraining to Slurm with submitit (requeued on timeout/preemption).",
    )
    parser.add_argument("--config", required=True, help="YAML preset for retclip-train")
    parser.add_argument("--nodes", type=int, default=1, help="nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="training processes per node")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--time-min", type=int, default=24 * 60, help="time limit per job in minutes")
    parser.add_argument("--cpus-per-task", type=int, default=16, help="CPU cores per node (data loading)")
    parser.add_argument("--signal-delay-s", type=int, default=120, help="warning before the time limit")
    parser.add_argument(
        "--requeue-signal",
        help=f"signal sent --signal-delay-s before the time limit: USR1 or USR2 (default: ${REQUEUE_SIGNAL_ENV}, "
        f"else {short_name(DEFAULT_REQUEUE_SIGNAL)}; USR2 avoids NCCL versions that take USR1)",
    )
    parser.add_argument("--accelerate-config", default="configs/accelerate/multi_node.yaml")
    parser.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    parser.add_argument("--log-dir", default="logs/submitit", help="submitit's job folder (logs, pickles)")
    parser.add_argument("--job-name", default="retclip")
    parser.add_argument("--cpu", action="store_true", help="request no GPUs from Slurm (tests, CPU clusters)")
    parser.add_argument("--local", action="store_true", help="run with submitit's local executor, no Slurm")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then --section.key value ...")
    args = parser.parse_args(argv)
    if args.overrides and args.overrides[0] == "--":
        args.overrides = args.overrides[1:]
    try:
        args.requeue_signal = short_name(requeue_signal(args.requeue_signal))
    except ValueError as exc:
        parser.error(str(exc))  # exit code 2, as for any bad option
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run:
        # Check the config once before submitting: a bad field is one line here and exit code 2, not a
        # traceback per rank in the job's logs after it waited in the queue.
        from retclip_dist.train.cli import main as train_main

        world_size = str(args.nodes * args.gpus_per_node)
        resume = ["--checkpoint.resume", "auto"]  # what the job adds
        checked = train_main(
            ["--check", "--world-size", world_size, "--config", args.config, *args.overrides, *resume]
        )
        if checked != EXIT_OK:
            return checked  # EXIT_CONFIG, the line saying why already printed
    job = PretrainJob(
        args.config,
        args.overrides,
        args.accelerate_config,
        args.gpus_per_node,
        args.port,
        args.requeue_signal,
    )
    if args.dry_run:
        if args.local:
            print("--dry-run shows the sbatch script; it has no meaning with --local", file=sys.stderr)
            return EXIT_CONFIG
        # No executor: submitit's refuses to start where `srun` is missing, but the script needs no Slurm
        # (a user checks it on a laptop or a login node before going to the cluster).
        print(sbatch_script(slurm_parameters(args), args.log_dir, "<submitit task command>"))
        return EXIT_OK
    submitted = build_executor(args).submit(job)
    print(f"job {submitted.job_id}")
    print(f"stdout {submitted.paths.stdout}")
    print(f"stderr {submitted.paths.stderr}")
    sys.stdout.flush()
    if args.wait:
        submitted.result()
        print(f"job {submitted.job_id} finished")
    return EXIT_OK


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
