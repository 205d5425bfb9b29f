"""``python -m epochal_demo``: the same as the ``epochal-demo`` script."""

from __future__ import annotations

import sys

from .demo import main

if __name__ == "__main__":
    sys.exit(main())
