"""Processes that must not outlive the process that started them: ranks and loader workers.

torchrun starts each rank in its own session, so killing ``accelerate launch`` (``kill -9`` of its
process group, as a scheduler or a closed terminal does) reaches none of them, and loader workers ignore
the stop signals so that a preempted trainer can still save. Both ask the kernel to kill them when their
parent goes (Linux ``PR_SET_PDEATHSIG``); elsewhere a thread watches the parent pid. Loader workers,
started by a fork server (retclip_dist/runtime/workers.py), watch their rank as well: their parent is
the server, which outlives the rank for as long as any of its children holds its pipe open.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 1.0  # parent check interval where there is no prctl


def _prctl_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, sig: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_POLL_S)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def exit_with_process(pid: int, sig: int = signal.SIGKILL) -> None:
    """Have this process receive ``sig`` as soon as process ``pid`` (any process, not only the parent)
    exits. A daemon thread waits on a pidfd (Linux 5.3+) and wakes the moment it goes; elsewhere it
    polls every second."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), sig)  # already gone
        return
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has exited
        else:
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
                time.sleep(_POLL_S)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()


def exit_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have this process receive ``sig`` as soon as its parent process exits, for whatever reason.

    SIGKILL by default: a rank or worker whose launcher is gone has nobody to report to, and checkpoints
    are atomic, so the next run resumes from the last complete one.
    """
    parent = os.getppid()
    if not _prctl_pdeathsig(sig):
        _watch_parent(parent, sig)
    # The parent may have gone between starting us and the call above; then no death signal will come.
    if os.getppid() != parent:
        with contextlib.suppress(ProcessLookupError):
            os.kill(os.getpid(), sig)
