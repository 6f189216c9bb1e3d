"""A thread per rank that ends the rank, with the reason, when it stops making progress.

The trainer tells the watchdog which phase it is in and each time it makes progress (a batch arrives, a
step or a validation batch is done, any forward pass of the model). Two kinds of phase:

- ``WORK``: the rank's own work (waiting for its data, validation, the probe on rank 0, writing a
  checkpoint, setting up). Limit: ``train.stall_timeout_s`` without progress.
- ``WAIT``: the rank may be waiting for other ranks (a training step with its collectives, a barrier
  while another rank saves or probes, the first step, which compiles). Limit: the stall timeout plus
  ``train.collective_timeout_s`` plus a minute: a rank that waits gives the rank it waits for the time to
  report itself, and the process group's own timeout (``collective_timeout_s``) the time to fail the
  collective with its error first. The watchdog is the backstop there, e.g. for a deadlock.

On a stall it writes the Python stacks of every thread of the rank and of its loader workers to the log
(stderr), then one line: the rank, how long, the phase, the stuck frame (and the shard a worker was
reading), and what the other ranks' health records say; it records the exit in the rank's health record
and ends the process with ``EXIT_STALLED`` (or ``EXIT_PEER_LOST`` when another rank went silent), which
both launchers requeue. It exits from its own thread with ``os._exit``: the main thread may be blocked
for good (a read from a hung mount, a collective), so nothing else could end the process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from retclip_dist.exit_codes import EXIT_PEER_LOST, EXIT_STALLED
from retclip_dist.runtime import stacks
from retclip_dist.runtime.health import HEARTBEAT_S, Health, describe_peers

WORK = "work"  # the rank's own work: limit stall_timeout_s
WAIT = "wait"  # may be waiting for other ranks: limit stall_timeout_s + collective_timeout_s + WAIT_MARGIN_S
WAIT_MARGIN_S = 60.0


@dataclass(frozen=True)
class Limits:
    stall_s: float  # train.stall_timeout_s (> 0: the watchdog runs)
    collective_s: float  # train.collective_timeout_s

    def of(self, kind: str) -> float:
        if kind == WORK:
            return self.stall_s
        return self.stall_s + self.collective_s + WAIT_MARGIN_S

    @property
    def long_wait_s(self) -> float:
        """How long a rank waits for one rank's solo work (probe, writes): the WAIT limit, or torch's
        default 30 minutes without a watchdog, which alone bounds the work then."""
        return self.of(WAIT) if self.stall_s > 0 else 1800.0


class Watchdog:
    """Started with ``start()``, told ``phase``/``beat`` by the trainer, ended with ``stop()``."""

    def __init__(
        self,
        limits: Limits,
        rank: int,
        world: int,
        health: Health,
        before_exit: Callable[[], None] | None = None,
    ) -> None:
        self.limits = limits
        self.rank = rank
        self.world = world
        self.health = health
        self.before_exit = before_exit  # e.g. release the run lock: the process ends without cleanup
        self.name, self.kind = "setting up", WORK
        self.progress_at = time.monotonic()
        self.progress_wall = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dir: str | None = None

    # --- what the trainer calls ----------------------------------------------------------------------

    def start(self) -> Watchdog:
        """Start the thread: the rank's health heartbeat always, the stall check with a stall timeout."""
        self._dir = stacks.start_collecting()
        stacks.answer_dumps(self._dir, "rank", dump=False)  # the shard a read in this process is stuck on
        self.health.write(self.name, self.progress_wall)
        self._thread = threading.Thread(target=self._run, name="retclip-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self) -> None:
        """Progress: the clock of the current phase starts again."""
        with self._lock:
            self.progress_at, self.progress_wall = time.monotonic(), time.time()

    def set_phase(self, name: str, kind: str) -> None:
        with self._lock:
            self.name, self.kind = name, kind
            self.progress_at, self.progress_wall = time.monotonic(), time.time()

    @contextlib.contextmanager
    def phase(self, name: str, kind: str) -> Iterator[None]:
        """``name`` for the duration of the block, then the phase before it (its clock starts again)."""
        before = self.name, self.kind
        self.set_phase(name, kind)
        try:
            yield
        finally:
            self.set_phase(*before)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # --- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        next_beat = time.monotonic() + HEARTBEAT_S
        while not self._stop.wait(1.0):
            with self._lock:
                name, kind, since, wall = self.name, self.kind, self.progress_at, self.progress_wall
            now = time.monotonic()
            if self.limits.stall_s > 0 and now - since > self.limits.of(kind):
                self._stalled(name, kind, now - since)
            if now >= next_beat:
                self.health.write(name, wall)
                next_beat = now + HEARTBEAT_S

    def _stalled(self, name: str, kind: str, idle_s: float) -> None:
        own = stacks.own_stacks()
        workers = self._worker_stacks()
        print(f"retclip-train: rank {self.rank}: stacks of every thread:\n{own}", file=sys.stderr, flush=True)
        for w in workers:
            text = w.text or "(no answer: stuck outside Python with the interpreter lock held?)\n"
            print(f"retclip-train: rank {self.rank}: loader worker pid {w.pid}:\n{text}", file=sys.stderr)
        where = self._where(own, workers)
        peers = (
            describe_peers(self.health.path.parent.parent, self.world, self.rank) if self.world > 1 else ""
        )
        code = EXIT_PEER_LOST if peers.startswith("lost contact") else EXIT_STALLED
        setting = "train.stall_timeout_s" if kind == WORK else "train.stall_timeout_s + collective_timeout_s"
        line = (
            f"rank {self.rank}: no progress for {idle_s:.0f} s while {name} (limit {self.limits.of(kind):.0f} s, "
            f"{setting}); {where}" + (f"; {peers}" if peers else "")
        )
        print(f"retclip-train: {line}", file=sys.stderr, flush=True)
        self.health.exit(code, line, phase=name)
        if self.before_exit is not None:
            with contextlib.suppress(Exception):
                self.before_exit()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    def _worker_stacks(self) -> list[stacks.WorkerStacks]:
        try:
            pids = [p.pid for p in multiprocessing.active_children() if p.pid is not None]
        except Exception:  # the main thread may be changing the list of children right now
            pids = []
        return stacks.ask_workers(pids, self._dir) if self._dir is not None else []

    def _where(self, own: str, workers: list[stacks.WorkerStacks]) -> str:
        main = stacks.main_thread_frames(own)
        shard = stacks.ask_main_thread(self._dir, "rank") if self._dir is not None else None
        parts = [f"main thread at {stacks.stuck_at(main)}" + (f", reading shard {shard}" if shard else "")]
        for w in workers:
            frames = stacks.worker_frames(w.text)
            at = stacks.stuck_at(frames) if frames else "no answer"
            shard = f", reading shard {w.shard}" if w.shard else ""
            parts.append(f"loader worker pid {w.pid} at {at}{shard}")
        return "; ".join(parts)
