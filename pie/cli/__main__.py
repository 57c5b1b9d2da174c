"""`python -m pie.cli ARGS` is `pie ARGS` (how the daemon and tests start workers)."""

import sys

from pie.cli import main

sys.exit(main())
