"""Where every worker process of the package comes from: a fork server, never a fork of a busy process.

Forking a process that runs other threads can leave the child deadlocked inside ``os.fork()``: on
Python 3.11 a thread that holds the interpreter's thread-list lock at that instant (a C++ thread taking a
Python thread state, as torch's and gloo's do) leaves the child waiting for it forever in
``PyOS_AfterFork_Child`` (CPython gh-112275, fixed in later releases). A trainer always has such threads
(the run lock's heartbeat, tqdm's monitor, tracker writers, the previous loader's queue threads, torch's),
and make-shards forked its pool under a live progress bar; a worker that never starts stalls its rank.
So the training, validation and probe loaders and make-shards' pool start their workers from
multiprocessing's *forkserver*: a fresh interpreter started with exec (nothing inherited but file
descriptors), which imports the data stack once (``LOADER_PRELOAD``, or make-shards' ``POOL_PRELOAD``)
and forks every worker from its single thread.

What the workers keep from the direct fork they replace:

- the stop signals never reach them (the trainer saves first, see ``runtime/stop_signals.py``): the server
  is started with them blocked, every worker inherits that mask, and ``WorkerSetup`` ignores them before
  unblocking them. The resource tracker that multiprocessing starts beside the server is started the same
  way (it ignores SIGTERM by itself; a user signal would otherwise kill it);
- they die with their rank, not only with their parent (the server, which a live worker keeps alive):
  ``exit_with_process`` watches the rank's pid, and ``exit_with_parent`` the server's. The server exits by
  itself once the rank and its workers are gone (its pipe from them closes);
- the log format of the rank, handed over explicitly (a forked worker inherited it);
- byte-identical batches: a worker's data depends only on its pickled dataset and the seeds torch hands
  each worker, whatever the start method.

What differs: a worker is built from the pickled dataset, not a copy of the rank's memory, so everything
it uses must pickle (module-level classes; a script's dataset needs its ``if __name__ == "__main__"``
guard, since workers import the script), and it sees the environment variables the rank had when the
server started (the trainer starts it first thing; it changes none after).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.pool
import multiprocessing.resource_tracker
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from retclip_dist.runtime import stacks
from retclip_dist.runtime.lifetime import exit_with_parent, exit_with_process
from retclip_dist.runtime.stop_signals import LAUNCHER_IGNORES

# What the fork server imports once, so that each worker starts with it loaded instead of importing it
# again: the loaders' data stack (the tokenizer's module matters most: transformers imports its tokenizer
# classes lazily, and unpickling a worker's tokenizer would import them in every worker, 1.7 s each
# here), or make-shards' image pipeline. One server per process: the first caller's list is the one.
LOADER_PRELOAD = ("retclip_dist.data.loader", "retclip_dist.data.validation", "retclip_dist.model.tokenizer")
POOL_PRELOAD = ("retclip_dist.shards.build",)
_started = threading.Lock()


def worker_context(preload: tuple[str, ...] = LOADER_PRELOAD) -> multiprocessing.context.BaseContext:
    """The multiprocessing context every worker process of the package is started from (a running fork
    server that imported ``preload``, started on first use)."""
    context = multiprocessing.get_context("forkserver")
    with _started:
        context.set_forkserver_preload(list(preload))  # read when the server starts, ignored after
        # Blocked while the two helper processes are exec'd: a signal mask survives exec, so they and every
        # worker the server forks start with the stop signals held back (see the module docstring).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, LAUNCHER_IGNORES)
        try:
            multiprocessing.resource_tracker.ensure_running()
            # The tracker's own start unblocks SIGTERM in this thread again (it protects itself from it).
            signal.pthread_sigmask(signal.SIG_BLOCK, LAUNCHER_IGNORES)
            multiprocessing.forkserver.ensure_running()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return context


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker takes from the process that starts it, applied first thing in the worker (a
    DataLoader's ``worker_init_fn``). Picklable: it travels to the fork server with the worker."""

    stops: tuple[int, ...]  # signals the worker ignores (the trainer's stop signals)
    owner: int  # pid of the process the worker must not outlive (the rank)
    log_level: int  # the owner's root log level
    log_format: logging.Formatter | None  # the owner's log line format (None: logging's default)
    stack_dir: str | None  # where the owner's watchdog collects stacks on a stall (None: no watchdog)

    @classmethod
    def of_this_process(cls, stops: tuple[int, ...]) -> WorkerSetup:
        root = logging.getLogger()
        # A plain Formatter pickles; a tool's own (pytest's holds its terminal) may not, and is left out.
        formats = [h.formatter for h in root.handlers if type(h.formatter) is logging.Formatter]
        return cls(
            stops=tuple(int(s) for s in stops),
            owner=os.getpid(),
            log_level=root.level,
            log_format=formats[0] if formats else None,
            stack_dir=stacks.collecting_dir(),
        )

    def __call__(self, worker_id: int = 0) -> None:
        for sig in self.stops:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.stops)  # blocked since the server started
        # Ignoring SIGTERM also means multiprocessing cannot terminate them: they must go with the trainer.
        exit_with_parent()
        exit_with_process(self.owner)
        handler = logging.StreamHandler(sys.stderr)
        if self.log_format is not None:
            handler.setFormatter(self.log_format)
        logging.basicConfig(level=self.log_level, handlers=[handler], force=True)
        if self.stack_dir is not None:
            stacks.answer_dumps(self.stack_dir)


def process_pool(
    processes: int, initializer: Callable[..., None], initargs: tuple[Any, ...]
) -> multiprocessing.pool.Pool:
    """A ``multiprocessing.Pool`` whose workers come from the fork server (make-shards' image workers).

    Unlike loader workers they keep the default signal actions, so that ``Pool.terminate`` (an error, a
    Ctrl-C) still ends them, and they die with the process that made the pool.
    """
    return worker_context(POOL_PRELOAD).Pool(processes, _pool_worker, (os.getpid(), initializer, initargs))


def _pool_worker(owner: int, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, LAUNCHER_IGNORES)  # blocked since the server started
    exit_with_process(owner)
    initializer(*initargs)
