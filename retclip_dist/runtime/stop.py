"""The trainer's answer to a stop signal, installed before anything else runs (stdlib only).

The stop signals (``runtime/stop_signals.py``: SIGTERM and both user signals) mean "save and leave".
``StopRequest`` records the first one. Outside setup the trainer looks at the record at safe points
(after each step, each validation batch, each probe forward, after saves) and every rank stops after
the same one. During setup (model build, data, checkpoint load) nothing needs saving yet, so a stop
signal there ends setup at once: the handler raises ``StoppedInSetup`` in the main thread, which the
trainer turns into exit code 3 (requeue, resume from the same checkpoint) well within Slurm's warning
window, however long the model or the checkpoint would still have taken to load.

``python -m retclip_dist.train`` installs it (``catch_early``) before importing torch, so a signal that
arrives while the trainer is still importing is not lost; the trainer then adopts that record.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import types
from collections.abc import Iterator

from retclip_dist.runtime.stop_signals import stop_signals


class StoppedInSetup(BaseException):  # like KeyboardInterrupt: no ``except Exception`` takes it
    """A stop signal arrived while the trainer was setting up; nothing needed saving."""

    def __init__(self, signum: int, stage: str) -> None:
        self.name = signal.Signals(signum).name
        super().__init__(f"{self.name} during {stage}")
        self.signum = signum
        self.stage = stage


class StopRequest:
    """The latest stop signal received since installation (``received``; None: none yet)."""

    def __init__(self, signals: tuple[int, ...] | None = None) -> None:
        self.received: int | None = None
        self.stage: str | None = None  # the setup stage running now (None: not in setup)
        for sig in stop_signals() if signals is None else signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.received = signum
        if self.stage is not None:
            stage, self.stage = self.stage, None  # raised once; cleanup code runs undisturbed
            raise StoppedInSetup(signum, stage)

    def enter_setup(self, stage: str) -> None:
        """From now until ``end_setup``, a stop signal raises ``StoppedInSetup`` in the main thread; so does
        one already received. ``stage`` (reassign it as setup goes on) names where it came."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("setup runs in the main thread, where signal handlers run")
        if self.received is not None:
            raise StoppedInSetup(self.received, stage)
        self.stage = stage

    def end_setup(self) -> None:
        self.stage = None


_early: StopRequest | None = None


def catch_early() -> None:
    """Install the stop handler now (once per process); ``adopt()`` hands it over later.

    A bad ``RETCLIP_REQUEUE_SIGNAL`` is left for the trainer's config check to report in its one line.
    """
    global _early
    if _early is None:
        with contextlib.suppress(ValueError):
            _early = StopRequest()


def adopt() -> StopRequest:
    """The request ``catch_early`` installed, or a new one (ValueError for a bad requeue signal)."""
    return _early if _early is not None else StopRequest()


@contextlib.contextmanager
def early_setup(stage: str) -> Iterator[None]:
    """While ``stage`` runs before the trainer adopts the early request (the config check, which reads the
    checkpoint to resume): a stop signal ends it with ``StoppedInSetup``, as in the trainer's own setup."""
    if _early is None:
        yield
        return
    _early.enter_setup(stage)
    try:
        yield
    finally:
        _early.end_setup()
