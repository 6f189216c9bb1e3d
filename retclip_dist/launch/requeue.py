"""Whether a launcher requeues an attempt that ended by a fault (exit code 5 or 6), from the ranks' records.

torchrun reports any rank's non-zero exit as its own status 1, so neither launcher sees the trainer's
exit codes. Each rank leaves its code in its health record (``runtime/health.py``, under output_dir,
which every node shares) with the attempt it belongs to (Slurm's ``JOBID.RESTARTS``). When an attempt
has ended, ``launch/pretrain.sh`` (through ``python -m retclip_dist.launch.requeue``) and the submitit
task (``launch/submit.py``) ask ``decide``:

- a rank ended with an error a requeue would meet again (exit code 1, 2 or 4): no requeue;
- a rank stalled (5) or lost a peer (6): requeue, unless the run has already ended that way
  ``train.max_fault_requeues`` times in a row without saving a newer checkpoint (a mount that stays
  hung, a node that keeps failing): then no requeue, and a line that says so;
- anything else (done, a stop signal, which the launchers requeue themselves, no record): no requeue.

Every fault decision is a line of ``output_dir/health/requeues.jsonl`` (attempt, time, exit codes, the
newest complete checkpoint, requeued or not); the count in a row is read back from it.

    python -m retclip_dist.launch.requeue --config CONFIG.yaml [--section.key value ...]

prints one line and exits 0 (requeue) or 1 (do not); 2 for a bad config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retclip_dist.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_STALLED, EXIT_STOPPED, FAULT_CODES
from retclip_dist.runtime.env import slurm_job
from retclip_dist.runtime.health import HEALTH_DIR, read_records

HISTORY_NAME = "requeues.jsonl"  # under output_dir/health
_NOT_FAILURES = (EXIT_OK, EXIT_STOPPED, *FAULT_CODES)


@dataclass(frozen=True)
class Decision:
    requeue: bool
    line: str  # what the launcher prints


def _newest_checkpoint(output_dir: Path) -> int:
    from retclip_dist.train.checkpoint import CHECKPOINTS_DIR, checkpoint_step, complete_checkpoints

    done = complete_checkpoints(output_dir / CHECKPOINTS_DIR)
    return checkpoint_step(done[-1]) if done else 0


def _history(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash is not a decision
    return out


def decide(output_dir: str | Path, attempt: str, max_fault_requeues: int) -> Decision:
    """What to do after ``attempt`` of the run in ``output_dir`` (see the module docstring)."""
    out = Path(output_dir)
    records = {
        rank: rec
        for rank, rec in read_records(out).items()
        if rec.get("attempt") == attempt and "exit" in rec
    }
    codes = {rank: rec["exit"]["code"] for rank, rec in records.items()}
    failed = sorted(rank for rank, code in codes.items() if code not in _NOT_FAILURES)
    if failed:
        rank = failed[0]
        return Decision(
            False,
            f"not requeueing: rank {rank} ended with exit code {codes[rank]} "
            f"({records[rank]['exit']['reason']}); a requeue would meet it again",
        )
    faults = sorted(rank for rank, code in codes.items() if code in FAULT_CODES)
    if not faults:
        return Decision(False, f"no rank of attempt {attempt} ended with exit code 5 or 6")
    # The rank that stalled says why; the ranks that lost it only that they did.
    rank = next((r for r in faults if codes[r] == EXIT_STALLED), faults[0])
    cause = f"rank {rank} ended with exit code {codes[rank]} ({records[rank]['exit']['reason']})"
    newest = _newest_checkpoint(out)
    path = out / HEALTH_DIR / HISTORY_NAME
    earlier = [h for h in _history(path) if h.get("attempt") != attempt]
    in_a_row = 1
    for entry in reversed(earlier):
        if entry.get("checkpoint") != newest:
            break
        in_a_row += 1
    requeue = in_a_row <= max_fault_requeues
    entry = {
        "attempt": attempt,
        "time": time.time(),
        "codes": {str(r): c for r, c in sorted(codes.items())},
        "checkpoint": newest,
        "in_a_row": in_a_row,
        "requeue": requeue,
    }
    if not any(h.get("attempt") == attempt for h in _history(path)):  # another node's launcher may have
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
    since = f"since the checkpoint of step {newest}" if newest else "without any checkpoint"
    if not requeue:
        return Decision(
            False,
            f"not requeueing: {cause}; fault {in_a_row} in a row {since} "
            f"(train.max_fault_requeues is {max_fault_requeues})",
        )
    return Decision(True, f"requeueing: {cause}; fault {in_a_row} of {max_fault_requeues} in a row {since}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m retclip_dist.launch.requeue",
        description="After an attempt: requeue it (exit 0) or not (exit 1), from its ranks' exit codes.",
    )
    parser.add_argument("--config", required=True, help="the run's YAML preset")
    args, overrides = parser.parse_known_args(argv)
    from retclip_dist.config import ConfigError, load_config
    from retclip_dist.train.config import RunConfig

    try:
        cfg = load_config(RunConfig, args.config, overrides)
    except ConfigError as exc:
        print(f"retclip: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    attempt = slurm_job()
    if attempt is None:
        print("retclip: not under Slurm: nothing to requeue")
        return 1
    decision = decide(cfg.output_dir, attempt, cfg.train.max_fault_requeues)
    print(f"retclip: {decision.line}", flush=True)
    return 0 if decision.requeue else 1


if __name__ == "__main__":
    sys.exit(main())
