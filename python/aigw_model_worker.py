#!/usr/bin/python3
"""The aigw model worker: serves local models on the bus (see aigw_models.serve)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aigw_models.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
