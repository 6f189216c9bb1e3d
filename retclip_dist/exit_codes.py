"""Exit codes of the command-line tools: one home, so launchers, scripts and tests agree on them."""

from __future__ import annotations

EXIT_OK = 0  # done
EXIT_FAILED = 1  # an unexpected error (e.g. a data loader worker died); one line per rank says which
EXIT_CONFIG = 2  # a config, usage or input error, found before training (or at resume); nothing was changed
EXIT_STOPPED = 3  # saved and left on a signal; the job should be requeued with resume=auto
EXIT_NONFINITE = 4  # a NaN/inf loss or weights; the last complete checkpoint is the last good state
EXIT_STALLED = 5  # a rank made no progress for train.stall_timeout_s (stacks in the log); requeued
EXIT_PEER_LOST = 6  # a collective failed or timed out: another rank died, froze or is stuck; requeued

# What the launchers requeue on, besides a stop signal, up to train.max_fault_requeues times in a row
# without a new checkpoint (launch/requeue.py).
FAULT_CODES = (EXIT_STALLED, EXIT_PEER_LOST)
