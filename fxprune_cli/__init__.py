"""The ``fxprune`` console command's entry point.

It lives outside the ``fxprune`` package on purpose: importing ``fxprune`` imports torch and
transformers, which takes seconds (tens of seconds on a loaded machine).  A process started in the
background by a non-interactive shell inherits SIGINT as *ignored*, and ``fxprune.cli`` installs
its own SIGINT/SIGTERM handlers only once imported, so a Ctrl-C (``kill -INT``) sent while the
imports run used to be lost and the run went on to the end.  Here both signals are caught before
anything heavy is imported; an interrupt during start-up exits with 130 having written nothing.
"""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signum)


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        from fxprune.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("fxprune: interrupted while starting; stopped, nothing was written\n")
        return EXIT_INTERRUPTED
    return cli_main()
