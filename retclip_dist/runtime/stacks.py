"""The Python stacks of a stuck rank and of its loader workers, and the frame that says where it is stuck.

A worker is another process: the rank's watchdog cannot read its frames, so each worker answers a signal
(``STACK_SIGNAL``, a real-time signal nothing else in the stack uses) by writing its stacks into the
watchdog's directory. The dump itself is ``faulthandler``'s, written from the signal handler, so it comes
even from a worker blocked in a read that never returns; a Python-level handler chained after it adds the
shard the worker was reading where a frame holds one (it runs once the blocked call is interrupted, which
a read from a hung mount is).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import signal
import sysconfig
import tempfile
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path

from retclip_dist.shardset import ShardInfo

# SIGRTMIN+4: real-time signals have no default use; none of torch, gloo, NCCL or submitit takes it.
# None where the platform has no real-time signals: workers are then not asked for their stacks.
STACK_SIGNAL: int | None = signal.SIGRTMIN + 4 if hasattr(signal, "SIGRTMIN") else None
_PACKAGE = str(Path(__file__).resolve().parent.parent)  # frames of our own code, for the stuck frame
_STDLIB = sysconfig.get_paths()["stdlib"] + "/"  # shown as "selectors.py:415", not the full path
_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-f]+)")
_CURRENT = re.compile(r"^Current thread (0x[0-9a-f]+)", re.MULTILINE)

_collecting: str | None = None  # the watchdog's directory while one runs in this process
_answering: list[object] = []  # the open dump file of this worker (faulthandler keeps writing to it)


def start_collecting() -> str:
    """A fresh directory where this process's loader workers will leave their stacks when asked."""
    global _collecting
    _collecting = tempfile.mkdtemp(prefix="retclip-stacks-")
    return _collecting


def collecting_dir() -> str | None:
    """The directory of ``start_collecting`` in this process, or None (no watchdog: workers not armed)."""
    return _collecting


def _shard_in(frame: types.FrameType | None) -> str | None:
    while frame is not None:
        for value in frame.f_locals.values():
            if isinstance(value, ShardInfo):
                return value.url
        frame = frame.f_back
    return None


def answer_dumps(directory: str, name: str | None = None, dump: bool = True) -> None:
    """Answer ``STACK_SIGNAL`` by writing to ``directory``: every thread's stacks (``dump``, a worker's
    answer) and the shard the main thread's frames are reading. Call from the main thread."""
    if STACK_SIGNAL is None:
        return
    base = Path(directory) / (name or f"worker-{os.getpid()}")

    def where(signum: int, frame: types.FrameType | None) -> None:
        shard = _shard_in(frame)
        if shard is not None:
            base.with_suffix(".shard").write_text(shard)

    signal.signal(STACK_SIGNAL, where)
    if dump:
        out = base.with_suffix(".stacks").open("w")
        _answering.append(out)
        faulthandler.register(STACK_SIGNAL, file=out, all_threads=True, chain=True)


def ask_main_thread(directory: str, name: str, wait_s: float = 1.0) -> str | None:
    """The shard this process's main thread is reading (``answer_dumps(directory, name, dump=False)``
    installed), if it answers within ``wait_s``: it does once a blocked read is interrupted."""
    if STACK_SIGNAL is None:
        return None
    path = (Path(directory) / name).with_suffix(".shard")
    signal.pthread_kill(threading.main_thread().ident or 0, STACK_SIGNAL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if path.exists():
            return _read(path) or None
        time.sleep(0.05)
    return None


@dataclass
class WorkerStacks:
    pid: int
    text: str  # faulthandler's dump ("" if the worker did not answer in time)
    shard: str | None  # the shard a frame of it was reading, where one was found


def ask_workers(pids: list[int], directory: str, wait_s: float = 3.0) -> list[WorkerStacks]:
    """Signal each worker to dump its stacks and collect what they wrote within ``wait_s``."""
    if STACK_SIGNAL is None or not pids:
        return []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, STACK_SIGNAL)
    deadline = time.monotonic() + wait_s
    found: dict[int, WorkerStacks] = {}
    while time.monotonic() < deadline:
        for pid in pids:
            base = Path(directory) / f"worker-{pid}"
            text = _read(base.with_suffix(".stacks"))
            shard = _read(base.with_suffix(".shard")) or None
            found[pid] = WorkerStacks(pid, text, shard)
        if all(w.text and w.shard for w in found.values()):
            break
        time.sleep(0.1)
    time.sleep(0.2)  # let a dump that has started finish writing
    return [
        WorkerStacks(w.pid, _read(Path(directory) / f"worker-{w.pid}.stacks"), w.shard)
        for w in found.values()
    ]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def own_stacks() -> str:
    """faulthandler's dump of every thread of this process, as text."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(f, all_threads=True)
        f.seek(0)
        return f.read()


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    func: str

    def __str__(self) -> str:
        file = self.file
        if file.startswith(_PACKAGE):
            file = "retclip_dist" + file[len(_PACKAGE) :]
        elif "site-packages/" in file:
            file = file.split("site-packages/")[-1]
        elif file.startswith(_STDLIB):
            file = file[len(_STDLIB) :]
        return f"{file}:{self.line} in {self.func}"


def threads(text: str) -> dict[int, list[Frame]]:
    """A faulthandler dump as {thread id: frames, innermost first}."""
    out: dict[int, list[Frame]] = {}
    current: list[Frame] | None = None
    for line in text.splitlines():
        head = _THREAD.match(line)
        if head:
            current = out.setdefault(int(head.group(2), 16), [])
            continue
        frame = _FRAME.match(line)
        if frame and current is not None:
            current.append(Frame(frame["file"], int(frame["line"]), frame["func"]))
    return out


def stuck_at(frames: list[Frame]) -> str:
    """Where a thread is: its innermost frame, and the innermost frame of our own code below it."""
    if not frames:
        return "no Python frame"
    ours = next((f for f in frames if f.file.startswith(_PACKAGE)), None)
    if ours is None or ours == frames[0]:
        return str(frames[0])
    return f"{frames[0]}, called from {ours}"


def main_thread_frames(text: str) -> list[Frame]:
    """The main thread's frames in a dump of this process."""
    return threads(text).get(threading.main_thread().ident or 0, [])


def worker_frames(text: str) -> list[Frame]:
    """A worker's main thread in its dump: the thread that took the signal (faulthandler's "Current
    thread"; the kernel gives a process-wide signal to the main thread), else the first one running our
    data code (its other threads are multiprocessing's queue and fd-sharing helpers and our own watch)."""
    current = _CURRENT.search(text)
    blocks = threads(text)
    if current is not None and int(current.group(1), 16) in blocks:
        return blocks[int(current.group(1), 16)]
    ours = (b for b in blocks.values() if any(f.file.startswith(_PACKAGE + "/data") for f in b))
    return next(ours, next(iter(blocks.values()), []))
