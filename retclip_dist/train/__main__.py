import sys

from retclip_dist.train.cli import main

sys.exit(main())
