"""Capping BLAS/OpenMP thread pools inside workers, so that workers x threads <= cores."""

from __future__ import annotations

import os
from typing import Any

_thread_limiter: Any = None

_THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def limit_threads(threads: int, now: bool = True) -> None:
    """Cap BLAS/OpenMP pools: libraries loaded later through the environment variables they
    read when they load; those already loaded (numpy's BLAS) through threadpoolctl, when
    installed: ``now``, or else as soon as they start their threads (see
    :func:`apply_pending_limit`)."""
    global _pending_limit, _baseline_threads
    for name in _THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return
    _pending_limit = threads
    _baseline_threads = thread_count()
    if now or _baseline_threads is None:
        apply_pending_limit(force=True)


_pending_limit: int | None = None
_baseline_threads: int | None = None


def thread_count() -> int | None:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def apply_pending_limit(force: bool = False) -> None:
    """Apply the pending thread limit once a BLAS/OpenMP pool has started its threads.

    Limiting an OpenBLAS pool that has not started yet starts it: its threads then spin
    waiting for work for about 0.1 s, which costs a worker ~50 ms of a core at start, 10% of
    a 1 GiB fill, for kernels that never call BLAS. So the limit waits until the process
    has more threads than at start (a kernel used BLAS: its first batch ran unlimited) and
    costs nothing for kernels that don't.
    """
    global _pending_limit, _thread_limiter
    if _pending_limit is None:
        return
    if not force:
        count = thread_count()
        if count is None or _baseline_threads is None or count <= _baseline_threads:
            return
    from threadpoolctl import threadpool_limits

    _thread_limiter = threadpool_limits(limits=_pending_limit)
    _pending_limit = None
