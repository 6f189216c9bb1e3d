"""The signals that mean "save a checkpoint and stop": one home for launchers, trainer and loader workers.

Two signals stop a run: SIGTERM (Slurm's preemption, ``scancel``, torchrun passing one on) and the
*requeue signal*, which the launchers send ahead of a time limit. The requeue signal is SIGUSR2 unless
``RETCLIP_REQUEUE_SIGNAL`` names SIGUSR1 (``USR1``, ``SIGUSR1`` or ``usr1``). Everything reads it from
here: the trainer's handler (``train/signals.py``), the loader workers that ignore both
(``data/loader.py``), ``launch/pretrain.sh`` and ``launch/node.sh`` (through ``python -m
retclip_dist.runtime.stop_signals``, which prints the name or one line and exit code 2), and the submitit
launcher (``launch/submit.py``, which also hands it to submitit as ``SUBMITIT_PREEMPT_SIGNAL``).

Why USR2 by default, checked against the stack this project runs on (torch 2.14, accelerate 1.15,
DeepSpeed 0.19, NCCL 2.30 from the nvidia-nccl-cu13 wheel):

- NCCL's mid-2022 release (2.12) caught SIGUSR1 in its proxy thread to print its state, so a requeue
  signal of USR1 never reached the trainer (NVIDIA/nccl issue 704). The releases since make it opt-in:
  ``NCCL_PROXY_DUMP_SIGNAL`` (and, in the 2.30 we ship, ``NCCL_RMA_PROXY_DUMP_SIGNAL``) name the signal,
  none by default. A cluster image or LD_LIBRARY_PATH with that older NCCL would still take USR1.
- submitit moved its own requeue signal from USR1 to USR2 for that reason (its pull request 1697;
  ``SUBMITIT_PREEMPT_SIGNAL`` overrides it). With USR2 both launchers use one signal.
- torchrun's agent (the process ``accelerate launch`` becomes) handles SIGTERM, SIGINT, SIGHUP and SIGQUIT
  (``--signals-to-handle``, ``TORCHELASTIC_SIGNALS_TO_HANDLE``): it sends the signal on to the ranks and
  kills them after its shutdown timeout (30 s). That rules those out as a requeue signal that must wait
  for a save; USR1 and USR2 it leaves alone unless told otherwise.
- torch's own C++ fatal-signal handler borrows SIGUSR2 only while it prints every thread's stack after a
  crash (off unless enabled, as torch's own tests do); RCCL proposed a SIGUSR2 stack dump (ROCm/rccl
  pull request 584). On such a stack, set ``RETCLIP_REQUEUE_SIGNAL=USR1``.
- Measured here on CPU: after importing torch, accelerate, DeepSpeed, transformers and timm, a gloo
  all-reduce and a DataLoader with workers, a rank catches only SIGINT and SIGCHLD.

A requeue signal that ``NCCL_PROXY_DUMP_SIGNAL`` also names is refused: NCCL's handler would replace the
trainer's, and the run would be killed at the time limit without saving.

The launchers send only the requeue signal, but every process that must survive until the save (trainer,
loader workers, node.sh) treats *both* user signals as stop signals: a job can still get the other one
(``sbatch --signal=USR1@120`` without ``B:``, a hand-typed ``scancel --signal``), and its default action
would kill the whole step unsaved. Nothing in the stack wants them otherwise (see above).
"""

from __future__ import annotations

import os
import signal
import sys

from retclip_dist.exit_codes import EXIT_CONFIG, EXIT_OK

REQUEUE_SIGNAL_ENV = "RETCLIP_REQUEUE_SIGNAL"
DEFAULT_REQUEUE_SIGNAL = signal.SIGUSR2
# The two signals Slurm, submitit and torchrun leave to the application (see the module docstring).
REQUEUE_CHOICES = (signal.SIGUSR1, signal.SIGUSR2)
# What a launcher between the job and the trainer ignores so that it cannot die mid-save: every stop
# signal, whatever NCCL may take in the ranks (it holds no NCCL; node.sh spells the same in shell).
LAUNCHER_IGNORES = (signal.SIGTERM, *REQUEUE_CHOICES)
# NCCL's opt-in debug dumps on a signal (by number), which must not be the requeue signal.
_NCCL_DUMP_ENVS = ("NCCL_PROXY_DUMP_SIGNAL", "NCCL_RMA_PROXY_DUMP_SIGNAL")


def _nccl_takes(sig: signal.Signals, *envs: str) -> bool:
    """Whether NCCL is told to dump its state on ``sig`` (by any of ``envs``, default all)."""
    return any(os.environ.get(env, "").strip() == str(int(sig)) for env in envs or _NCCL_DUMP_ENVS)


def short_name(sig: signal.Signals) -> str:
    """``USR2`` for SIGUSR2: the spelling of ``sbatch --signal``, ``scancel --signal`` and ``trap``."""
    return sig.name.removeprefix("SIG")


def parse_signal(name: str) -> signal.Signals:
    """``USR1``/``SIGUSR1``/``usr1`` (or USR2) to the signal; ValueError naming the choices otherwise."""
    wanted = name.strip().upper()
    for sig in REQUEUE_CHOICES:
        if wanted in (sig.name, short_name(sig)):
            return sig
    choices = " or ".join(short_name(s) for s in REQUEUE_CHOICES)
    raise ValueError(f"requeue signal {name!r} is not one of {choices}")


def requeue_signal(name: str | None = None) -> signal.Signals:
    """The requeue signal: ``name`` if given, else ``RETCLIP_REQUEUE_SIGNAL``, else SIGUSR2.

    ValueError (one line, naming the variable or the NCCL setting in the way) if it cannot be used.
    """
    value = os.environ.get(REQUEUE_SIGNAL_ENV, "") if name is None else name
    try:
        sig = parse_signal(value) if value.strip() else DEFAULT_REQUEUE_SIGNAL
    except ValueError as exc:
        raise ValueError(f"{REQUEUE_SIGNAL_ENV}: {exc}" if name is None else str(exc)) from None
    for env in _NCCL_DUMP_ENVS:
        if _nccl_takes(sig, env):
            other = next(s for s in REQUEUE_CHOICES if s != sig)
            raise ValueError(
                f"{env}={int(sig)} makes NCCL take SIG{short_name(sig)}, the requeue signal; "
                f"use {short_name(other)} ({REQUEUE_SIGNAL_ENV}={short_name(other)}, "
                f"sbatch --signal=B:{short_name(other)}@120)"
            )
    return sig


def stop_signals() -> tuple[signal.Signals, ...]:
    """Every signal that means "save and stop": SIGTERM and both user signals, the requeue signal first.

    The launchers send only the requeue signal, but a job may get the other one too (a plain
    ``sbatch --signal=USR1@120``, a habit from older recipes, or a hand-typed ``scancel --signal``): left
    at its default action it would kill every process without a save. A user signal that
    ``NCCL_PROXY_DUMP_SIGNAL`` gives to NCCL is left to NCCL. ValueError as ``requeue_signal``.
    """
    requeue = requeue_signal()
    other = [s for s in REQUEUE_CHOICES if s != requeue and not _nccl_takes(s)]
    return (signal.SIGTERM, requeue, *other)


def main() -> int:
    """Print the requeue signal's short name for the shell launchers, or one line on stderr and exit 2."""
    try:
        print(short_name(requeue_signal()))
    except ValueError as exc:
        print(f"retclip: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
