"""Stopping when asked: SIGINT and SIGTERM become an exception, and critical sections finish first.

Why this module exists.  A process started in the background by a non-interactive shell
(``fxprune prune ... &`` in a script, a job runner, ``nohup``) inherits SIGINT as *ignored*
(POSIX: asynchronous lists ignore SIGINT when job control is off), and Python installs its
``KeyboardInterrupt`` handler only when SIGINT is at its default at start-up.  Such a run never
sees Ctrl-C or ``kill -INT``: it finishes and writes its output.  SIGTERM, at its default, kills
the process on the spot, leaving temporary directories and lock files behind.  So the CLI owns
both signals (:func:`handle_signals`): each raises :class:`~fxprune.errors.Interrupted`, a
``KeyboardInterrupt`` that unwinds every ``finally`` (temporary directories are removed, nothing
is published) and exits with 130.

A few steps must not be cut in half -- moving a finished output into place, putting an old output
back, removing a temporary directory.  :func:`deferred` holds signals for their duration and
re-delivers the first one afterwards with whatever disposition was in force (so it also works for
library users with Python's default handlers).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from fxprune.errors import Interrupted

__all__ = ["STOP_SIGNALS", "deferred", "handle_signals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (even if SIGINT was ignored)."""
    if not _main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM during a short critical section; deliver the first one after it."""
    if not _main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])
