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

from retclip_dist.launch.env import slurm_job

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


def silent_ranks(records: dict[int, dict[str, Any]], ranks: range, me: int, now: float) -> list[int]:
    """Ranks of ``ranks`` other than ``me`` whose record is missing or older than ``SILENT_S``."""
    return [
        r
        for r in ranks
        if r != me and (r not in records or "exit" in records[r] or now - records[r]["time"] > SILENT_S)
    ]


def describe_peers(output_dir: str | Path, world: int, me: int, now: float | None = None) -> str:
    """One clause on the other ranks, for the line of a rank that waits for them: which went silent
    (with host and how long ago), else which made no progress longest and in what phase."""
    now = time.time() if now is None else now
    records = read_records(output_dir)
    silent = silent_ranks(records, range(world), me, now)
    if silent:
        parts = []
        for r in silent:
            rec = records.get(r)
            if rec is None:
                parts.append(f"rank {r} (no record)")
            elif "exit" in rec:
                parts.append(f"rank {r} on {rec['host']} (exited with code {rec['exit']['code']})")
            else:
                parts.append(f"rank {r} on {rec['host']} (silent for {now - rec['time']:.0f} s)")
        return "lost contact with " + ", ".join(parts)
    others = [rec for r, rec in records.items() if r != me and r < world]
    if not others:
        return "no other rank's record"
    slowest = min(others, key=lambda rec: rec["progress_at"])
    return (
        f"every rank answers; rank {slowest['rank']} on {slowest['host']} has made no progress for "
        f"{now - slowest['progress_at']:.0f} s ({slowest['phase']})"
    )
