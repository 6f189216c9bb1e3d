import sys

# Before torch and the rest are imported (seconds): a stop signal from here on is recorded, not lost.
from retclip_dist.runtime.stop import catch_early

catch_early()

from retclip_dist.train.cli import main  # noqa: E402

sys.exit(main())
