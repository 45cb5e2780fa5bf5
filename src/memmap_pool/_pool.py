"""MemmapPool: a process pool whose jobs write straight into shared memory-mapped arrays.

How one ``map_chunks`` call travels::

    parent (caller's thread)                      parent (dispatcher)        worker (one of N)
    ------------------------                      -------------------        -----------------
    validate fn, shape, dtype, order, chunks,
      inputs, out  (errors here: nothing written)
    plan the chunks (auto: bytes, page-aligned)
    check free space, create the output file
    inputs: memmaps/.npy by reference; arrays
      dumped once to the temp dir
    spec file: plan + file refs + cloudpickled
      kernel (once per job)
    Job ──────────────────────────────────▶    batches of indices ─────▶  map files once per job
                                               (round robin, sized        kernel(out[region],
                                                to ~50 ms of work)          chunk, *input views)
                                                  ◀──── indices done, timings (no array data)
                                                  journal, retries, timeouts
    result(): read-only memmap of the output ◀──  all chunks done: finish, remove temp files
"""

from __future__ import annotations

import errno
import logging
import math
import multiprocessing
import os
import pickle
import secrets
import shutil
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from typing import Any

import cloudpickle
import numpy as np

from ._chunks import (
    PAGE_SIZE,
    ChunkPlan,
    normalize_dtype,
    normalize_order,
    normalize_shape,
    plan_chunks,
    region_nbytes,
    shares_pages,
)
from ._dispatch import Dispatcher, Run
from ._executors import Backend, ExecutorBackend, LocalProcessBackend
from ._jobs import Job, Progress
from ._journal import Journal, journal_path
from ._kernel import Kernel
from ._storage import (
    NPY_HEADER_BYTES,
    ArrayRef,
    NpyInfo,
    allocated_bytes,
    check_room,
    choose_base_dir,
    contiguous_strides,
    create_npy,
    create_raw,
    make_private_dir,
    memmap_holder,
    memmap_ref,
    read_npy_header,
    remove_leftovers,
)
from ._worker import JobSpec, status_layout, status_views
from .errors import JournalMismatchError, NotEnoughSpaceError, SerializationError

log = logging.getLogger("memmap_pool")

INTERRUPT_CLEANUP_TIMEOUT = 10.0
"""After Ctrl-C or SIGTERM, seconds to wait for the interrupted job's workers to be killed and
its files removed before the exception propagates anyway."""

FAILURE_DRAIN_TIMEOUT = 2.0
"""After a job fails (a kernel exception, a timeout, a crash), seconds map_chunks lets the
job's chunks still running finish before it kills their workers and raises."""

DISPATCHER_STOP_TIMEOUT = 30.0

_UNSET: Any = object()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _resolve_context(
    mp_context: multiprocessing.context.BaseContext | str | None,
) -> multiprocessing.context.BaseContext | None:
    if isinstance(mp_context, str):
        return multiprocessing.get_context(mp_context)
    return mp_context


