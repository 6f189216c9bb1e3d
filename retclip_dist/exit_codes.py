"""Exit codes of the command-line tools: one home, so launchers, scripts and tests agree on them."""

from __future__ import annotations

EXIT_OK = 0  # done
EXIT_FAILED = 1  # an unexpected error (e.g. a data loader worker died); one line per rank says which
EXIT_CONFIG = 2  # a config, usage or input error, found before training (or at resume); nothing was changed
EXIT_STOPPED = 3  # saved and left on a signal; the job should be requeued with resume=auto
EXIT_NONFINITE = 4  # a NaN/inf loss or weights; the last complete checkpoint is the last good state
