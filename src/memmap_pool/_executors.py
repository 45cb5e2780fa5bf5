"""Where batches run: the pool's own process pool, a user's executor, or a Dask cluster.

The dispatcher talks to a :class:`Backend`, which hides what differs between them:

==================  ======================  ======================  =====================
                    local process pool      user's executor         Dask cluster
==================  ======================  ======================  =====================
same host           yes (status file, kill) yes if it's a process   no: flush each chunk,
                                            or thread pool          files in shared_dir
worker loss         BrokenProcessPool:      BrokenProcessPool: the  KilledWorker & co:
                    replace the workers     job fails (we can't     retry the batch
                                            rebuild a user's pool)
==================  ======================  ======================  =====================
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, MutableMapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait as wait_for_objects
from typing import Any

from ._worker import init_worker

log = logging.getLogger("memmap_pool")

LOST_GENERATIONS_KEPT = 16

WORKER_JOIN_TIMEOUT = 10.0
"""Seconds to wait for the processes of a broken pool to exit after SIGKILL; only a process
stuck in the kernel (uninterruptible I/O) takes that long."""


class Backend:
    """Interface of an execution backend (see the module docstring)."""

    same_host: bool = True
    can_recover: bool = False
    generation: int = 0
    executor: Executor
    n_workers: int

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.executor.submit(fn, *args, **kwargs)

    def is_worker_loss(self, exc: BaseException) -> bool:
        return isinstance(exc, BrokenProcessPool)

    def describe_loss(self, exc: BaseException) -> str:
        """What ended the worker, for an error message, when no exit code is known."""
        return "an unknown cause"

    def recover(self, generation: int) -> dict[int, int | None]:
        """Replace the workers after a loss seen in ``generation``; return the exit codes of
        the processes that were lost, by pid (empty when unknown)."""
        return {}

    def kill(self, pid: int) -> bool:
        return False

    def worker_pids(self) -> list[int]:
        return []

    def check_shared_dir(self, path: str) -> None:
        """Raise if a worker cannot write ``path`` (only meaningful off this host)."""

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self.executor.shutdown(wait=wait, cancel_futures=cancel_futures)


class LocalProcessBackend(Backend):
    """The pool's own ``ProcessPoolExecutor``, rebuilt after a worker dies."""

    can_recover = True

    def __init__(
        self,
        max_workers: int,
        mp_context: multiprocessing.context.BaseContext | None,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
        worker_threads: int | None,
        max_tasks_per_child: int | None = None,
    ) -> None:
        self.n_workers = max_workers
        self._mp_context = mp_context
        self._initargs = (os.getpid(), worker_threads, initializer, tuple(initargs))
        self._max_tasks_per_child = max_tasks_per_child
        self._lock = threading.Lock()
        self.lost: dict[int, dict[int, int | None]] = {}  # generation -> exit codes
        self.executor, self._processes = self._make()

    def _make(self) -> tuple[ProcessPoolExecutor, MutableMapping[int, Any]]:
        kwargs: dict[str, Any] = {}
        if self._max_tasks_per_child is not None:
            kwargs["max_tasks_per_child"] = self._max_tasks_per_child
        executor = ProcessPoolExecutor(
            max_workers=self.n_workers,
            mp_context=self._mp_context,
            initializer=init_worker,
            initargs=self._initargs,
            **kwargs,
        )
        # The executor keeps its worker processes in this dict for its whole life (it only
        # drops its own reference at shutdown); holding it lets us read the exit codes of
        # workers that died, which BrokenProcessPool does not report.
        return executor, executor._processes

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            return self.executor.submit(fn, *args, **kwargs)

    def recover(self, generation: int) -> dict[int, int | None]:
        with self._lock:
            if generation != self.generation:
                # Somebody already replaced that generation's workers.
                return dict(self.lost.get(generation, {}))
            old, processes = self.executor, dict(self._processes)
            manager = getattr(old, "_executor_manager_thread", None)
            old.shutdown(wait=False, cancel_futures=True)
            # The workers still alive are not the ones that died: the broken executor
            # terminates them (SIGTERM) and we make sure (SIGKILL). Their exit codes would
            # only hide the culprit's in the error message, so they are left out. Whether a
            # worker is alive is read from its sentinel, not its exitcode: the executor's
            # thread is collecting exit statuses right now, and two readers of a forkserver
            # child's status make one of them read 255.
            collateral = set()
            for pid, proc in processes.items():
                try:
                    if wait_for_objects([proc.sentinel], 0):
                        continue
                    proc.kill()
                except (OSError, ValueError):
                    continue
                collateral.add(pid)
            # Once the executor's thread has joined its workers, every exit code is known
            # and nobody else reads them.
            if manager is not None:
                manager.join(WORKER_JOIN_TIMEOUT)
            for proc in processes.values():
                proc.join(WORKER_JOIN_TIMEOUT)
            every = {pid: proc.exitcode for pid, proc in processes.items()}
            codes = {pid: code for pid, code in every.items() if pid not in collateral} or every
            # Kept for the dispatcher, should the replacement have been made by a plain
            # submit() before it heard of the loss; only recent generations matter.
            self.lost[generation] = codes
            self.lost.pop(generation - LOST_GENERATIONS_KEPT, None)
            self.executor, self._processes = self._make()
            self.generation += 1
        log.warning(
            "replaced the workers of the pool after a worker died (exit codes: %s)",
            ", ".join(f"{pid}: {code}" for pid, code in codes.items()) or "unknown",
        )
        return codes

    def kill(self, pid: int) -> bool:
        with self._lock:
            processes = dict(self._processes)
        return _kill_worker(pid, processes)

    def worker_pids(self) -> list[int]:
        with self._lock:
            # Sentinels, not exitcode: reading a forkserver child's exit status here could
            # race with the executor's own thread (see recover).
            return [
                pid
                for pid, p in list(self._processes.items())
                if not wait_for_objects([p.sentinel], 0)
            ]

    def broken(self) -> bool:
        return bool(getattr(self.executor, "_broken", False))

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        with self._lock:
            processes = dict(self._processes)
            self.executor.shutdown(wait=wait, cancel_futures=cancel_futures)
        if not wait:
            return
        for proc in processes.values():
            proc.join(WORKER_JOIN_TIMEOUT)
            if proc.exitcode is None:
                proc.kill()
                proc.join(WORKER_JOIN_TIMEOUT)


class ExecutorBackend(Backend):
    """A ``concurrent.futures.Executor`` the user gave us; we use it but do not own it."""

    def __init__(self, executor: Executor, n_workers: int | None = None) -> None:
        self.executor = executor
        workers = n_workers or getattr(executor, "_max_workers", None) or os.cpu_count() or 1
        self.n_workers = int(workers)
        self.same_host = isinstance(executor, (ProcessPoolExecutor, ThreadPoolExecutor))
        self._processes: dict[int, Any] = getattr(executor, "_processes", None) or {}

    def recover(self, generation: int) -> dict[int, int | None]:
        processes = dict(getattr(self.executor, "_processes", None) or self._processes)
        return {pid: proc.exitcode for pid, proc in processes.items()}

    def kill(self, pid: int) -> bool:
        return _kill_worker(pid, getattr(self.executor, "_processes", None) or {})

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """The executor is the user's: it stays open for them to shut down."""


def _kill_worker(pid: int, processes: MutableMapping[int, Any]) -> bool:
    """SIGKILL ``pid`` if it is one of ``processes`` (never another process that got its pid)."""
    if pid not in processes:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True
