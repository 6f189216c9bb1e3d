"""One run per ``output_dir``: a lock file that names its holder, with a heartbeat for shared filesystems.

``output_dir/run.lock`` holds the holder's host, pid, process start time and when it started. The main
process of a run (fresh or resumed) takes it before writing anything and removes it on exit: normal, an
error, or a stop signal. A lock is stale, and is taken over with a warning, when its holder is gone:

- on the same host, when the pid no longer runs (or now belongs to another process: the start times
  differ). An ``flock`` on the file is taken as well, where the filesystem supports it; the kernel drops
  it when the holder dies, whatever the signal.
- when it was taken by an earlier run of the same Slurm job (the job was requeued): Slurm starts a
  requeued job only after every process of the previous one has ended.
- from another host, pids cannot be checked, so the holder refreshes the file's mtime every
  ``HEARTBEAT_S`` seconds and the lock is stale when the mtime is older than ``STALE_AFTER_S``. Clocks of
  the nodes must agree to well within that (NTP does).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retclip_dist.runtime.env import slurm_job

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0  # how often the holder touches the lock file
STALE_AFTER_S = 300.0  # a lock from another host untouched this long belongs to a dead run


class RunLocked(RuntimeError):
    """Another live run holds the lock on this output_dir."""


@dataclass(frozen=True)
class Holder:
    host: str  # hostname of the holder
    pid: int  # process id on that host
    started: str  # ISO time the holder took the lock
    proc_start: str | None = None  # kernel start time of the pid (Linux), to tell a reused pid apart
    slurm_job: str | None = None  # JOBID.RESTARTS under Slurm

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may contain spaces), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _proc_start(pid: int) -> str | None:
    stat = _stat(pid)
    return stat[19] if stat else None  # field 22, starttime


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _stat(pid)
    # A killed process whose parent died too stays a zombie until something reaps it: it runs no more.
    return stat is None or stat[0] not in ("Z", "X")


def me() -> Holder:
    return Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        proc_start=_proc_start(os.getpid()),
        slurm_job=slurm_job(),
    )


def read_holder(path: Path) -> Holder | None:
    try:
        data: Any = json.loads(path.read_text())
        return Holder(**data)
    except (OSError, ValueError, TypeError):
        return None


def stale_reason(holder: Holder, mtime: float, now: float | None = None) -> str | None:
    """Why ``holder``'s lock is stale, or None when its run may still be going."""
    mine = slurm_job()
    earlier = holder.slurm_job is not None and mine is not None and holder.slurm_job != mine
    if earlier and holder.slurm_job.split(".")[0] == mine.split(".")[0]:
        return f"it was taken by run {holder.slurm_job} of this requeued Slurm job"
    if holder.host == socket.gethostname():
        if not _alive(holder.pid):
            return f"pid {holder.pid} is not running"
        current = _proc_start(holder.pid)
        if holder.proc_start is not None and current is not None and current != holder.proc_start:
            return f"pid {holder.pid} is now another process"
        return None
    age = (time.time() if now is None else now) - mtime
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_S:.0f} s)"
    return None


def check(output_dir: str | Path) -> None:
    """Raise RunLocked when a live run holds ``output_dir``; takes nothing (for pre-flight checks)."""
    path = Path(output_dir) / LOCK_NAME
    holder = read_holder(path)
    if holder is None or (holder.pid == os.getpid() and holder.host == socket.gethostname()):
        return
    with contextlib.suppress(FileNotFoundError):
        if stale_reason(holder, path.stat().st_mtime) is None:
            raise RunLocked(_locked_message(path, holder))


def _locked_message(path: Path, holder: Holder) -> str:
    return (
        f"output_dir: {path.parent} is in use by another run ({holder.describe()}; lock {path}); "
        "wait for it to end or stop it, or choose another --output_dir"
    )


class RunLock:
    """The lock on one output_dir, held by this process from ``acquire()`` to ``release()``."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.holder = me()
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = read_holder(self.path) or Holder("an unknown host", -1, "at an unknown time")
                raise RunLocked(_locked_message(self.path, holder)) from None
            except OSError:
                pass  # a filesystem without flock: the holder record and its heartbeat decide alone
            # A holder that was releasing may have unlinked the file we opened; lock the current one.
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == self.path.stat().st_ino:
                    break
            os.close(fd)
        try:
            self._take_over_if_stale()
        except RunLocked:
            os.close(fd)
            raise
        self._fd = fd
        # Written in place: the flock belongs to this file, a renamed-over one would not carry it.
        record = json.dumps(asdict(self.holder), sort_keys=True).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _take_over_if_stale(self) -> None:
        holder = read_holder(self.path)
        if holder is None or holder.pid == -1:
            return
        reason = stale_reason(holder, self.path.stat().st_mtime)
        if reason is None:
            raise RunLocked(_locked_message(self.path, holder))
        log.warning("taking over the stale run lock %s of %s: %s", self.path, holder.describe(), reason)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock file if it is still ours; safe to call twice."""
        self._stop.set()
        if self._fd is None:
            return
        if read_holder(self.path) == self.holder:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
