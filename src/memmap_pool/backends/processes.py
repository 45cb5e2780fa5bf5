"""The pool's own worker processes: a ``ProcessPoolExecutor`` rebuilt when a worker dies.

``ProcessPoolExecutor`` breaks for good when one of its workers dies. This backend keeps the
pool usable: the dispatcher asks it to :meth:`~ProcessBackend.recover`, which collects the
exit codes of the lost workers (for the error message and to tell the culprit from the
collateral), kills what is left, and starts a new executor (a new *generation*).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.connection import wait as wait_for_objects
from typing import Any

from .._worker_init import init_worker
from . import Backend, Capabilities

log = logging.getLogger("memmap_pool")

LOST_GENERATIONS_KEPT = 16
"""Generations whose lost exit codes are kept: batches of older ones are all back."""

WORKER_JOIN_TIMEOUT = 10.0
"""Seconds to wait for the processes of a broken pool to exit after SIGKILL; only a process
stuck in the kernel (uninterruptible I/O) takes that long."""


class ProcessBackend(Backend):
    """The pool's own ``ProcessPoolExecutor``, rebuilt after a worker dies."""

    capabilities = Capabilities(
        shares_page_cache=True,
        can_kill_workers=True,
        replaces_lost_workers=True,
        owned_by_pool=True,
    )

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

    def submit_task(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self._replace_if_broken()
        return self.submit(fn, *args, **kwargs)

    def map_tasks(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
    ) -> Iterator[Any]:
        self._replace_if_broken()
        return self.executor.map(fn, *iterables, timeout=timeout, chunksize=chunksize)

    def _replace_if_broken(self) -> None:
        # A worker that died in a plain submit() broke the executor; the pool's own workers
        # are replaced so that the pool stays usable.
        if getattr(self.executor, "_broken", False):
            self.recover(self.generation)

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


def _kill_worker(pid: int, processes: MutableMapping[int, Any]) -> bool:
    """SIGKILL ``pid`` if it is one of ``processes`` (never another process that got its pid)."""
    if pid not in processes:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True
