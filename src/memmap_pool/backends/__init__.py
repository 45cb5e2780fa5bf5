"""Where batches run: the pool's own process pool, a user's executor, or a Dask cluster.

The dispatcher talks to a :class:`Backend` and asks its :class:`Capabilities`, never its
type, what it can do:

=========================  =========  =========  ==================  ==================
                           processes  threads    executor=           Dask
=========================  =========  =========  ==================  ==================
shares_page_cache          yes        yes        yes (a process or   no: files in
                                                 thread pool)        shared_dir, flushed
can_kill_workers           yes        no         no (yours)          no (remote)
replaces_lost_workers      yes        no         no                  yes (Dask does)
owned_by_pool              yes        yes        no                  no
same_process               no         yes        no                  no
=========================  =========  =========  ==================  ==================

The pool calls :meth:`Backend.shutdown` when it closes, whatever the backend: each one stops
what is its own (the processes backend its workers; the Dask backend releases the workers'
mappings and closes a client it created; a user's executor is left running).
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import cloudpickle


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; see the module docstring.

    Attributes:
        shares_page_cache: the workers run on this host, so they see the parent's writes
            to a mapped file at once: a status file can be shared, and chunks need no flush.
        can_kill_workers: the pool may kill a worker (timeouts, Ctrl-C) and replace it.
        replaces_lost_workers: a lost worker is replaced (by the pool or the cluster), so
            a chunk whose worker died can be retried.
        owned_by_pool: the pool started the workers itself and stops them when it closes;
            only then do the options that shape workers (``mp_context``, ``initializer``,
            ``worker_threads``, ``max_tasks_per_child``) apply.
        same_process: the workers are threads of this process: temporary outputs may live
            in anonymous memory, and in-memory inputs are shared as they are.
    """

    shares_page_cache: bool
    can_kill_workers: bool
    replaces_lost_workers: bool
    owned_by_pool: bool
    same_process: bool = False


class Backend:
    """An execution backend: where the dispatcher sends batches (see the module docstring).

    Subclasses set ``capabilities``, ``executor`` and ``n_workers`` and override the hooks
    for what they do differently.
    """

    capabilities: Capabilities
    executor: Executor
    n_workers: int
    generation: int = 0
    """Bumped each time the workers are replaced: a loss is handled once per generation."""

    # -- what the dispatcher sends ------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.executor.submit(fn, *args, **kwargs)

    def is_worker_loss(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised by a batch's future, means its worker was lost."""
        return isinstance(exc, BrokenProcessPool)

    def describe_loss(self, exc: BaseException) -> str:
        """What ended the worker, for an error message, when no exit code is known."""
        return "an unknown cause"

    def recover(self, generation: int) -> dict[int, int | None]:
        """After a loss seen in ``generation``: replace the workers where the backend can;
        return the exit codes of the processes that were lost, by pid (empty if unknown)."""
        return {}

    def kill(self, pid: int) -> bool:
        """Kill worker ``pid`` (only with ``can_kill_workers``); False if it isn't one."""
        return False

    # -- the Executor methods the pool passes on ----------------------------------------------

    def submit_task(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """A plain ``Executor.submit`` of the user's."""
        self.before_task()
        return self.submit(CloudCallable(fn), *args, **kwargs)

    def map_tasks(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
    ) -> Iterator[Any]:
        """A plain ``Executor.map`` of the user's."""
        self.before_task()
        return self.executor.map(
            CloudCallable(fn), *iterables, timeout=timeout, chunksize=chunksize
        )

    def keep_alive(self, thread: threading.Thread) -> None:
        """``thread`` runs until the backend is shut down (the dispatcher's)."""

    def before_task(self) -> None:
        """Called before a plain task is sent (the processes backend replaces broken
        workers there)."""

    # -- set-up and tear-down -----------------------------------------------------------------

    def check_shared_dir(self, path: str) -> None:
        """Raise if a worker cannot write ``path`` (only meaningful off this host)."""

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop what the backend owns (see the module docstring)."""
        self.executor.shutdown(wait=wait, cancel_futures=cancel_futures)


class CloudCallable:
    """A callable that travels to worker processes with cloudpickle when plain pickle can't
    carry it, so that ``submit`` and ``map`` take lambdas, closures and functions of
    ``__main__`` or a notebook, as ``map_chunks`` does. Functions of importable modules
    travel by reference, as ``ProcessPoolExecutor`` sends them (their tracebacks then quote
    their source). Its arguments travel as the executor sends them (pickle)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Callable[[bytes, bool], CloudCallable], tuple[bytes, bool]]:
        # Pickled in the executor's feeder thread: a failure reaches the task's future.
        fn = self.fn
        if getattr(fn, "__module__", None) != "__main__":
            try:
                return _load_callable, (pickle.dumps(fn, pickle.HIGHEST_PROTOCOL), False)
            except Exception:
                pass
        # By value: __main__ under spawn or forkserver is not the caller's script, and a
        # notebook's or the interpreter's __main__ can't be imported at all.
        return _load_callable, (cloudpickle.dumps(fn), True)


def _load_callable(payload: bytes, by_value: bool) -> CloudCallable:
    return CloudCallable(cloudpickle.loads(payload) if by_value else pickle.loads(payload))
