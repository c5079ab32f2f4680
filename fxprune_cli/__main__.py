"""``python -m fxprune_cli``: the console command, as the installed ``fxprune`` runs it."""

import sys

from fxprune_cli import main

if __name__ == "__main__":
    sys.exit(main())
