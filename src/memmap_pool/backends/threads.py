"""The pool's own worker threads: for kernels that release the GIL.

Threads of the calling process run the batches, with the same worker code as processes. What
they share makes them fast: temporary outputs live in anonymous memory with transparent huge
pages (see :mod:`.._memory`), in-memory inputs are used as they are, and nothing starts a
process. What they can't do is refused up front: a thread can't be killed, so there are no
timeouts; it can't die alone, so there is nothing to retry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.thread import BrokenThreadPool
from typing import Any

from . import Backend, Capabilities


class ThreadBackend(Backend):
    """A ``ThreadPoolExecutor`` of the pool's own."""

    capabilities = Capabilities(
        shares_page_cache=True,
        can_kill_workers=False,
        replaces_lost_workers=False,
        owned_by_pool=True,
        same_process=True,
    )

    def __init__(
        self,
        max_workers: int,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
        worker_threads: int | None,
    ) -> None:
        self.n_workers = max_workers
        self.executor = ThreadPoolExecutor(
            max_workers,
            thread_name_prefix="memmap-pool-worker",
            initializer=initializer,
            initargs=tuple(initargs),
        )
        self._limiter: Any = None
        if worker_threads is not None:
            self._limiter = _limit_blas(worker_threads)

    def is_worker_loss(self, exc: BaseException) -> bool:
        return False  # threads don't die alone; a broken pool (its initializer raised) fails

    def describe_loss(self, exc: BaseException) -> str:
        if isinstance(exc, BrokenThreadPool):
            return "the initializer raised in a worker thread"
        return super().describe_loss(exc)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self.executor.shutdown(wait=wait, cancel_futures=cancel_futures)
        if self._limiter is not None:
            self._limiter.restore_original_limits()
            self._limiter = None


def _limit_blas(threads: int) -> Any:
    """Cap the BLAS/OpenMP pools of this process (threadpoolctl, when installed) while the
    pool lives: its worker threads share them. Without threadpoolctl, nothing is changed (the
    environment variables only reach libraries not loaded yet, and would outlive the pool)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads)


def default_blas_threads(workers: int) -> int:
    """``worker_threads="auto"``: the usable CPUs shared among the worker threads."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // workers)
