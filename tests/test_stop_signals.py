"""The stop-signal convention (retclip_dist/runtime/stop_signals.py) and the trainer's handler that uses it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from retclip_dist.runtime.stop_signals import REQUEUE_SIGNAL_ENV, requeue_signal, stop_signals
from retclip_dist.train.signals import StopRequest


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (REQUEUE_SIGNAL_ENV, "NCCL_PROXY_DUMP_SIGNAL", "NCCL_RMA_PROXY_DUMP_SIGNAL"):
        monkeypatch.delenv(name, raising=False)


def test_default_is_usr2_with_sigterm_and_the_other_user_signal_also_stops():
    assert stop_signals() == (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1)


@pytest.mark.parametrize("value", ["USR1", "SIGUSR1", "usr1", " USR1 "])
def test_env_picks_usr1_in_any_spelling(monkeypatch, value):
    monkeypatch.setenv(REQUEUE_SIGNAL_ENV, value)
    assert stop_signals() == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@pytest.mark.parametrize("value", ["HUP", "TERM", "12", "USR3"])
def test_other_signals_are_refused_naming_the_variable(monkeypatch, value):
    # torchrun's agent takes TERM/INT/HUP/QUIT itself (kills the ranks 30 s later), so only USR1/USR2.
    monkeypatch.setenv(REQUEUE_SIGNAL_ENV, value)
    with pytest.raises(
        ValueError, match=rf"^{REQUEUE_SIGNAL_ENV}: requeue signal '{value}' is not one of USR1 or USR2"
    ):
        stop_signals()


def test_a_signal_nccl_is_told_to_take_is_refused(monkeypatch):
    monkeypatch.setenv("NCCL_PROXY_DUMP_SIGNAL", str(int(signal.SIGUSR2)))
    with pytest.raises(ValueError, match=r"NCCL_PROXY_DUMP_SIGNAL=12 makes NCCL take SIGUSR2.*use USR1"):
        requeue_signal()
    assert requeue_signal("USR1") == signal.SIGUSR1  # the other one is fine
    monkeypatch.setenv(REQUEUE_SIGNAL_ENV, "USR1")
    assert stop_signals() == (signal.SIGTERM, signal.SIGUSR1)  # NCCL's USR2 is left to NCCL


def test_shell_launchers_get_the_name_or_one_line_and_status_2():
    def ask(**env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if k != REQUEUE_SIGNAL_ENV}
        cmd = [sys.executable, "-m", "retclip_dist.runtime.stop_signals"]
        return subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, timeout=30)

    assert ask().stdout == "USR2\n"
    assert ask(RETCLIP_REQUEUE_SIGNAL="sigusr1").stdout == "USR1\n"
    bad = ask(RETCLIP_REQUEUE_SIGNAL="HUP")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == "retclip: RETCLIP_REQUEUE_SIGNAL: requeue signal 'HUP' is not one of USR1 or USR2\n"


@pytest.mark.parametrize(("configured", "other"), [("USR1", signal.SIGUSR2), ("USR2", signal.SIGUSR1)])
def test_trainer_saves_on_sigterm_and_either_user_signal(monkeypatch, configured, other):
    # The other user signal stops too: a plain `sbatch --signal=USR1@120` must save, not kill the step.
    monkeypatch.setenv(REQUEUE_SIGNAL_ENV, configured)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        stop = StopRequest()
        for sig in (getattr(signal, f"SIG{configured}"), other, signal.SIGTERM):
            os.kill(os.getpid(), sig)
            assert stop.received == sig
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_user_signal_nccl_takes_is_left_to_it(monkeypatch):
    monkeypatch.setenv("NCCL_PROXY_DUMP_SIGNAL", str(int(signal.SIGUSR1)))
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        StopRequest()
        assert signal.getsignal(signal.SIGUSR1) is before[signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR2) is not before[signal.SIGUSR2]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_bad_requeue_signal_is_one_config_line_before_anything_starts(monkeypatch, capsys):
    from retclip_dist.train.cli import main

    monkeypatch.setenv(REQUEUE_SIGNAL_ENV, "HUP")
    assert main(["--check", "--config", "configs/tiny.yaml"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"retclip-train: {REQUEUE_SIGNAL_ENV}: requeue signal 'HUP' is not one of USR1 or USR2"
    ]
