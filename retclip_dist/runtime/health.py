"""Each rank's last word, in ``output_dir/health/rank-N.json``: what it is doing, and how it ended.

While a run trains, every rank's watchdog rewrites its record every ``HEARTBEAT_S`` seconds: host, pid,
the phase it is in and when it last made progress. A rank that waits too long for the others reads their
records to say which one went silent (a frozen or dead node: its heartbeat stopped) or which one is stuck
(its heartbeat goes on, its progress does not); gloo's and NCCL's own errors name no rank. A person can
read the same files (``cat runs/x/health/*.json``).

When a rank ends, its record gets ``exit`` (code and one-line reason) and the attempt it belongs to (the
Slurm job and restart). The launchers decide from those whether to requeue (``launch/requeue.py``).
output_dir is shared by every node (checkpoints must be), so the records are too. Clocks of the nodes
must agree to well within ``SILENT_S`` (NTP does), as for the run lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from retclip_dist.runtime.env import slurm_job

HEALTH_DIR = "health"  # under output_dir
HEARTBEAT_S = 10.0  # how often a rank's watchdog rewrites its record
SILENT_S = 3 * HEARTBEAT_S  # a rank whose record is older than this is silent: frozen, dead or cut off


def record_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / HEALTH_DIR / f"rank-{rank}.json"


class Health:
    """The record of one rank; every write replaces the file whole (readers never see half of one)."""

    def __init__(self, output_dir: str | Path, rank: int) -> None:
        self.path = record_path(output_dir, rank)
        self.base = {
            "rank": rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "attempt": slurm_job(),  # JOBID.RESTARTS under Slurm, else None
            "started": time.time(),
        }

    def write(self, phase: str, progress_at: float, **extra: Any) -> None:
        record = {**self.base, "time": time.time(), "phase": phase, "progress_at": progress_at, **extra}
        with contextlib.suppress(OSError):  # a full or vanished disk must not end the run from here
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record, sort_keys=True))
            os.replace(tmp, self.path)

    def exit(self, code: int, reason: str, phase: str = "exited") -> None:
        """The rank's final record: its exit code and the one line that says why."""
        self.write(phase, time.time(), exit={"code": code, "reason": reason})


def read_records(output_dir: str | Path) -> dict[int, dict[str, Any]]:
    """Every rank's latest record, by rank (unreadable or half-copied files are left out)."""
    out = {}
    for path in (Path(output_dir) / HEALTH_DIR).glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(path.read_text())
            out[int(record["rank"])] = record
    return out


def _gone(record: dict[str, Any]) -> bool:
    """Whether a record's process has ended, where this host can tell (its own processes only)."""
    if record["host"] != socket.gethostname():
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed process whose parent died too stays a zombie until something reaps it
        return Path(f"/proc/{record['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def lost_peers(records: dict[int, dict[str, Any]], world: int, me: int, now: float) -> dict[int, str]:
    """The ranks other than ``me`` that are gone, each with why it looks so: it exited, its process is
    gone (same host), its record stopped (older than ``SILENT_S``: frozen, dead or cut off), or none."""
    out = {}
    for r in range(world):
        rec = records.get(r)
        if r == me:
            continue
        if rec is None:
            out[r] = f"rank {r} (no health record)"
        elif "exit" in rec:
            out[r] = f"rank {r} on {rec['host']} (exited with code {rec['exit']['code']})"
        elif _gone(rec):
            out[r] = f"rank {r} on {rec['host']} (its process is gone)"
        elif now - rec["time"] > SILENT_S:
            out[r] = f"rank {r} on {rec['host']} (silent for {now - rec['time']:.0f} s)"
    return out


def describe_peers(output_dir: str | Path, world: int, me: int, now: float | None = None) -> str:
    """One clause on the other ranks, for the line of a rank that waits for them: which are gone (with
    host and why), else which has made no progress the longest, and in what phase."""
    now = time.time() if now is None else now
    attempt = slurm_job()  # a record of an earlier attempt says nothing about this one's ranks
    records = {r: rec for r, rec in read_records(output_dir).items() if rec.get("attempt") == attempt}
    lost = lost_peers(records, world, me, now)
    if lost:
        return "lost contact with " + ", ".join(lost.values())
    others = [rec for r, rec in records.items() if r != me and r < world]
    if not others:
        return "no other rank's health record"
    slowest = min(others, key=lambda rec: rec["progress_at"])
    return (
        f"no other rank looks gone (health records under {SILENT_S:.0f} s old); the slowest, rank "
        f"{slowest['rank']} on {slowest['host']}, made no progress for {now - slowest['progress_at']:.0f} s "
        f"({slowest['phase']})"
    )
