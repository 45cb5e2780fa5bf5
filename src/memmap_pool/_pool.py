"""MemmapPool: a process pool whose jobs write straight into shared memory-mapped arrays.

How one ``map_chunks`` call travels, and which module does each step::

    caller's thread                                 dispatcher thread        worker (one of N)
    ---------------                                 -----------------        -----------------
    build_request: check every argument, plan
      the chunks  (_request, _chunks, _roles)
      errors here: nothing written yet
    JobFiles.create: room, outputs, journal,
      dumped inputs, status + spec files
      (_jobfiles, _resume, _workspace, _protocol)
    Run + Job ──── AddJob ─────────────────────▶   batches of indices ───▶  run_batch: map the
                                                   (round robin, sized       files once per job,
                                                   to ~50 ms of work)        kernel(out[region],
                                                   (_dispatch, _run)          chunk, *views)
                                                     ◀── BatchResult ──────  (_worker)
                                                   journal, retries (_blame),
                                                   timeouts, progress
    Job.wait() ◀── result: read-only memmap ────   all chunks done: JobFiles.result,
      (_jobs, _signals)                            cleanup
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._blocks import BlockKernel, block_inputs, first_array_layout, takes_chunk
from ._dispatch import Dispatcher
from ._jobfiles import JobFiles, empty_results
from ._jobs import Job
from ._output import Output
from ._progress import attach_progress_bar
from ._reduce import Fold, build_reduce_request
from ._request import (
    UNSET,
    JobRequest,
    PoolDefaults,
    build_request,
    check_args,
    check_call,
    check_retries,
    check_timeout,
    check_timeout_enforceable,
)
from ._run import Run, RunControl
from ._stepfiles import IterateFiles, StepControl
from ._steps import IterateRequest, build_iterate_request
from ._workspace import OwnerOnly, Workspace, check_temp_dir
from .backends import Backend
from .backends.executor import ExecutorBackend
from .backends.processes import ProcessBackend
from .backends.threads import ThreadBackend

log = logging.getLogger("memmap_pool")

DISPATCHER_STOP_TIMEOUT = 30.0
"""Seconds ``shutdown(cancel_futures=True)`` waits for the batches in flight to come back."""

DRAIN_TIMEOUT = DISPATCHER_STOP_TIMEOUT * 100
"""Seconds ``shutdown()`` waits for running jobs to finish: as long as a job may take."""

_WORKER_OPTIONS = ("mp_context", "initializer", "initargs", "worker_threads", "max_tasks_per_child")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), the default number of workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class MemmapPool(Executor):
    """A pool of worker processes that run chunk kernels writing into a shared memmap.

    It is a ``concurrent.futures.Executor`` (``submit``, ``map``, ``shutdown`` and ``with``
    behave as ``ProcessPoolExecutor``'s), and adds :meth:`map_chunks` and
    :meth:`submit_chunks`, which allocate an output array in a memory-mapped file, split it
    into chunks and have the workers fill their chunks in place. No array data crosses
    between processes: only batches of chunk indices of a few dozen bytes do.

    Args:
        max_workers: worker processes (default: the number of usable CPUs).
        mp_context: a multiprocessing context or a start method name ("fork", "forkserver",
            "spawn"); default: the platform's default.
        initializer: called in each worker when it starts, with ``initargs``.
        initargs: arguments of ``initializer``.
        temp_dir: directory for temporary outputs and inputs; default:
            ``$MEMMAP_POOL_TEMP_DIR``, else /dev/shm when it has room, else the system
            temp dir.
        retries: default for jobs: how many times a chunk is re-run after its worker died.
        timeout: default for jobs: seconds a chunk may run before its worker is killed.
        worker_threads: BLAS/OpenMP threads per worker. "auto" (default) gives
            ``cores // max_workers`` so the pool doesn't oversubscribe the machine; None
            leaves the libraries' own defaults.
        executor: run on this ``concurrent.futures.Executor`` instead of the pool's own
            process pool (the pool then does not shut it down).
        shared_dir: for executors whose workers run on other hosts: a directory every
            worker sees, where outputs and inputs are put.
        max_tasks_per_child: passed to ``ProcessPoolExecutor``.
        backend: ``"processes"`` (default): worker processes, for any kernel; ``"threads"``:
            threads of this process, for kernels that release the GIL (numpy on large
            blocks, numba ``nogil``, most of scipy): temporary outputs then live in this
            process's memory (with transparent huge pages) and are returned as read-only
            arrays, and in-memory inputs are used as they are. Timeouts can't be enforced on
            threads (``ValueError``); ``mp_context`` and ``max_tasks_per_child`` don't apply
            (``ValueError``); ``worker_threads`` caps the process's BLAS pools while the pool
            lives (with threadpoolctl). See docs/performance.md for which backend suits
            which kernel.

    Raises:
        ValueError: a bad option, or one the backend can't honour: ``mp_context``,
            ``initializer``, ``initargs``, ``worker_threads`` and ``max_tasks_per_child``
            shape the pool's own worker processes, and are refused with ``executor=`` or
            on a Dask cluster, whose workers the pool does not start.
        TypeError: ``executor`` is not an Executor.

    Example:
        >>> with MemmapPool() as pool:  # doctest: +SKIP
        ...     img = pool.map_chunks(render, (8192, 8192), dtype="float32")
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: multiprocessing.context.BaseContext | str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        temp_dir: str | os.PathLike[str] | None = None,
        retries: int = 2,
        timeout: float | None = None,
        worker_threads: int | str | None = "auto",
        executor: Executor | None = None,
        shared_dir: str | os.PathLike[str] | None = None,
        max_tasks_per_child: int | None = None,
        backend: str = "processes",
        _backend: Backend | None = None,
    ) -> None:
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                msg = f"max_workers must be a positive int (got {max_workers!r})"
                raise ValueError(msg)
            if max_workers < 1:
                # ProcessPoolExecutor's own words, for code that matches on them.
                msg = "max_workers must be greater than 0"
                raise ValueError(msg)
        self._retries = check_retries(retries)
        self._timeout = check_timeout(timeout)
        temp = check_temp_dir(temp_dir)
        shared = None if shared_dir is None else os.path.abspath(os.fspath(shared_dir))
        worker_options = {
            "mp_context": mp_context,
            "initializer": initializer,
            "initargs": initargs or None,
            "worker_threads": None if worker_threads == "auto" else worker_threads,
            "max_tasks_per_child": max_tasks_per_child,
        }
        if _backend is not None or executor is not None:
            given = [name for name in _WORKER_OPTIONS if worker_options[name] is not None]
            if _backend is not None and max_workers is not None:
                given.insert(0, "max_workers")
            if given:
                where = "a Dask cluster" if _backend is not None else "executor="
                msg = (
                    f"{', '.join(given)} shape{'s' if len(given) == 1 else ''} the pool's own "
                    f"worker processes, which {where} does not use: configure the workers "
                    "where they are created, or drop the option"
                )
                raise ValueError(msg)
        if backend not in ("processes", "threads"):
            msg = f"backend must be 'processes' or 'threads' (got {backend!r})"
            raise ValueError(msg)
        if backend == "threads":
            if executor is not None or _backend is not None:
                msg = "backend='threads' runs the pool's own threads: it can't take executor="
                raise ValueError(msg)
            for option in ("mp_context", "max_tasks_per_child"):
                if worker_options[option] is not None:
                    msg = (
                        f"{option} shapes worker processes, which backend='threads' does not "
                        "start; drop it, or use backend='processes'"
                    )
                    raise ValueError(msg)
        chosen: Backend
        if _backend is not None:
            chosen = _backend
        elif backend == "threads":
            chosen = _thread_backend(max_workers, initializer, initargs, worker_threads)
        elif executor is not None:
            if not isinstance(executor, Executor):
                msg = f"executor must be a concurrent.futures.Executor (got {executor!r})"
                raise TypeError(msg)
            chosen = ExecutorBackend(executor, max_workers)
        else:
            chosen = _process_backend(
                max_workers, mp_context, initializer, initargs, worker_threads, max_tasks_per_child
            )
        capabilities = chosen.capabilities
        if not capabilities.shares_page_cache and shared is None:
            msg = "workers on other hosts need shared_dir=, a directory every worker sees"
            raise ValueError(msg)
        check_timeout_enforceable(self._timeout, capabilities)
        if shared is not None:
            chosen.check_shared_dir(shared)
        self._backend = chosen
        self._workspace = Workspace(temp, shared)
        self._dispatcher = Dispatcher(chosen)
        self._lock = threading.Lock()
        self._shutdown = False
        self._owner_pid = os.getpid()
        # Dropping the last reference to a pool shuts it down as shutdown(wait=False) does;
        # at interpreter exit, the finalizer runs in this process only (see OwnerOnly).
        self._finalizer = weakref.finalize(
            self, OwnerOnly(_release_unreferenced), self._dispatcher, chosen, self._workspace
        )

    @classmethod
    def from_dask(
        cls,
        client_or_address: Any,
        shared_dir: str | os.PathLike[str],
        **kwargs: Any,
    ) -> MemmapPool:
        """A pool that runs its jobs on a Dask distributed cluster.

        Args:
            client_or_address: a ``distributed.Client`` or a scheduler address
                ("tcp://host:8786").
            shared_dir: a directory every worker sees at the same path (NFS, Lustre, ...):
                outputs, inputs and journals go there.
            **kwargs: other ``MemmapPool`` options (``retries``, ...).

        Raises:
            ImportError: when ``distributed`` is not installed.
            SharedDirError: when a worker cannot write ``shared_dir``.
            ValueError: an option that shapes the pool's own workers (see the class).
        """
        from .backends.dask import DaskBackend

        backend = DaskBackend(client_or_address)
        try:
            return cls(shared_dir=shared_dir, _backend=backend, **kwargs)
        except BaseException:
            backend.shutdown()
            raise

    # -- Executor ------------------------------------------------------------------------------

    @property
    def max_workers(self) -> int:
        """Number of workers: processes of the pool's own, or the executor's or cluster's
        worker threads (the jobs' batches in flight are sized by it)."""
        return self._backend.n_workers

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a worker, as ``ProcessPoolExecutor.submit`` does."""
        self._check_open()
        return self._backend.submit_task(fn, *args, **kwargs)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """``ProcessPoolExecutor.map``: results in order, ``chunksize`` items per task."""
        self._check_open()
        return self._backend.map_tasks(fn, iterables, timeout, chunksize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the pool, as ``ProcessPoolExecutor.shutdown`` does.

        Running jobs and submitted tasks finish (``cancel_futures=True`` cancels the jobs and
        the tasks not started), then the workers stop and the pool's temporary files are
        removed. ``wait=False`` returns at once and does the rest in a background thread.
        Arrays returned earlier stay readable: their files are unlinked, and the memory goes
        when the last reference to them does. A second call does nothing.
        """
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
        self._finalizer.detach()
        if os.getpid() != self._owner_pid:
            return  # a forked child: the workers, jobs and files are its parent's
        if wait:
            _release(self._dispatcher, self._backend, self._workspace, cancel_futures)
            return
        if cancel_futures:
            # Cancelled now, in this thread, as ProcessPoolExecutor does: what runs finishes.
            self._dispatcher.stop(timeout=0)
            self._backend.shutdown(wait=False, cancel_futures=True)
        _release_in_background(self._dispatcher, self._backend, self._workspace, cancel_futures)

    def _check_open(self) -> None:
        if self._shutdown:
            msg = "cannot schedule new work after shutdown"
            raise RuntimeError(msg)

    # -- chunked jobs --------------------------------------------------------------------------

    def map_chunks(
        self,
        fn: Callable[..., Any],
        shape: int | Sequence[int],
        dtype: Any = None,
        *,
        chunks: Any = None,
        order: str | None = None,
        inputs: Any = (),
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        out: Any = None,
        outputs: Sequence[Output] | None = None,
        resume: bool = False,
        retries: int | None = None,
        timeout: float | None = UNSET,
        progress: bool | str = False,
        name: str | None = None,
    ) -> Any:
        """Compute an array chunk by chunk on the workers and return it.

        ``fn(out, chunk, *input_views, *args, **kwargs)`` is called in a worker for each
        chunk: ``out`` is a writable view of the chunk's region of the output, ``chunk`` its
        :class:`~memmap_pool.Chunk` descriptor (``chunk.slices``, ``chunk.index``), and
        ``input_views`` read-only views of the same region of each input (widened by its
        depth for a :class:`~memmap_pool.Halo` input; ``chunk.interior(k)`` locates the
        region in view ``k``).

        Args:
            fn: the kernel; any callable, including lambdas and closures (sent with
                cloudpickle once per job).
            shape: shape of the output.
            dtype: dtype of the output (default: the kernel's, else float64).
            chunks: "auto" (default), rows along axis 0 per chunk (int), or a block shape
                (tuple; None for a whole axis).
            order: "C" (default) or "F" layout of the output.
            inputs: arrays the kernel reads: ``np.memmap``s and ``.npy`` paths are passed by
                reference; in-memory arrays are written once to the temp dir. Wrap one in
                :class:`~memmap_pool.Halo` to see its neighbourhood too.
            args: extra positional arguments of ``fn``.
            kwargs: extra keyword arguments of ``fn``.
            out: None for a temporary output; a ``.npy`` path for a persistent one; or a
                writable ``np.memmap`` to update in place (the kernel sees its values).
            outputs: several outputs, a list of :class:`~memmap_pool.Output`, instead of
                ``dtype``/``out``: the kernel's ``out`` is then a tuple of views, one per
                output, and the call returns a tuple of arrays in the same order.
            resume: with a ``.npy`` ``out`` (every output's, with ``outputs``), run only the
                chunks its journal lacks.
            retries: re-runs of a chunk whose worker died (default: the pool's).
            timeout: seconds a chunk may run (default: the pool's; None for no limit).
            progress: True for a tqdm progress bar on a terminal, "always" to force it.
            name: a name for the job in progress bars, logs and errors.

        Returns:
            A read-only ``np.memmap`` of the output (the caller's own array when ``out`` is
            an ``np.memmap``); with ``outputs``, a tuple of them.

        Raises:
            TypeError, ValueError: bad arguments, before any work starts (``outputs``
                together with ``dtype`` or ``out`` is a ``TypeError``).
            NotEnoughSpaceError: no room for the output.
            JournalMismatchError: ``resume=True`` with a journal of another job.
            SerializationError: the kernel or its arguments can't be pickled.
            WorkerCrashedError, ChunkTimeoutError: see :mod:`memmap_pool.errors`.
            Exception: whatever the kernel raised, with a note naming the chunk.
        """
        job = self.submit_chunks(
            fn, shape, dtype, chunks=chunks, order=order, inputs=inputs, args=args,
            kwargs=kwargs, out=out, outputs=outputs, resume=resume, retries=retries,
            timeout=timeout, progress=progress, name=name,
        )  # fmt: skip
        return job.wait()

    def submit_chunks(
        self,
        fn: Callable[..., Any],
        shape: int | Sequence[int],
        dtype: Any = None,
        *,
        chunks: Any = None,
        order: str | None = None,
        inputs: Any = (),
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        out: Any = None,
        outputs: Sequence[Output] | None = None,
        resume: bool = False,
        retries: int | None = None,
        timeout: float | None = UNSET,
        progress: bool | str = False,
        name: str | None = None,
    ) -> Job:
        """Start a chunked job and return its :class:`Job`, a future of the output array.

        Takes the same arguments as :meth:`map_chunks` and raises the same errors before
        any work starts; what happens later is raised by the job's ``result()``. Several
        jobs run at once and share the workers fairly.
        """
        self._check_open()
        request = build_request(
            fn, shape, dtype, chunks=chunks, order=order, inputs=inputs, args=args,
            kwargs=kwargs, out=out, outputs=outputs, resume=resume, retries=retries,
            timeout=timeout, progress=progress, name=name, defaults=self._defaults(),
        )  # fmt: skip
        return self._start(request, single_output=outputs is None)

    def map_blocks(
        self,
        fn: Callable[..., Any],
        *arrays: Any,
        dtype: Any = None,
        depth: Any = 0,
        boundary: Any = "none",
        chunks: Any = None,
        out: Any = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        progress: bool | str = False,
        name: str | None = None,
    ) -> np.ndarray[Any, Any]:
        """Apply a function that returns its block to each chunk of ``arrays``.

        ``fn(*blocks, *args, **kwargs)`` is called in a worker for each chunk, with the
        chunk's block of each array (widened by ``depth`` as a :class:`~memmap_pool.Halo`
        with ``boundary``), and returns an array: with the shape of the padded first block,
        the library trims the halo; with the shape of the chunk's region, it is written as
        it is. The worker writes it into the shared output: it is never sent back. If
        ``fn`` has a parameter named ``chunk``, it gets the chunk's
        :class:`~memmap_pool.Chunk` as that keyword.

        Args:
            fn: the block function (lambdas and closures work under every start method).
            *arrays: arrays, ``np.memmap``s, ``.npy`` paths or ``Halo`` s; the output has the
                first one's shape, and the others match it on the axes the chunks split.
            dtype: the output's dtype (default: the first array's). A result of another
                kind (floats into an integer output) is a ``TypeError``: give ``dtype``.
            depth: the halo of every array that is not a ``Halo`` of its own (an int, a
                tuple per axis, or a dict ``{axis: depth}``).
            boundary: what lies beyond the arrays' edges (see ``Halo``).
            chunks, out, args, kwargs, progress, name: as for :meth:`map_chunks`.

        Returns:
            A read-only ``np.memmap`` of the output (``out`` itself when it is one).

        Raises:
            TypeError, ValueError: bad arguments, before any work starts.
            ValueError: (from the job) ``fn`` returned an array of another shape; the
                message names the chunk.
            Exception: whatever ``fn`` raised, with a note naming the chunk.

        Example:
            >>> sharp = pool.map_blocks(  # doctest: +SKIP
            ...     lambda b: gaussian_filter(b, 4, mode="reflect"), img, depth=16,
            ...     boundary="symmetric")
        """
        job = self.submit_blocks(
            fn, *arrays, dtype=dtype, depth=depth, boundary=boundary, chunks=chunks, out=out,
            args=args, kwargs=kwargs, progress=progress, name=name,
        )  # fmt: skip
        return job.wait()  # type: ignore[no-any-return]

    def submit_blocks(
        self,
        fn: Callable[..., Any],
        *arrays: Any,
        dtype: Any = None,
        depth: Any = 0,
        boundary: Any = "none",
        chunks: Any = None,
        out: Any = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        progress: bool | str = False,
        name: str | None = None,
    ) -> Job:
        """Start :meth:`map_blocks` as a job and return its :class:`Job`; same arguments,
        and the same errors before any work starts."""
        self._check_open()
        if not callable(fn):
            msg = f"fn must be callable, the block function (got {fn!r})"
            raise TypeError(msg)
        if not arrays:
            msg = "map_blocks needs at least one array: map_blocks(fn, array, ...)"
            raise TypeError(msg)
        check_args(args, kwargs)
        shape, first_dtype = first_array_layout(arrays[0])
        inputs = block_inputs(arrays, depth, boundary)
        job_name = str(getattr(fn, "__name__", "blocks")) if name is None else name
        pass_chunk = takes_chunk(fn)
        call_kwargs = dict(kwargs or {})
        check_call(
            fn, job_name, (), len(arrays), args,
            {**call_kwargs, "chunk": None} if pass_chunk else call_kwargs,
        )  # fmt: skip
        wrapper = BlockKernel(fn, job_name, args, call_kwargs, pass_chunk)
        request = build_request(
            wrapper, shape, first_dtype if dtype is None and out is None else dtype,
            chunks=chunks, inputs=inputs, out=out, progress=progress, name=job_name,
            defaults=self._defaults(), check_kernel=False,
        )  # fmt: skip
        return self._start(request)

    def reduce_chunks(
        self,
        fn: Callable[..., Any],
        inputs: Any,
        combine: Callable[[Any, Any], Any],
        *,
        shape: int | Sequence[int] | None = None,
        chunks: Any = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        progress: bool | str = False,
        name: str | None = None,
    ) -> Any:
        """Reduce inputs chunk by chunk to one value, with no output array.

        ``fn(chunk, *input_views, *args, **kwargs)`` runs in a worker for each chunk and
        returns a partial result (a number or a small array); the parent combines the
        partials with ``combine(a, b)``, which must be associative, in the order of the chunk
        indices: ``combine(combine(p0, p1), p2) ...``. The result is the same bit for bit on
        every run with the same chunking, whatever the number of workers, the backend or the
        order in which chunks finish; "auto" chunks depend on the arrays alone.

        Args:
            fn: the chunk function; any callable, lambdas included.
            inputs: as for :meth:`map_chunks` (by reference; ``Halo`` s too).
            combine: ``combine(a, b)`` of two partial results (``np.add``, ``max``, ...).
            shape: the chunk grid's shape (default: the first input's).
            chunks, args, kwargs, progress, name: as for :meth:`map_chunks`.

        Returns:
            The combined value.

        Raises:
            TypeError: ``fn`` or ``combine`` is not callable, or ``fn`` can't be called as
                ``fn(chunk, *inputs, *args, **kwargs)``; (from the job) ``fn`` returned None.
            ValueError: no ``shape`` and no input, a shape with no elements, or inputs that
                do not fit; before any work.
            Exception: whatever ``fn`` or ``combine`` raised, with a note naming the chunk.

        Example:
            >>> total = pool.reduce_chunks(  # doctest: +SKIP
            ...     lambda chunk, x: x.sum(dtype="float64"), ["big.npy"], np.add)
        """
        job = self.submit_reduce(
            fn, inputs, combine, shape=shape, chunks=chunks, args=args, kwargs=kwargs,
            progress=progress, name=name,
        )  # fmt: skip
        return job.wait()

    def submit_reduce(
        self,
        fn: Callable[..., Any],
        inputs: Any,
        combine: Callable[[Any, Any], Any],
        *,
        shape: int | Sequence[int] | None = None,
        chunks: Any = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        progress: bool | str = False,
        name: str | None = None,
    ) -> Job:
        """Start :meth:`reduce_chunks` as a job and return its :class:`Job`, whose result is
        the combined value (progress, cancel and stats as for any job; ``chunk_results()``
        holds no partials: they are folded as they arrive, then dropped)."""
        self._check_open()
        request = build_reduce_request(
            fn, inputs, combine, shape=shape, chunks=chunks, args=args, kwargs=kwargs,
            progress=progress, name=name, defaults=self._defaults(),
        )  # fmt: skip
        return self._start(request, combine=combine)

    def iterate(
        self,
        fn: Callable[..., Any],
        initial: Any,
        steps: int,
        *,
        depth: Any = 0,
        boundary: Any = "none",
        inputs: Any = (),
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        chunks: Any = None,
        out: str | os.PathLike[str] | None = None,
        resume: bool = False,
        checkpoint: int | None = None,
        progress: bool | str = False,
        name: str | None = None,
    ) -> np.ndarray[Any, Any]:
        """Step a state ``steps`` times, chunk by chunk, in place; return the final state.

        Step ``k`` (1 to ``steps``) computes the new state from the previous one:
        ``fn(out, chunk, prev, *input_views, *args, **kwargs)`` runs in a worker for each
        chunk, with ``out`` the chunk's region of the new state and ``prev`` the previous
        state seen as ``Halo(prev, depth, boundary)`` (``chunk.interior(0)`` locates the
        region in it; ``chunk.step`` is ``k``). Two buffers alternate; no step starts before
        the previous one is complete; the buffers stay mapped and resident in the workers
        from step to step, and a step is one round of batches, with no file created.

        Args:
            fn: the step kernel.
            initial: the state before step 1: anything ``inputs=`` takes; never modified.
            steps: how many steps (a positive int).
            depth, boundary: the previous state's halo (see ``Halo``).
            inputs: other arrays the kernel reads at every step (``Halo`` s too).
            args, kwargs, chunks, progress, name: as for :meth:`map_chunks`.
            out: None for a temporary state, or a ``.npy`` path that holds the final state
                (its step journal lives beside it).
            resume: with a ``.npy`` ``out``, continue from the last step its journal
                records (with more ``steps``, up to the new count).
            checkpoint: every this many steps, make the state durable (fsync) before the
                journal records it; default 1 for a ``.npy`` ``out``.

        Returns:
            The final state, a read-only ``np.memmap`` (of ``out`` when given).

        Raises:
            TypeError, ValueError: bad arguments, before any work starts.
            JournalMismatchError: ``resume=True`` with a journal of another state, fewer
                ``steps`` than already done, or (after a machine restart) a step that was
                not made durable.
            Exception: whatever the kernel raised, with a note naming the chunk.

        Example:
            >>> final = pool.iterate(  # doctest: +SKIP
            ...     heat, u0, steps=200, depth=1, boundary="edge", args=(0.1,))
        """
        job = self.submit_iterate(
            fn, initial, steps, depth=depth, boundary=boundary, inputs=inputs, args=args,
            kwargs=kwargs, chunks=chunks, out=out, resume=resume, checkpoint=checkpoint,
            progress=progress, name=name,
        )  # fmt: skip
        return job.wait()  # type: ignore[no-any-return]

    def submit_iterate(
        self,
        fn: Callable[..., Any],
        initial: Any,
        steps: int,
        *,
        depth: Any = 0,
        boundary: Any = "none",
        inputs: Any = (),
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        chunks: Any = None,
        out: str | os.PathLike[str] | None = None,
        resume: bool = False,
        checkpoint: int | None = None,
        progress: bool | str = False,
        name: str | None = None,
    ) -> Job:
        """Start :meth:`iterate` as a job and return its :class:`Job`, whose result is the
        final state; its progress counts the chunks of every step this call runs."""
        self._check_open()
        request = build_iterate_request(
            fn, initial, steps, depth=depth, boundary=boundary, inputs=inputs, args=args,
            kwargs=kwargs, chunks=chunks, out=out, resume=resume, checkpoint=checkpoint,
            progress=progress, name=name, defaults=self._defaults(),
        )  # fmt: skip
        files = IterateFiles.create(request, self._workspace, self._backend.capabilities)
        return self._launch(files, request, lambda: self._prepare_iterate(request, files))

    def _defaults(self) -> PoolDefaults:
        return PoolDefaults(
            workers=self.max_workers,
            retries=self._retries,
            timeout=self._timeout,
            capabilities=self._backend.capabilities,
        )

    def _start(
        self,
        request: JobRequest,
        single_output: bool = True,
        combine: Callable[[Any, Any], Any] | None = None,
    ) -> Job:
        """Create the job's files and hand it to the dispatcher (``combine``: a reduction's,
        whose partial results the job folds into its result)."""
        plan = request.plan
        if request.outputs and request.nbytes == 0:
            job = Job(plan.count, self.max_workers, request.name)
            job.set_running_or_notify_cancel()
            results = empty_results(request)
            job._finish(results[0] if single_output else results)
            return job
        files = JobFiles.create(request, self._workspace, self._backend.capabilities)
        return self._launch(
            files, request, lambda: self._prepare(request, files, single_output, combine)
        )

    def _launch(
        self,
        files: JobFiles | IterateFiles,
        request: JobRequest | IterateRequest,
        prepare: Callable[[], _Launch],
    ) -> Job:
        """Hand a job whose files were just created to the dispatcher; ``prepare`` makes the
        job and its run, and says what to log."""
        try:
            launch = prepare()
            if launch.run is None:
                return launch.job
            launch.job._attach(RunControl(launch.run, self._dispatcher))
            if request.progress:
                attach_progress_bar(launch.job, request.progress, request.name)
            log.info(launch.log_message, *launch.log_args)
        except BaseException:
            # Ctrl-C (or any error) before the dispatcher holds the job: nobody else would
            # remove its files.
            files.cleanup(succeeded=False)
            raise
        self._dispatcher.add(launch.run)
        return launch.job

    def _prepare(
        self,
        request: JobRequest,
        files: JobFiles,
        single_output: bool,
        combine: Callable[[Any, Any], Any] | None,
    ) -> _Launch:
        """The job and its run, for files just created."""
        plan = request.plan
        resumed = int(files.done.sum())
        job = Job(
            plan.count,
            self.max_workers,
            request.name,
            resumed=resumed,
            resumed_bytes=plan.chunks_nbytes(np.flatnonzero(files.done), request.cell_nbytes),
        )
        fold = None if combine is None else Fold(plan.count, combine)
        run = Run(job, files, request.retries, request.timeout, single_output, fold)
        return _Launch(
            job,
            run,
            "job %s: %s %s in %d chunks%s",
            (
                request.name,
                plan.shape,
                request.outputs[0].dtype if request.outputs else "reduction",
                plan.count,
                f" ({resumed} already done)" if resumed else "",
            ),
        )

    def _prepare_iterate(self, request: IterateRequest, files: IterateFiles) -> _Launch:
        """The job and its run of steps, for files just created."""
        plan = request.plan
        remaining = request.steps - files.first_step + 1
        job = Job(plan.count * remaining, self.max_workers, request.name)
        if remaining <= 0:  # a resume that finds every step done
            job.set_running_or_notify_cancel()
            value = files.result()[0]
            files.cleanup(succeeded=True)
            job._finish(value)
            return _Launch(job)
        control = StepControl(files, files.first_step, request.steps, request.checkpoint)
        run = Run(job, files, request.retries, request.timeout, steps=control)
        return _Launch(
            job,
            run,
            "job %s: %d steps of %s %s in %d chunks%s",
            (
                request.name,
                remaining,
                plan.shape,
                request.dtype,
                plan.count,
                f" (from step {files.first_step})" if files.first_step > 1 else "",
            ),
        )