class MemmapPool(Executor):
    """A pool of worker processes that run chunk kernels writing into a shared memmap.

    It is a ``concurrent.futures.Executor`` (``submit``, ``map``, ``shutdown`` and ``with``
    behave as ``ProcessPoolExecutor``'s), and adds :meth:`map_chunks` and
    :meth:`submit_chunks`, which allocate an output array in a memory-mapped file, split it
    into chunks and have the workers fill their chunks in place. No array data crosses
    between processes: only chunk descriptors of a few dozen bytes do.

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
        _backend: Backend | None = None,
    ) -> None:
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
        ):
            msg = f"max_workers must be a positive int (got {max_workers!r})"
            raise ValueError(msg)
        self._retries = _check_retries(retries)
        self._timeout = _check_timeout(timeout)
        self._temp_dir = None if temp_dir is None else os.fspath(temp_dir)
        self._shared_dir = None if shared_dir is None else os.path.abspath(os.fspath(shared_dir))
        if self._temp_dir is not None and not os.path.isdir(self._temp_dir):
            msg = f"temp_dir {self._temp_dir!r} is not a directory"
            raise ValueError(msg)
        if _backend is not None:
            backend = _backend
        elif executor is not None:
            if not isinstance(executor, Executor):
                msg = f"executor must be a concurrent.futures.Executor (got {executor!r})"
                raise TypeError(msg)
            backend = ExecutorBackend(executor, max_workers)
        else:
            workers = max_workers or _usable_cpus()
            threads: int | None
            if worker_threads == "auto":
                threads = max(1, _usable_cpus() // workers)
            elif worker_threads is None:
                threads = None
            elif isinstance(worker_threads, int) and worker_threads >= 1:
                threads = worker_threads
            else:
                msg = (
                    "worker_threads must be 'auto', None or a positive int "
                    f"(got {worker_threads!r})"
                )
                raise ValueError(msg)
            backend = LocalProcessBackend(
                workers,
                _resolve_context(mp_context),
                initializer,
                initargs,
                threads,
                max_tasks_per_child,
            )
        if not backend.same_host and self._shared_dir is None:
            msg = "workers on other hosts need shared_dir=, a directory every worker sees"
            raise ValueError(msg)
        _check_timeout_enforceable(self._timeout, backend)
        if self._shared_dir is not None:
            backend.check_shared_dir(self._shared_dir)
        self._backend = backend
        self._dispatcher = Dispatcher(backend)
        self._lock = threading.Lock()
        self._dirs: dict[str, str] = {}  # base dir -> this pool's private dir in it
        self._shutdown = False
        self._finalizer = weakref.finalize(
            self, _release, self._dispatcher, backend, self._dirs, backend.can_recover
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
        """
        from ._dask import DaskBackend

        backend = DaskBackend(client_or_address)
        try:
            return cls(shared_dir=shared_dir, _backend=backend, **kwargs)
        except BaseException:
            backend.shutdown()
            raise

    # -- Executor ------------------------------------------------------------------------------

    @property
    def max_workers(self) -> int:
        """Number of workers."""
        return self._backend.n_workers

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a worker, as ``ProcessPoolExecutor.submit`` does."""
        self._check_open()
        backend = self._backend
        if isinstance(backend, LocalProcessBackend) and backend.broken():
            backend.recover(backend.generation)
        return backend.submit(fn, *args, **kwargs)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """``ProcessPoolExecutor.map``: results in order, ``chunksize`` items per task."""
        self._check_open()
        backend = self._backend
        if isinstance(backend, LocalProcessBackend) and backend.broken():
            backend.recover(backend.generation)
        return backend.executor.map(fn, *iterables, timeout=timeout, chunksize=chunksize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the pool: wait for (or cancel) running jobs, stop the workers, and remove the
        pool's temporary files. Arrays returned earlier stay readable: their files are
        unlinked, and the memory goes when the last reference to them does."""
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
        if cancel_futures:
            self._dispatcher.stop(timeout=DISPATCHER_STOP_TIMEOUT if wait else 0)
        elif wait:
            # Let running jobs finish, then stop the dispatcher.
            self._dispatcher.stop_when_idle(DISPATCHER_STOP_TIMEOUT * 100)
        else:
            # As ProcessPoolExecutor: return now, let running jobs finish. The rest of the
            # shutdown happens in the background once they have (or at exit, through the
            # finalizer, whichever comes first).
            threading.Thread(
                target=self._shut_down_when_idle, name="memmap-pool-shutdown", daemon=True
            ).start()
            return
        self._finalizer.detach()
        _release(
            self._dispatcher,
            self._backend,
            self._dirs,
            self._backend.can_recover,
            wait=wait,
            cancel_futures=cancel_futures,
        )

    def _shut_down_when_idle(self) -> None:
        self._dispatcher.stop_when_idle(DISPATCHER_STOP_TIMEOUT * 100)
        self._finalizer()

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
        resume: bool = False,
        retries: int | None = None,
        timeout: float | None = _UNSET,
        progress: bool | str = False,
        name: str | None = None,
    ) -> np.ndarray[Any, Any]:
        """Compute an array chunk by chunk on the workers and return it.

        ``fn(out, chunk, *input_views, *args, **kwargs)`` is called in a worker for each
        chunk: ``out`` is a writable view of the chunk's region of the output, ``chunk`` its
        :class:`~memmap_pool.Chunk` descriptor (``chunk.slices``, ``chunk.index``), and
        ``input_views`` read-only views of the same region of each input.

        Args:
            fn: the kernel; any callable, including lambdas and closures (sent with
                cloudpickle once per job).
            shape: shape of the output.
            dtype: dtype of the output (default: the kernel's, else float64).
            chunks: "auto" (default), rows along axis 0 per chunk (int), or a block shape
                (tuple; None for a whole axis).
            order: "C" (default) or "F" layout of the output.
            inputs: arrays the kernel reads: ``np.memmap``s and ``.npy`` paths are passed by
                reference; in-memory arrays are written once to the temp dir.
            args: extra positional arguments of ``fn``.
            kwargs: extra keyword arguments of ``fn``.
            out: None for a temporary output; a ``.npy`` path for a persistent one; or a
                writable ``np.memmap`` to update in place (the kernel sees its values).
            resume: with a ``.npy`` ``out``, run only the chunks its journal lacks.
            retries: re-runs of a chunk whose worker died (default: the pool's).
            timeout: seconds a chunk may run (default: the pool's; None for no limit).
            progress: True for a tqdm progress bar on a terminal, "always" to force it.
            name: a name for the job in progress bars, logs and errors.

        Returns:
            A read-only ``np.memmap`` of the output (the caller's own array when ``out`` is
            an ``np.memmap``).

        Raises:
            TypeError, ValueError: bad arguments, before any work starts.
            NotEnoughSpaceError: no room for the output.
            WorkerCrashedError, ChunkTimeoutError: see :mod:`memmap_pool.errors`.
            Exception: whatever the kernel raised, with a note naming the chunk.
        """
        self._check_open()
        request = _Request.build(
            self, fn, shape, dtype, chunks, order, inputs, args, kwargs, out, resume,
            retries, timeout, progress, name,
        )  # fmt: skip
        return self._wait_interruptibly(request.start())

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
        resume: bool = False,
        retries: int | None = None,
        timeout: float | None = _UNSET,
        progress: bool | str = False,
        name: str | None = None,
    ) -> Job:
        """Start a chunked job and return its :class:`Job`, a future of the output array.

        Takes the same arguments as :meth:`map_chunks`. Several jobs run at once and share
        the workers fairly.
        """
        self._check_open()
        request = _Request.build(
            self,
            fn,
            shape,
            dtype,
            chunks,
            order,
            inputs,
            args,
            kwargs,
            out,
            resume,
            retries,
            timeout,
            progress,
            name,
        )
        return request.start()

    def _wait_interruptibly(self, job: Job) -> np.ndarray[Any, Any]:
        in_main = threading.current_thread() is threading.main_thread()
        previous = None
        if in_main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            # SIGTERM would end the process without cleanup; turn it into an exception
            # while we wait, so the job stops and its files are removed.
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return job.result()  # type: ignore[no-any-return]
        except (KeyboardInterrupt, SystemExit):
            run = _live_run(job)
            if run is not None:
                job.cancel()
                self._dispatcher.interrupt(run)
                run.finalized.wait(INTERRUPT_CLEANUP_TIMEOUT)
            raise
        except BaseException:
            # The job failed while other chunks may still be running. Give them a moment
            # to stop, then kill their workers: once map_chunks raises, nothing writes
            # into the output any more and the job's temporary files are gone.
            # Only for the pool's own workers: a user's executor could not be rebuilt after
            # a kill, and a cluster's workers can't be killed from here.
            backend = self._backend
            run = _live_run(job)
            if (
                run is not None
                and backend.same_host
                and backend.can_recover
                and not run.finalized.wait(FAILURE_DRAIN_TIMEOUT)
            ):
                self._dispatcher.interrupt(run)
                run.finalized.wait(INTERRUPT_CLEANUP_TIMEOUT)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    # -- files ---------------------------------------------------------------------------------

    def _private_dir(self, base: str) -> str:
        with self._lock:
            if self._shutdown:
                # A submission racing shutdown() must not re-create what it just removed.
                msg = "cannot schedule new work after shutdown"
                raise RuntimeError(msg)
            path = self._dirs.get(base)
            if path is None or not os.path.isdir(path):
                remove_leftovers(base)
                path = make_private_dir(base)
                self._dirs[base] = path
            return path

    def _base_for(self, nbytes: int) -> str:
        if self._shared_dir is not None:
            return self._shared_dir
        return choose_base_dir(self._temp_dir, nbytes)


