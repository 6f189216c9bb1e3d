"""The stall watchdog (runtime/watchdog.py), the ranks' health records (runtime/health.py) and the
launchers' requeue decision after a fault (launch/requeue.py).

The watchdog ends its process with ``os._exit``, so it runs in a subprocess here; the end-to-end cases
(a hung read on one of two ranks, a killed and a frozen node) are in tests/test_launch_multinode.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from retclip_dist.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_PEER_LOST, EXIT_STALLED, EXIT_STOPPED
from retclip_dist.launch.requeue import HISTORY_NAME, decide
from retclip_dist.runtime.health import HEALTH_DIR, SILENT_S, Health, describe_peers, read_records
from retclip_dist.train.checkpoint import CHECKPOINTS_DIR, STATE_NAME, checkpoint_name

# A rank whose main thread blocks in a read that never returns (a FIFO nobody writes), first in a WAIT
# phase (waiting for other ranks: not its own stall), then in its own WORK.
_STUCK = textwrap.dedent(
    """
    import os, sys, time
    from retclip_dist.runtime.health import Health
    from retclip_dist.runtime.watchdog import WAIT, WORK, Limits, Watchdog

    out, fifo = sys.argv[1], sys.argv[2]
    dog = Watchdog(Limits(stall_s=2, collective_s=1), 0, 1, Health(out, 0), lambda: print("released", flush=True))
    dog.start()
    dog.set_phase("training step 7", WAIT)  # limit 2 + 1 + 60 s
    time.sleep(4)
    print("still here", flush=True)
    dog.set_phase("waiting for training data (epoch 0, step 8)", WORK)
    open(fifo).read()
    """
)


@pytest.mark.slow
def test_a_rank_stuck_in_its_own_work_dumps_its_stacks_and_ends_with_exit_code_5(tmp_path):
    fifo = tmp_path / "hung.tar"
    os.mkfifo(fifo)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _STUCK, str(tmp_path / "run"), str(fifo)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    assert done.returncode == EXIT_STALLED, done.stderr
    # Not within the 2 s stall limit while it waited for others, then within it once in its own work.
    assert done.stdout.splitlines() == ["still here", "released"]
    assert took < 30
    lines = [
        line for line in done.stderr.splitlines() if line.startswith("retclip-train: rank 0: no progress")
    ]
    assert len(lines) == 1, done.stderr
    assert "while waiting for training data (epoch 0, step 8) (limit 2 s, train.stall_timeout_s)" in lines[0]
    read_at = _STUCK.splitlines().index("open(fifo).read()") + 1
    assert f"main thread at <string>:{read_at} in <module>" in lines[0], lines[0]
    assert f'File "<string>", line {read_at} in <module>' in done.stderr  # the full stacks came first
    (record,) = read_records(tmp_path / "run").values()
    assert record["exit"] == {"code": EXIT_STALLED, "reason": lines[0].removeprefix("retclip-train: ")}


def _record(out: Path, rank: int, **fields: object) -> None:
    health = Health(out, rank)
    health.base.update(fields.pop("base", {}))
    health.write(
        str(fields.pop("phase", "training step 3")), float(fields.pop("progress_at", time.time())), **fields
    )


def test_a_waiting_rank_names_the_ranks_that_exited_vanished_or_went_silent(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    now = time.time()
    _record(tmp_path, 0)
    _record(tmp_path, 1, exit={"code": EXIT_STALLED, "reason": "stuck"})
    _record(tmp_path, 2, base={"pid": 2**22 + 17})  # this host, no such process: killed
    _record(tmp_path, 3, base={"host": "node-b"})
    path = tmp_path / HEALTH_DIR / "rank-3.json"
    record = json.loads(path.read_text())
    record["time"] = now - SILENT_S - 15  # its heartbeat stopped: frozen or cut off
    path.write_text(json.dumps(record))
    text = describe_peers(tmp_path, 5, 0, now)
    host = socket.gethostname()
    assert text == (
        f"lost contact with rank 1 on {host} (exited with code {EXIT_STALLED}), rank 2 on {host} (its process "
        "is gone), rank 3 on node-b (silent for 45 s), rank 4 (no health record)"
    )
    # All answer: the line names the one that made no progress the longest.
    for rank in (1, 2, 3, 4):
        _record(
            tmp_path, rank, phase="waiting for training data (epoch 0, step 4)", progress_at=now - 100 + rank
        )
    assert describe_peers(tmp_path, 5, 0, now) == (
        f"no other rank looks gone (health records under 30 s old); the slowest, rank 1 on {host}, made no "
        "progress for 99 s (waiting for training data (epoch 0, step 4))"
    )


# --- the launchers' decision ---------------------------------------------------------------------------


def _attempt(out: Path, attempt: str, codes: dict[int, int]) -> None:
    for rank, code in codes.items():
        health = Health(out, rank)
        health.base["attempt"] = attempt
        health.exit(code, f"rank {rank} reason")


def _checkpoint(out: Path, step: int) -> None:
    path = out / CHECKPOINTS_DIR / checkpoint_name(step)
    path.mkdir(parents=True)
    (path / STATE_NAME).write_text("{}")


def test_a_fault_is_requeued_until_it_repeats_without_a_newer_checkpoint(tmp_path):
    out = tmp_path / "run"
    _checkpoint(out, 40)
    _attempt(out, "7.0", {0: EXIT_PEER_LOST, 1: EXIT_STALLED})
    first = decide(out, "7.0", max_fault_requeues=2)
    assert first.requeue
    assert first.line == (
        "requeueing: rank 1 ended with exit code 5 (rank 1 reason); fault 1 of 2 in a row since the "
        "checkpoint of step 40"
    )
    assert decide(out, "7.0", 2) == first  # another node's launcher asks too: counted once
    _attempt(out, "7.1", {0: EXIT_PEER_LOST, 1: EXIT_PEER_LOST})
    assert decide(out, "7.1", 2).line.endswith("fault 2 of 2 in a row since the checkpoint of step 40")
    _attempt(out, "7.2", {0: EXIT_STALLED, 1: EXIT_PEER_LOST})
    third = decide(out, "7.2", 2)
    assert not third.requeue
    assert third.line == (
        "not requeueing: rank 0 ended with exit code 5 (rank 0 reason); fault 3 in a row since the "
        "checkpoint of step 40 (train.max_fault_requeues is 2)"
    )
    # A newer checkpoint: the run got further, the count starts again.
    _checkpoint(out, 60)
    _attempt(out, "7.3", {0: EXIT_STALLED, 1: EXIT_PEER_LOST})
    assert decide(out, "7.3", 2).line.endswith("fault 1 of 2 in a row since the checkpoint of step 60")
    history = [json.loads(line) for line in (out / HEALTH_DIR / HISTORY_NAME).read_text().splitlines()]
    assert [(h["attempt"], h["in_a_row"], h["requeue"]) for h in history] == [
        ("7.0", 1, True),
        ("7.1", 2, True),
        ("7.2", 3, False),
        ("7.3", 1, True),
    ]


@pytest.mark.parametrize(
    ("codes", "requeue", "line"),
    [
        # A rank that failed for good is the cause; the others only lost it.
        ({0: EXIT_PEER_LOST, 1: EXIT_FAILED}, False, "not requeueing: rank 1 ended with exit code 1"),
        ({0: EXIT_OK, 1: EXIT_OK}, False, "no rank of attempt 9.0 ended with exit code 5 or 6"),
        ({0: EXIT_STOPPED, 1: EXIT_STOPPED}, False, "no rank of attempt 9.0 ended with exit code 5 or 6"),
        ({}, False, "no rank of attempt 9.0 ended with exit code 5 or 6"),
    ],
)
def test_only_a_stall_or_a_lost_peer_requeues(tmp_path, codes, requeue, line):
    _attempt(tmp_path, "9.0", codes)
    _attempt(tmp_path, "8.0", {2: EXIT_STALLED})  # an earlier attempt's record is not this one's
    got = decide(tmp_path, "9.0", 3)
    assert (got.requeue, got.line.startswith(line)) == (requeue, True), got