@dataclass(frozen=True)
class _Launch:
    """A job ready to hand to the dispatcher, and the line that logs its start."""

    job: Job
    run: Run | None = None  # None: nothing to run, the job is finished already
    log_message: str = ""
    log_args: tuple[object, ...] = ()


def _worker_blas_threads(worker_threads: int | str | None, workers: int) -> int | None:
    """``worker_threads`` as a number of BLAS/OpenMP threads per worker (None: no limit)."""
    if worker_threads == "auto":
        return max(1, usable_cpus() // workers)
    if worker_threads is None:
        return None
    if (
        isinstance(worker_threads, int)
        and not isinstance(worker_threads, bool)
        and worker_threads >= 1
    ):
        return worker_threads
    msg = f"worker_threads must be 'auto', None or a positive int (got {worker_threads!r})"
    raise ValueError(msg)


def _thread_backend(
    max_workers: int | None,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    worker_threads: int | str | None,
) -> ThreadBackend:
    workers = max_workers or usable_cpus()
    threads = _worker_blas_threads(worker_threads, workers)
    return ThreadBackend(workers, initializer, initargs, threads)


def _process_backend(
    max_workers: int | None,
    mp_context: multiprocessing.context.BaseContext | str | None,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    worker_threads: int | str | None,
    max_tasks_per_child: int | None,
) -> ProcessBackend:
    workers = max_workers or usable_cpus()
    threads = _worker_blas_threads(worker_threads, workers)
    context = multiprocessing.get_context(mp_context) if isinstance(mp_context, str) else mp_context
    return ProcessBackend(workers, context, initializer, initargs, threads, max_tasks_per_child)


def _release(
    dispatcher: Dispatcher,
    backend: Backend,
    workspace: Workspace,
    cancel_futures: bool = False,
) -> None:
    """Stop everything a pool holds: its jobs finish (or are cancelled), then its workers
    stop and its files go."""
    stopped: list[bool] = []

    def stop_backend() -> None:
        if not stopped:
            stopped.append(True)
            backend.shutdown(wait=True, cancel_futures=cancel_futures)

    if dispatcher.alive:
        # The dispatcher's thread stops the backend as its last act (workers it started
        # die with it, see ProcessBackend.submit); the join waits for both.
        stop = dispatcher.stop if cancel_futures else dispatcher.stop_when_idle
        stop(DRAIN_TIMEOUT, stop_backend)
    if dispatcher.alive:  # pragma: no cover - a job that never ends
        log.warning("memmap-pool: the pool's jobs did not end in time; stopping its workers")
    else:
        stop_backend()  # once: unless the dispatcher's thread did it already
    workspace.close()


def _release_in_background(
    dispatcher: Dispatcher, backend: Backend, workspace: Workspace, cancel_futures: bool
) -> None:
    # Not a daemon: like ProcessPoolExecutor's workers, the interpreter waits at exit for
    # the tasks already submitted.
    threading.Thread(
        target=_release,
        args=(dispatcher, backend, workspace, cancel_futures),
        name="memmap-pool-shutdown",
        daemon=False,
    ).start()


def _release_unreferenced(dispatcher: Dispatcher, backend: Backend, workspace: Workspace) -> None:
    """A pool garbage-collected, or still open at interpreter exit."""
    if threading.main_thread().is_alive():
        # Garbage collection: don't block the thread that dropped the pool.
        _release_in_background(dispatcher, backend, workspace, False)
        return
    # At exit (after threading's shutdown): no new tasks can start, so jobs still running
    # are stopped; tasks already submitted run to their end, as ProcessPoolExecutor's do.
    dispatcher.stop(timeout=DISPATCHER_STOP_TIMEOUT)
    _release(dispatcher, backend, workspace)