def _live_run(job: Job) -> Run | None:
    """The dispatcher's state of ``job`` while it still has work or files to clean up."""
    ref = getattr(job, "_run", None)
    return ref() if ref is not None else None


def _raise_terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _check_retries(retries: object) -> int:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        msg = f"retries must be a non-negative int (got {retries!r})"
        raise ValueError(msg)
    return retries


def _check_timeout_enforceable(timeout: float | None, backend: Backend) -> None:
    """A timed-out chunk's worker is killed: only workers this pool owns, on this host."""
    if timeout is None or (backend.same_host and backend.can_recover):
        return
    raise ValueError(_timeout_refused_message(timeout, backend))


def _timeout_refused_message(timeout: float, backend: Backend) -> str:
    if not backend.same_host:
        return (
            f"timeout={timeout:g} can't be enforced when the workers run on other hosts (a "
            "Dask cluster): the pool can't see how long a remote chunk has been running nor "
            "kill its worker; pass timeout=None (see docs/distributed.md)"
        )
    return (
        f"timeout={timeout:g} can't be enforced on an executor the pool doesn't own: a timed "
        "out chunk's worker must be killed, which would leave your executor broken for good; "
        "use the pool's own workers (no executor=) or pass timeout=None"
    )


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        msg = f"timeout must be a positive number of seconds or None (got {timeout!r})"
        raise ValueError(msg)
    return float(timeout)


def _release(
    dispatcher: Dispatcher,
    backend: Backend,
    dirs: dict[str, str],
    owns_backend: bool,
    wait: bool = True,
    cancel_futures: bool = True,
) -> None:
    """Stop everything a pool holds. Also run when a pool is garbage-collected or at exit."""
    if dispatcher.alive:
        dispatcher.stop(timeout=DISPATCHER_STOP_TIMEOUT if wait else 0)
    if owns_backend:
        backend.shutdown(wait=wait, cancel_futures=cancel_futures)
    for path in list(dirs.values()):
        shutil.rmtree(path, ignore_errors=True)
    dirs.clear()


