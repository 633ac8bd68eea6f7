"""``python -m fastdpo``: the same command line as the ``fastdpo`` console script."""

import sys

from .bench.cli import main

sys.exit(main())
