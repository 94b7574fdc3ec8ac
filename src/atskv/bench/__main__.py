"""``python -m atskv.bench``: the performance protocol (:mod:`atskv.bench.main`)."""

import sys

from atskv.bench.main import main

sys.exit(main())