class _Request:
    """One ``submit_chunks`` call, validated; ``start()`` creates files and the job."""

    caller_maps: list[np.memmap[Any, Any]]  # the caller's np.memmaps among inputs and out

    pool: MemmapPool
    fn: Callable[..., Any]
    plan: ChunkPlan
    dtype: np.dtype[Any]
    order: str
    out: Any
    inputs: list[tuple[ArrayRef | None, np.ndarray[Any, Any] | None]]
    input_axes: tuple[int, ...]
    kernel_bytes: bytes
    resume: bool
    retries: int
    timeout: float | None
    progress: bool | str
    name: str

    @classmethod
    def build(
        cls,
        pool: MemmapPool,
        fn: Callable[..., Any],
        shape: Any,
        dtype: Any,
        chunks: Any,
        order: Any,
        inputs: Any,
        args: Any,
        kwargs: Any,
        out: Any,
        resume: bool,
        retries: int | None,
        timeout: Any,
        progress: bool | str,
        name: str | None,
    ) -> _Request:
        if not callable(fn):
            msg = f"fn must be callable, the chunk kernel (got {fn!r})"
            raise TypeError(msg)
        self = cls()
        self.pool = pool
        # Precedence: the call's arguments, then an out= array's own dtype and layout (it
        # exists already and can't change), then the kernel's defaults.
        caller_out = out if isinstance(out, np.ndarray) else None
        if caller_out is not None:
            if dtype is None:
                dtype = caller_out.dtype
            if order is None:
                flags = caller_out.flags
                order = "F" if flags.f_contiguous and not flags.c_contiguous else "C"
        if isinstance(fn, Kernel):
            dtype = fn.dtype if dtype is None else dtype
            chunks = fn.chunks if chunks is None else chunks
            order = fn.order if order is None else order
            fn = fn.fn
        self.fn = fn
        self.name = name or str(getattr(fn, "__name__", "job"))
        shape_t = normalize_shape(shape)
        self.dtype = normalize_dtype("float64" if dtype is None else dtype)
        self.order = normalize_order("C" if order is None else order)
        self.plan = plan_chunks(
            shape_t, self.dtype, self.order, "auto" if chunks is None else chunks, pool.max_workers
        )
        self.out = _check_out(out, shape_t, self.dtype, self.order)
        if resume and chunks in (None, "auto") and isinstance(self.out, str):
            self.plan = _resumed_plan(self.plan, self.out, self.dtype)
        if not isinstance(args, (tuple, list)):
            msg = f"args must be a tuple or list of extra arguments (got {type(args).__name__})"
            raise TypeError(msg)
        if kwargs is not None and not isinstance(kwargs, dict):
            msg = f"kwargs must be a dict (got {type(kwargs).__name__})"
            raise TypeError(msg)
        self.input_axes = _input_axes(self.plan, chunks)
        self.inputs = [
            _check_input(x, k, self.plan, self.input_axes)
            for k, x in enumerate(_as_input_list(inputs))
        ]
        if isinstance(self.out, str):
            _check_input_is_not_output(self.inputs, self.out)
        # The caller's own mappings of files the workers will open (flushed for remote ones).
        arrays = [x for x in (*_as_input_list(inputs), out) if isinstance(x, np.ndarray)]
        holders = (memmap_holder(a) for a in arrays)
        self.caller_maps = [h for h in holders if h is not None]
        if resume and not (isinstance(self.out, str)):
            msg = "resume=True needs out= to be a .npy path (the journal lives beside it)"
            raise ValueError(msg)
        self.resume = bool(resume)
        self.retries = pool._retries if retries is None else _check_retries(retries)
        self.timeout = pool._timeout if timeout is _UNSET else _check_timeout(timeout)
        _check_timeout_enforceable(self.timeout, pool._backend)
        if not (progress is None or isinstance(progress, bool) or progress == "always"):
            msg = f"progress must be True, False or 'always' (got {progress!r})"
            raise ValueError(msg)
        self.progress = progress or False
        if self.progress:
            try:
                import tqdm  # noqa: F401
            except ImportError:
                msg = "progress bars need tqdm: pip install 'memmap-pool[progress]'"
                raise ImportError(msg) from None
        try:
            self.kernel_bytes = cloudpickle.dumps((fn, tuple(args), dict(kwargs or {})))
        except Exception as exc:
            msg = (
                f"cannot send the kernel {self.name!r} or its args/kwargs to the workers: "
                f"{type(exc).__name__}: {exc}"
            )
            raise SerializationError(msg) from exc
        return self

    # -- files and job ---------------------------------------------------------------------------

    def start(self) -> Job:
        pool, plan = self.pool, self.plan
        nbytes = math.prod(plan.shape) * self.dtype.itemsize
        job = Job(plan.count, pool.max_workers, self.name)
        if nbytes == 0:
            job.set_running_or_notify_cancel()
            job._finish(self._empty_result())
            return job
        created: list[str] = []  # files to remove if anything below fails
        try:
            return self._start(job, nbytes, created)
        except BaseException:
            for path in created:
                _unlink_quietly(path)
            raise

    def _start(self, job: Job, nbytes: int, created: list[str]) -> Job:
        pool, plan = self.pool, self.plan
        token = secrets.token_hex(8)
        dumped = [arr for ref, arr in self.inputs if ref is None and arr is not None]
        dumped_bytes = sum(int(a.nbytes) for a in dumped)
        journal: Journal | None = None
        resumed = np.zeros(plan.count, dtype=bool)

        # 1. Room, before anything is written.
        temp_bytes = dumped_bytes + (nbytes if self.out is None else 0)
        base = pool._base_for(temp_bytes)
        if temp_bytes:
            check_room(base, temp_bytes, _what_needs_room(self.out is None, bool(dumped)))
        if isinstance(self.out, str):
            out_ref, journal, resumed = self._npy_output(nbytes, created)
        elif self.out is None:
            pdir = pool._private_dir(base)
            path = os.path.join(pdir, f"out-{token}.bin")
            create_raw(path, nbytes)
            created.append(path)
            out_ref = ArrayRef(
                path,
                0,
                self.dtype,
                plan.shape,
                contiguous_strides(plan.shape, self.dtype.itemsize, self.order),
            )
        else:
            ref = memmap_ref(self.out)
            assert ref is not None  # checked in build()
            missing = nbytes - allocated_bytes(ref.path)
            if missing > 0:
                check_room(os.path.dirname(ref.path) or ".", missing, "output (sparse file)")
            out_ref = ref
        if not pool._backend.same_host and shares_pages(plan, out_ref.offset):
            log.warning(
                "job %s: chunks share memory pages of %s (chunks=%s, data at byte %d): "
                "workers on different hosts would overwrite each other's bytes; use "
                "chunks='auto' or blocks whose bytes are multiples of %d (see "
                "docs/distributed.md)",
                self.name,
                out_ref.path,
                plan.block,
                out_ref.offset,
                PAGE_SIZE,
            )

        # 2. Inputs: by reference, or dumped once.
        pdir = pool._private_dir(base)
        job_files: list[str] = []  # removed when the job ends, whatever its outcome
        input_refs: list[ArrayRef] = []
        for k, (ref, arr) in enumerate(self.inputs):
            if ref is None:
                assert arr is not None
                ref = _dump(arr, os.path.join(pdir, f"in{k}-{token}.bin"))
                created.append(ref.path)
                job_files.append(ref.path)
            input_refs.append(ref)

        if not pool._backend.same_host:
            # Workers on other hosts read the files, not this host's page cache: write the
            # caller's changes to them out first (close-to-open consistency on NFS).
            for holder in self.caller_maps:
                holder.flush()

        # 3. Status file (workers on this host) and spec file.
        backend = pool._backend
        # The status and spec files are small, but must fit: a full /dev/shm sends them to
        # the system temp dir like any other file.
        status_bytes = status_layout(plan.count)[3]
        small_dir = (
            pdir
            if not backend.same_host
            else pool._private_dir(pool._base_for(status_bytes + len(self.kernel_bytes) + 8192))
        )
        status_path = None
        status = None
        if backend.same_host:
            status_path = os.path.join(small_dir, f"status-{token}.bin")
            _create_status(status_path, status_bytes)
            created.append(status_path)
            job_files.append(status_path)
            status = _map_status(status_path, plan.count)
        spec = JobSpec(
            token=token,
            plan=plan,
            output=out_ref,
            order=self.order,
            inputs=tuple(input_refs),
            input_axes=tuple(self.input_axes for _ in input_refs),
            kernel=self.kernel_bytes,
            status_path=status_path,
            flush=(self.out is not None and isinstance(self.out, str)) or not backend.same_host,
        )
        spec_path = os.path.join(small_dir, f"spec-{token}.pkl")
        with open(os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            pickle.dump(spec, f, protocol=pickle.HIGHEST_PROTOCOL)
        created.append(spec_path)
        job_files.append(spec_path)

        # 4. The job.
        output = self.out

        def finish() -> Any:
            return self._result(out_ref, output, pool)

        def cleanup(succeeded: bool) -> None:
            for path in job_files:
                _unlink_quietly(path)
            if output is None and not succeeded:
                _unlink_quietly(out_ref.path)

        run = Run(
            job=job,
            spec=spec,
            spec_path=spec_path,
            retries=self.retries,
            timeout=self.timeout,
            journal=journal,
            status=status,
            finish=finish,
            cleanup=cleanup,
            done=resumed.copy(),
        )
        run.n_done = int(resumed.sum())
        if run.n_done:
            done_chunks = np.flatnonzero(resumed).tolist()
            nb = sum(region_nbytes(plan.slices(i), plan.itemsize) for i in done_chunks)
            job._record_resumed(run.n_done, nb)
        # The run refers to the job; the job refers to the run only weakly, so a dropped
        # result frees its file at once rather than whenever the garbage collector runs. The
        # dispatcher holds the run until the job's files are removed (finalized): a dead
        # reference means there is nothing left to wait for.
        run_ref = weakref.ref(run)
        job._run = run_ref  # type: ignore[attr-defined]
        dispatcher = pool._dispatcher

        def cancel_run() -> None:
            live = run_ref()
            if live is not None:
                dispatcher.cancel(live)

        job._on_cancel = cancel_run
        if self.progress:
            _attach_progress_bar(job, self.progress, self.name)
        log.info(
            "job %s: %s %s in %d chunks%s",
            self.name,
            plan.shape,
            self.dtype,
            plan.count,
            f" ({run.n_done} already done)" if run.n_done else "",
        )
        dispatcher.add(run)
        return job

    def _npy_output(
        self, nbytes: int, created: list[str]
    ) -> tuple[ArrayRef, Journal | None, np.ndarray[Any, Any]]:
        path = os.path.abspath(self.out)
        plan = self.plan
        fingerprint = _fingerprint(plan, self.dtype)
        jpath = journal_path(path)
        resumed = np.zeros(plan.count, dtype=bool)
        if self.resume and os.path.exists(path):
            info = read_npy_header(path)
            if (info.shape, info.dtype, info.order if len(info.shape) > 1 else self.order) != (
                plan.shape,
                self.dtype,
                self.order,
            ):
                msg = (
                    f"cannot resume into {path}: it holds a {info.shape} {info.dtype} "
                    f"{info.order}-order array, the job makes {plan.shape} {self.dtype} "
                    f"{self.order}-order; pass resume=False to replace it"
                )
                raise JournalMismatchError(msg)
            _check_resumable(path, info, nbytes)
            if os.path.exists(jpath):
                journal = Journal.load(jpath)
                journal.check_matches(fingerprint)
                inode = os.stat(path).st_ino
                if journal.output_inode is not None and journal.output_inode != inode:
                    msg = (
                        f"cannot resume: {path} was replaced since its journal was written "
                        "(another file now has its name), so the chunks the journal lists "
                        "are not in it; pass resume=False to compute it afresh"
                    )
                    raise JournalMismatchError(msg)
                resumed = journal.done.astype(bool)
            else:
                # A memmap-pool output without a journal: a job that completed.
                log.info("%s is complete (no journal beside it): nothing to run", path)
                journal = None
                resumed[:] = True
            strides = contiguous_strides(plan.shape, self.dtype.itemsize, self.order)
            return ArrayRef(path, info.offset, self.dtype, plan.shape, strides), journal, resumed
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            msg = f"the directory of out={self.out!r} does not exist"
            raise FileNotFoundError(msg)
        check_room(directory, nbytes + 2 * 4096 + plan.count, "output")
        journals: list[Journal] = []

        def write_journal(inode: int) -> None:
            # Before the output takes its name: a journal never lacks for an output of ours.
            journals.append(Journal.create(jpath, fingerprint, output_inode=inode))
            created.append(jpath)

        offset = create_npy(path, self.dtype, plan.shape, self.order, write_journal)
        created.append(path)
        journal = journals[0]
        strides = contiguous_strides(plan.shape, self.dtype.itemsize, self.order)
        return ArrayRef(path, offset, self.dtype, plan.shape, strides), journal, resumed

    def _result(self, ref: ArrayRef, output: Any, pool: MemmapPool) -> Any:
        if isinstance(output, np.ndarray):
            return output
        if isinstance(output, str):
            fd = os.open(ref.path, os.O_RDONLY)
            try:
                os.fsync(fd)  # the header; chunks were flushed by the workers
            finally:
                os.close(fd)
            return np.load(ref.path, mmap_mode="r")
        result = np.memmap(
            ref.path, dtype=self.dtype, mode="r", shape=self.plan.shape, order=self.order
        )  # type: ignore[call-overload]
        # The file goes when the result does (or when the pool closes, if sooner: a mapped
        # file stays readable after it is unlinked).
        weakref.finalize(result, _unlink_quietly, ref.path)
        return result

    def _empty_result(self) -> Any:
        shape = self.plan.shape
        if isinstance(self.out, np.ndarray):
            return self.out
        empty = np.empty(shape, dtype=self.dtype, order=self.order)  # type: ignore[call-overload]
        if isinstance(self.out, str):
            # An empty array can't be mapped: the file is written, the array returned as is.
            np.save(self.out, empty)
            _unlink_quietly(journal_path(os.path.abspath(self.out)))
        empty.setflags(write=False)
        return empty


def _fingerprint(plan: ChunkPlan, dtype: np.dtype[Any]) -> dict[str, Any]:
    fp = plan.fingerprint()
    fp["dtype"] = np.lib.format.dtype_to_descr(dtype)
    fp["dtype"] = repr(fp["dtype"])
    return fp


def _resumed_plan(plan: ChunkPlan, out: str, dtype: np.dtype[Any]) -> ChunkPlan:
    """The plan of a job resumed with chunks="auto": its journal's, when the journal is for
    the same array. "auto" depends on the number of workers, which may not be the same as
    in the run that was interrupted (another machine, another --workers)."""
    path = os.path.abspath(out)
    if not (os.path.exists(path) and os.path.exists(journal_path(path))):
        return plan
    try:
        recorded = Journal.load(journal_path(path)).fingerprint
        mine = _fingerprint(plan, dtype)
        if any(recorded.get(k) != v for k, v in mine.items() if k not in ("block", "count")):
            return plan  # another array: the resume refuses it with the differences
        return plan_chunks(plan.shape, dtype, plan.order, tuple(recorded["block"]), 1)
    except (OSError, ValueError, TypeError, KeyError):
        return plan  # a damaged journal: the resume reports it


def _create_status(path: str, nbytes: int) -> None:
    """Create the status file with all its blocks written: the parent and the workers write
    it through mappings, and a write into a hole of a full tmpfs is a SIGBUS."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, bytes(nbytes))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        directory = os.path.dirname(path)
        msg = (
            f"not enough space in {directory} for the job's {nbytes}-byte status file; free "
            f"some space or pass temp_dir="
        )
        raise NotEnoughSpaceError(msg, directory) from exc
    finally:
        os.close(fd)


def _map_status(path: str, count: int) -> tuple[np.ndarray[Any, Any], ...]:
    mm = np.memmap(path, dtype=np.uint8, mode="r+")
    return status_views(mm, count)


def _what_needs_room(temp_output: bool, dumped_inputs: bool) -> str:
    if temp_output and dumped_inputs:
        return "output and inputs"
    return "output" if temp_output else "inputs"


def _dump(array: np.ndarray[Any, Any], path: str) -> ArrayRef:
    """Write an in-memory input once, so workers map it instead of receiving copies.

    Plain writes, not a memmap of a sparse file: if the disk fills up in the meantime, a
    write fails with ENOSPC where a store into a mapping would kill the parent with SIGBUS.
    """
    order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        # tofile writes in C order; the transpose of an F-ordered array is C-ordered and
        # has the same bytes, so neither layout is copied in memory first.
        (array.T if order == "F" else array).tofile(f)
        if array.nbytes == 0:
            f.truncate(1)  # an empty file cannot be mapped
    return ArrayRef(
        path,
        0,
        array.dtype,
        tuple(array.shape),
        contiguous_strides(tuple(array.shape), array.dtype.itemsize, order),
    )


def _attach_progress_bar(job: Job, progress: bool | str, name: str) -> None:
    from tqdm.auto import tqdm

    total = job.progress.total
    bar = tqdm(
        total=total,
        desc=name,
        unit="chunk",
        disable=None if progress is True else False,
        initial=job.progress.done,
        leave=True,
    )
    lock = threading.Lock()

    def advance(p: Progress) -> None:
        with lock:
            if p.done > bar.n:
                bar.update(p.done - bar.n)
            if p.done >= p.total:
                # Close before the job's result is set, so the finished bar is drawn before
                # whatever the caller prints next (done callbacks run after the waiters wake).
                bar.close()

    def close(_: Future[Any]) -> None:
        with lock:
            bar.close()

    job.add_progress_callback(advance)
    job.add_done_callback(close)


def _as_input_list(inputs: Any) -> list[Any]:
    if inputs is None:
        return []
    if isinstance(inputs, (np.ndarray, str, os.PathLike)):
        return [inputs]  # one input given bare: iterating it would go over its rows
    if not isinstance(inputs, (tuple, list)):
        msg = (
            f"inputs must be a tuple or list of arrays or .npy paths (got {type(inputs).__name__})"
        )
        raise TypeError(msg)
    return list(inputs)


def _input_axes(plan: ChunkPlan, chunks: Any) -> tuple[int, ...]:
    """Output axes along which inputs are sliced: those the plan splits, and always the
    leading axis that "auto" and an int split, so that whether an input fits does not
    depend on the size of the array."""
    axes = set(plan.chunked_axes)
    if plan.shape and not isinstance(chunks, (tuple, list)):
        axes.add(0 if (plan.order == "C" or isinstance(chunks, int)) else len(plan.shape) - 1)
    return tuple(sorted(axes))


def _check_input(
    value: Any, k: int, plan: ChunkPlan, axes: tuple[int, ...]
) -> tuple[ArrayRef | None, np.ndarray[Any, Any] | None]:
    ref: ArrayRef | None = None
    arr: np.ndarray[Any, Any] | None = None
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not path.endswith(".npy"):
            msg = f"inputs[{k}]: a path must name a .npy file (got {path!r})"
            raise ValueError(msg)
        if not os.path.exists(path):
            msg = f"inputs[{k}]: no such file: {path!r}"
            raise FileNotFoundError(msg)
        info = read_npy_header(path)
        if info.dtype.hasobject:
            msg = f"inputs[{k}]: {path} holds Python objects, which can't be shared"
            raise TypeError(msg)
        ref = ArrayRef(
            os.path.abspath(path),
            info.offset,
            info.dtype,
            info.shape,
            contiguous_strides(info.shape, info.dtype.itemsize, info.order),
        )
        shape = info.shape
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            msg = f"inputs[{k}]: arrays of Python objects (dtype {value.dtype}) can't be shared"
            raise TypeError(msg)
        ref = memmap_ref(value)
        if ref is not None and not os.path.exists(ref.path):
            ref = None
        if ref is None:
            arr = value
        shape = tuple(value.shape)
    else:
        msg = (
            f"inputs[{k}] must be a numpy array, an np.memmap or the path of a .npy file "
            f"(got {type(value).__name__})"
        )
        raise TypeError(msg)
    for axis in axes:
        if len(shape) <= axis or shape[axis] != plan.shape[axis]:
            msg = (
                f"inputs[{k}] has shape {shape}, which does not match the output shape "
                f"{plan.shape} on axis {axis}: inputs must match the output on the axes the "
                f"chunks split ({', '.join(map(str, axes))})"
            )
            raise ValueError(msg)
    return ref, arr


def _check_resumable(path: str, info: NpyInfo, nbytes: int) -> None:
    """Refuse to resume into a file memmap-pool did not write, or one cut short."""
    if info.offset != NPY_HEADER_BYTES:
        msg = (
            f"cannot resume into {path}: it was not written by memmap-pool (its header is "
            f"{info.offset} bytes, ours are {NPY_HEADER_BYTES}), so nothing says which of its "
            "chunks are done; pass resume=False to compute it afresh"
        )
        raise JournalMismatchError(msg)
    size = os.stat(path).st_size
    if size < info.offset + nbytes:
        msg = (
            f"cannot resume into {path}: it is truncated ({size} bytes, the array needs "
            f"{info.offset + nbytes}); pass resume=False to compute it afresh"
        )
        raise JournalMismatchError(msg)


def _check_input_is_not_output(
    inputs: list[tuple[ArrayRef | None, np.ndarray[Any, Any] | None]], out: str
) -> None:
    """A .npy ``out`` is created anew: an input in the same file would be read from the new,
    empty file at the old file's offsets."""
    try:
        target = os.stat(out)
    except FileNotFoundError:
        return
    for k, (ref, _) in enumerate(inputs):
        if ref is None:
            continue
        try:
            st = os.stat(ref.path)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            msg = (
                f"inputs[{k}] is the file out={out!r} itself, which the job creates anew; to "
                "update a file in place pass out=np.load(path, mmap_mode='r+') and read the "
                "current values from the kernel's out"
            )
            raise ValueError(msg)


def _check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype[Any], order: str) -> Any:
    if out is None:
        return None
    if isinstance(out, (str, os.PathLike)):
        path = os.fspath(out)
        if not path.endswith(".npy"):
            msg = f"out must be a path ending in .npy (got {path!r})"
            raise ValueError(msg)
        return path
    # An np.memmap, or a plain view of one (np.asarray(memmap)): both live in a file.
    if isinstance(out, np.memmap) or (isinstance(out, np.ndarray) and memmap_ref(out) is not None):
        if tuple(out.shape) != shape:
            msg = f"out has shape {tuple(out.shape)}, but the job makes shape {shape}"
            raise ValueError(msg)
        if out.dtype != dtype:
            msg = f"out has dtype {out.dtype}, but the job makes dtype {dtype}"
            raise ValueError(msg)
        if not out.flags.writeable:
            msg = (
                "out is a read-only memmap; open it with mode 'r+' (np.load(path, "
                "mmap_mode='r+')) to update it in place"
            )
            raise ValueError(msg)
        if getattr(out, "mode", None) == "c":
            msg = (
                "out is a copy-on-write memmap (mode 'c'): its changes stay private to this "
                "process, so workers could neither see nor update them; open it with mode "
                "'r+' to update the file in place"
            )
            raise ValueError(msg)
        ref = memmap_ref(out)
        if ref is None or not os.path.exists(ref.path):
            msg = "out is an np.memmap whose file can't be found; pass its path instead"
            raise ValueError(msg)
        expected = contiguous_strides(shape, dtype.itemsize, order)
        if out.size > 1 and ref.strides != expected:
            msg = (
                f"out must be a whole, {order}-contiguous memmap (its strides are "
                f"{ref.strides}, a {order}-ordered array has {expected}); pass order= to "
                "match its layout, or the base memmap rather than a view"
            )
            raise ValueError(msg)
        return out
    if isinstance(out, np.ndarray):
        msg = (
            "out must be an np.memmap, a .npy path or None: an in-memory array can't be "
            "shared with worker processes without copying (np.lib.format.open_memmap "
            "creates a .npy-backed one)"
        )
        raise TypeError(msg)
    msg = f"out must be None, a .npy path or a writable np.memmap (got {type(out).__name__})"
    raise TypeError(msg)
