"""A ``concurrent.futures.Executor`` of the user's, used but not owned by the pool."""

from __future__ import annotations

import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

from . import Backend, Capabilities


class ExecutorBackend(Backend):
    """Runs batches on the user's executor. The pool neither kills its workers (that would
    break it for good: the pool can't rebuild it) nor shuts it down."""

    def __init__(self, executor: Executor, n_workers: int | None = None) -> None:
        self.executor = executor
        workers = n_workers or getattr(executor, "_max_workers", None) or os.cpu_count() or 1
        self.n_workers = int(workers)
        local = isinstance(executor, (ProcessPoolExecutor, ThreadPoolExecutor))
        self.capabilities = Capabilities(
            shares_page_cache=local,
            can_kill_workers=False,
            replaces_lost_workers=False,
            owned_by_pool=False,
        )

    def recover(self, generation: int) -> dict[int, int | None]:
        # Nothing is replaced; the exit codes name the cause in the error message.
        processes = dict(getattr(self.executor, "_processes", None) or {})
        return {pid: proc.exitcode for pid, proc in processes.items()}

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """The executor is the user's: it stays open for them to shut down."""
