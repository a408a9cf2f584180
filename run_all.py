#!/usr/bin/env python
"""popbench entry point: `python run_all.py --help`. Same as the `popbench` console script."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
