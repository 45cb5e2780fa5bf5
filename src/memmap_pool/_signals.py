"""The one SIGTERM policy: while the library waits for a job in the main thread, SIGTERM
(a batch scheduler's time limit, ``kill``) stops the job like Ctrl-C does, so that its
workers are killed, its temporary files removed and a ``.npy`` output keeps its journal.

By default SIGTERM ends a process at once, without running any cleanup. Only a default
handler is replaced: a program that installed its own SIGTERM handler keeps it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

EXIT_TERMINATED = 128 + signal.SIGTERM
"""The exit status a shell reports for a process ended by SIGTERM."""


class _Handler:
    """Raises ``SystemExit(143)`` in the process that installed it; a process forked from
    it (a worker, before its initializer runs) dies of the signal as it would have."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def __call__(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(EXIT_TERMINATED)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` in the main thread (where the
    default handler is in place; elsewhere it changes nothing)."""
    previous: Any = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _Handler())
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
