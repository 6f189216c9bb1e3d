import sys

from retclip_dist.train.loop import main

sys.exit(main())
