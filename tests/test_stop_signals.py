"""The stop-signal convention (retclip_dist/launch/stop_signals.py) and the trainer's handler that uses it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from retclip_dist.launch.stop_signals import REQUEUE_SIGNAL_ENV, requeue_signal, stop_signals
from retclip_dist.train.signals import StopRequest


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (REQUEUE_SIGNAL_ENV, "NCCL_PROXY_DUMP_SIGNAL", "NCCL_RMA_PROXY_DUMP_SIGNAL"):
        monkeypatch.delenv(name, raising=False)


def test_default_is_usr2_with_sigterm():
    assert stop_signals() == (signal.SIGTERM, signal.SIGUSR2)


@pytest.mark.parametrize("value", ["USR1", "SIGUSR1", "usr1", " USR1 "])
def test_env_picks_usr1_in_any_spelling(monkeypatch, value):
    monkeypatch.setenv(REQUEUE_SIGNAL_ENV, value)
    assert stop_signals() == (signal.SIGTERM, signal.SIGUSR1)


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


def test_shell_launchers_get_the_name_or_one_line_and_status_2():
    def ask(**env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if k != REQUEUE_SIGNAL_ENV}
        cmd = [sys.executable, "-m", "retclip_dist.launch.stop_signals"]
        return subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, timeout=30)

    assert ask().stdout == "USR2\n"
    assert ask(RETCLIP_REQUEUE_SIGNAL="sigusr1").stdout == "USR1\n"
    bad = ask(RETCLIP_REQUEUE_SIGNAL="HUP")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == "retclip: RETCLIP_REQUEUE_SIGNAL: requeue signal 'HUP' is not one of USR1 or USR2\n"


@pytest.mark.parametrize(("configured", "other"), [("USR1", signal.SIGUSR2), ("USR2", signal.SIGUSR1)])
def test_trainer_handles_sigterm_and_the_configured_signal_only(monkeypatch, configured, other):
    monkeypatch.setenv(REQUEUE_SIGNAL_ENV, configured)
    wanted = getattr(signal, f"SIG{configured}")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        stop = StopRequest()
        assert signal.getsignal(other) is before[other]  # left as it was
        os.kill(os.getpid(), wanted)
        assert stop.received == wanted
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
