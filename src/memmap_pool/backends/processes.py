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
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.connection import wait as wait_for_objects
from typing import Any

from .._worker_init import init_worker
from ..errors import WorkerStartupError
from . import Backend, Capabilities

log = logging.getLogger("memmap_pool")

LOST_GENERATIONS_KEPT = 16
"""Generations whose lost exit codes are kept: batches of older ones are all back."""

STARTUP_FAILURES_ALLOWED = 3
"""Generations in a row whose workers all died before finishing their start-up, before the
pool gives up with :class:`WorkerStartupError` (an initializer that raises, a script without
a main guard) instead of replacing them forever."""

STARTUP_ERROR_BYTES = 1024
"""Room for the first start-up error a generation's workers report."""

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
        self._mp_context = mp_context or multiprocessing.get_context()
        self._initargs = (os.getpid(), worker_threads, initializer, tuple(initargs))
        self._max_tasks_per_child = max_tasks_per_child
        self._lock = threading.Lock()
        self._startup_failures = 0  # generations in a row whose workers never started
        self._lasting_threads = {threading.main_thread()}
        self._failed: str | None = None  # why the pool gave up on starting workers
        self.lost: dict[int, dict[int, int | None]] = {}  # generation -> exit codes
        self.executor, self._processes = self._make()

    def _make(self) -> tuple[ProcessPoolExecutor, MutableMapping[int, Any]]:
        kwargs: dict[str, Any] = {}
        if self._max_tasks_per_child is not None:
            kwargs["max_tasks_per_child"] = self._max_tasks_per_child
        # Shared with this generation's workers: how many finished their start-up, and the
        # first error one of them raised there. No locks (no semaphores to leak): only
        # "none at all" matters of the count, and any one error will do.
        self._started = self._mp_context.RawValue("i", 0)
        self._startup_error = self._mp_context.RawArray("c", STARTUP_ERROR_BYTES)
        # Whether the thread starting a worker outlives it (see submit).
        self._starter_stays = self._mp_context.RawValue("b", 0)
        executor = ProcessPoolExecutor(
            max_workers=self.n_workers,
            mp_context=self._mp_context,
            initializer=init_worker,
            initargs=(*self._initargs, self._started, self._startup_error, self._starter_stays),
            **kwargs,
        )
        # The executor keeps its worker processes in this dict for its whole life (it only
        # drops its own reference at shutdown); holding it lets us read the exit codes of
        # workers that died, which BrokenProcessPool does not report.
        return executor, executor._processes

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            if self._failed is not None:
                raise WorkerStartupError(self._failed)
            # The executor starts workers inside submit(), in this thread. A worker asks the
            # kernel to kill it when its parent dies (PR_SET_PDEATHSIG, see _worker_init),
            # which Linux ties to the thread that started it: only a thread that outlives
            # the workers may start workers that ask for it.
            self._starter_stays.value = threading.current_thread() in self._lasting_threads
            return self.executor.submit(fn, *args, **kwargs)

    def keep_alive(self, thread: threading.Thread) -> None:
        """``thread`` lives as long as the workers (the dispatcher's, which shuts the
        backend down before it ends)."""
        self._lasting_threads.add(thread)

    def is_worker_loss(self, exc: BaseException) -> bool:
        # Workers that can't start are not lost: replacing them again would never end.
        return super().is_worker_loss(exc) and not isinstance(exc, WorkerStartupError)

    def recover(self, generation: int) -> dict[int, int | None]:
        with self._lock:
            if self._failed is not None or generation != self.generation:
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
            if self._note_startup(codes):
                return codes
            self.executor, self._processes = self._make()
            self.generation += 1
        log.debug(
            "replaced the workers of the pool (exit codes: %s)",
            ", ".join(f"{pid}: {code}" for pid, code in codes.items()) or "unknown",
        )
        return codes

    def _note_startup(self, codes: dict[int, int | None]) -> bool:
        """Count a generation whose workers all died during start-up; True once the pool
        gives up (see :data:`STARTUP_FAILURES_ALLOWED`). Call with the lock held."""
        if self._started.value:
            self._startup_failures = 0
            return False
        self._startup_failures += 1
        if self._startup_failures < STARTUP_FAILURES_ALLOWED:
            return False
        self._failed = self._startup_message(codes)
        log.error("%s", self._failed)
        return True

    def _startup_message(self, codes: dict[int, int | None]) -> str:
        exits = sorted({str(c) for c in codes.values()}) or ["unknown"]
        what = (
            f"the pool's worker processes died while starting, {self._startup_failures} "
            f"times in a row, before running any task (exit codes: {', '.join(exits)})"
        )
        # A char array's .value is its bytes up to the first NUL.
        error = bytes(getattr(self._startup_error, "value", b"")).decode(errors="replace")
        if error:
            return (
                f"{what}: the initializer raised {error}; fix the initializer (it runs in "
                "every worker) and create a new pool"
            )
        method = self._mp_context.get_start_method()
        if method in ("spawn", "forkserver"):
            return (
                f"{what}. With the {method!r} start method each worker imports the main "
                "module first: a script that creates a MemmapPool must do so under "
                '`if __name__ == "__main__":`, or its workers start pools of their own '
                "and exit; the initializer, if any, may also have exited the process"
            )
        return f"{what}: the initializer, if any, exited the process or crashed"

    def kill(self, pid: int) -> bool:
        with self._lock:
            processes = dict(self._processes)
        return _kill_worker(pid, processes)

    def before_task(self) -> None:
        # A worker that died in a plain submit() broke the executor; the pool's own workers
        # are replaced so that the pool stays usable.
        if getattr(self.executor, "_broken", False):
            codes = self.recover(self.generation)
            log.warning(
                "replaced the pool's workers after one died in a task (exit codes: %s)",
                ", ".join(f"{pid}: {code}" for pid, code in codes.items()) or "unknown",
            )

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
