"""Worker processes start from the fork server (retclip_dist/runtime/workers.py), never from a fork of a
process with other threads: they cannot deadlock in ``os.fork()``, ignore the stop signals, and die with
the process that started them.

The stress test is the reproduction of the hang: native threads that keep taking and dropping Python
thread states (as torch's and gloo's C++ threads do) while loaders start their workers. On Python 3.11
with workers forked from the loader's process, a child deadlocks inside ``os.fork()`` (CPython
gh-112275) within the first seconds; the loader then waits for it forever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process semantics")

ROOT = Path(__file__).resolve().parent.parent

# Every iteration starts a loader with 8 workers while 8 native threads (pthread_create through ctypes,
# each running a Python callback, so a thread state is made without the GIL) come and go. It runs for
# STRESS_S seconds and prints how many loaders it started.
_STRESS = textwrap.dedent(
    """
    import ctypes, ctypes.util, sys, threading, time
    import torch
    from retclip_dist.data.config import DataConfig
    from retclip_dist.data.loader import data_loader, guarded

    class One(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield 1

    def main(seconds, workers):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        start_routine = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(lambda arg: None)
        stop = threading.Event()

        def churn():
            tid = ctypes.c_ulong()
            while not stop.is_set():
                libc.pthread_create(ctypes.byref(tid), None, start_routine, None)
                libc.pthread_join(tid, None)

        for _ in range(8):
            threading.Thread(target=churn, daemon=True).start()
        cfg = DataConfig(num_workers=workers, pin_memory=False)
        list(guarded(data_loader(One(), cfg), "warm-up"))  # the fork server starts once per process
        print("started", flush=True)
        loaders, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert list(guarded(data_loader(One(), cfg), "stress")) == [1] * workers
            loaders += 1
        stop.set()
        print("loaders", loaders, flush=True)

    if __name__ == "__main__":
        main(float(sys.argv[1]), int(sys.argv[2]))
    """
)
# Measured with workers forked from the loader's process (the code before the fork server): 4 runs of 4
# hung within 40 s on 2 busy cores; 8 workers and OpenMP left at its default make the hang come soonest.
STRESS_S = 30


@pytest.mark.slow
def test_hundreds_of_worker_starts_beside_thread_churn_never_hang(tmp_path):
    script = tmp_path / "stress.py"
    script.write_text(_STRESS)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONWARNINGS"] = "ignore"
    # Its own session: a deadlocked child of the old code would outlive the test otherwise.
    proc = subprocess.Popen(
        [sys.executable, str(script), str(STRESS_S), "8"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=STRESS_S + 150)  # + the fork server's start on a loaded machine
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"loader starts hung (a worker stuck in os.fork?):\n{out[-3000:]}")
    finally:
        _kill_group(proc.pid)
    assert proc.returncode == 0, out[-3000:]
    loaders = int(out.split("loaders ")[1].split()[0])
    assert loaders >= 10, out[-3000:]  # 80+ worker starts beside the churn


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# --- what the workers keep from the fork they replace --------------------------------------------------

_LIFETIME = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    from retclip_dist.data.config import DataConfig
    from retclip_dist.data.loader import data_loader

    class Report(torch.utils.data.IterableDataset):
        def __iter__(self):
            status = open(f"/proc/{os.getpid()}/status").read()
            blocked = int(next(l for l in status.splitlines() if l.startswith("SigBlk:")).split()[1], 16)
            ignored = int(next(l for l in status.splitlines() if l.startswith("SigIgn:")).split()[1], 16)
            yield {"pid": os.getpid(), "ppid": os.getppid(), "blocked": blocked, "ignored": ignored}
            time.sleep(600)

    if __name__ == "__main__":
        it = iter(data_loader(Report(), DataConfig(num_workers=1, pin_memory=False)))
        row = next(it)
        print(row["pid"], row["ppid"], row["blocked"], row["ignored"], flush=True)
        time.sleep(600)
    """
)


def _mask(*signals: int) -> int:
    return sum(1 << (int(s) - 1) for s in signals)


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


@pytest.mark.slow
def test_workers_ignore_the_stop_signals_and_die_with_their_rank(tmp_path):
    script = tmp_path / "lifetime.py"
    script.write_text(_LIFETIME)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rank = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        worker, server, blocked, ignored = (int(v) for v in rank.stdout.readline().split())
        stops = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
        assert ignored & _mask(*stops) == _mask(*stops)  # ignored, and no longer blocked (nothing pending)
        assert blocked & _mask(*stops) == 0
        # The server is a child of the rank that runs one thread, so its forks cannot deadlock.
        assert Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(rank.pid)
        assert _threads(server) == 1
        for sig in stops:  # what Slurm sends every process of the job: the worker and the server live on
            os.kill(worker, sig)
            os.kill(server, sig)
        time.sleep(0.5)
        assert not _gone(worker) and not _gone(server)
        os.kill(rank.pid, signal.SIGKILL)  # the rank dies without any cleanup
        rank.wait()
        deadline = time.monotonic() + 10
        while not (_gone(worker) and _gone(server)):
            assert time.monotonic() < deadline, "the worker or the fork server outlived its rank"
            time.sleep(0.05)
    finally:
        _kill_group(rank.pid)
