"""``python -m fxprune``: the command line, also as ``torchrun --nproc-per-node N -m fxprune prune ...``."""

import sys

from fxprune.cli import main

if __name__ == "__main__":
    sys.exit(main())
