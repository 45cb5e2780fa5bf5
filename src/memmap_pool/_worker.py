"""What runs inside a worker process.

A worker receives batches: ``(spec_path, token, indices)``, a few dozen bytes. The first batch
of a job loads the job's spec file once (plan, file references, the cloudpickled kernel),
maps the output and input files once, and caches all of it under the job's token; every
chunk after that is a slice of those mappings and one kernel call::

    batch ──▶ context for token (cached: spec, kernel, mappings)
              for each index:  status[index] = running, pid, start time
                               reserve the chunk's blocks (fallocate)
                               out = output[slices]; views = [input[slices] ...]
                               result = fn(out, chunk, *views, *args, **kwargs)
                               flush (persistent / remote outputs), release pages
                               status[index] = done
    ◀── BatchResult: indices done, per-chunk seconds, small pickled results, or one error

The status file lets the parent follow progress inside a batch, find the chunks a dead worker
was running (and the pid to kill for a timeout) without any message from the worker.
"""

from __future__ import annotations

import functools
import mmap
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import numpy as np

from ._chunks import Chunk, ChunkPlan, describe_region, element_strides, region_nbytes
from ._storage import ArrayRef, pid_alive, proc_state, reserve

# Chunk states in the status file.
PENDING, RUNNING, DONE, DONE_WITH_RESULT = 0, 1, 2, 3
STATUS_HEADER_BYTES = 64  # byte 0: the job's cancel flag; the per-chunk arrays follow

CONTEXT_CACHE_SIZE = 4
"""Jobs whose mappings a worker keeps at once. Several jobs share the workers; a context is
also dropped once its spec file is gone (the job ended: checked before each new job, and by
the watchdog every WATCHDOG_INTERVAL), which releases its mappings, so an unlinked output in
/dev/shm frees its memory."""

RELEASE_MIN_BYTES = 1 << 20
"""After a chunk at least this large, its pages are dropped from the worker's page tables
(madvise DONTNEED; the data stays in the shared page cache). Without it a worker's resident
memory grows with every chunk it maps, up to the whole output."""

WATCHDOG_INTERVAL = 0.25
"""How often a worker checks that the process that owns the pool is still alive. A parent
killed with SIGKILL cannot stop its workers, so they stop themselves within this delay."""

ORPHAN_EXIT_CODE = 70


def status_layout(count: int) -> tuple[int, int, int, int]:
    """Offsets of the state (u1), pid (i4) and start time (f8) arrays, and the file size."""
    state_at = STATUS_HEADER_BYTES
    pid_at = state_at + -(-count // 8) * 8
    start_at = pid_at + -(-count * 4 // 8) * 8
    return state_at, pid_at, start_at, start_at + count * 8


def status_views(
    buffer: Any, count: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    state_at, pid_at, start_at, _ = status_layout(count)
    header = np.frombuffer(buffer, dtype=np.uint8, count=STATUS_HEADER_BYTES)
    state = np.frombuffer(buffer, dtype=np.uint8, count=count, offset=state_at)
    pid = np.frombuffer(buffer, dtype=np.int32, count=count, offset=pid_at)
    start = np.frombuffer(buffer, dtype=np.float64, count=count, offset=start_at)
    return header, state, pid, start


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs for a job; written once to a file, read once per worker."""

    token: str
    plan: ChunkPlan
    output: ArrayRef
    order: str
    inputs: tuple[ArrayRef, ...]
    input_axes: tuple[tuple[int, ...], ...]  # per input: the output axes to slice it along
    kernel: bytes  # cloudpickle of (fn, args, kwargs)
    status_path: str | None
    flush: bool  # msync each chunk before reporting it done (persistent or remote outputs)


@dataclass
class ChunkFailure:
    """Why a batch stopped: a kernel exception or a failure of the worker's own work."""

    index: int
    region: str
    kind: str  # "kernel", "serialization", "storage"
    exception: bytes | None  # the pickled exception when it survives a round trip
    type_name: str
    message: str
    traceback: str


@dataclass
class BatchResult:
    """What a worker sends back: small, whatever the size of the chunks."""

    pid: int
    done: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    nbytes: int = 0
    results: dict[int, bytes] = field(default_factory=dict)
    failure: ChunkFailure | None = None


def _map_file(path: str, writable: bool) -> mmap.mmap:
    """Map a whole file; the descriptor is closed at once (the mapping keeps the file)."""
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    finally:
        os.close(fd)


def _make_chunk(
    path: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    order: str,
    offset: int,
    count: int,
    index: int,
    slices: tuple[slice, ...],
) -> Chunk:
    return Chunk(index, slices, path, dtype, shape, order, offset, count)


class _FilesError(Exception):
    """A job's files could not be opened or mapped in the worker (``args[0]``: the cause)."""


class _JobContext:
    users = 0  # batches running with this context (several threads may share a worker)
    retired = False  # dropped from the cache while in use: closed when the last user leaves

    def __init__(self, spec_path: str, spec: JobSpec) -> None:
        self.spec_path = spec_path
        self.spec = spec
        self._maps: list[mmap.mmap] = []
        self._fds: list[int] = []
        fn, args, kwargs = pickle.loads(spec.kernel)
        self.fn, self.args, self.kwargs = fn, tuple(args), dict(kwargs)
        try:
            self._open_files()
        except Exception as exc:
            self.close()
            raise _FilesError(exc) from exc

    def _open_files(self) -> None:
        spec = self.spec
        out = spec.output
        self.out_fd = os.open(out.path, os.O_RDWR)
        self._fds.append(self.out_fd)
        self.out_map = mmap.mmap(self.out_fd, 0, access=mmap.ACCESS_WRITE)
        self._maps.append(self.out_map)
        self.out = np.ndarray(
            out.shape, out.dtype, buffer=self.out_map, offset=out.offset, strides=out.strides
        )
        self.inputs: list[tuple[np.ndarray[Any, Any], mmap.mmap, tuple[int, ...], int]] = []
        for ref, axes in zip(spec.inputs, spec.input_axes):
            mapping = _map_file(ref.path, writable=False)
            self._maps.append(mapping)
            arr = np.ndarray(
                ref.shape, ref.dtype, buffer=mapping, offset=ref.offset, strides=ref.strides
            )
            self.inputs.append((arr, mapping, axes, min(arr.ndim, len(spec.plan.shape))))
        self.status: tuple[np.ndarray[Any, Any], ...] | None = None
        if spec.status_path is not None:
            smap = _map_file(spec.status_path, writable=True)
            self._maps.append(smap)
            self.status = status_views(smap, spec.plan.count)
        self.reserve_ok = True  # until the filesystem says it can't reserve blocks
        plan = spec.plan
        self.elem_strides = element_strides(plan.shape, spec.order)
        self.make_chunk = functools.partial(
            _make_chunk, out.path, out.dtype, plan.shape, spec.order, out.offset, plan.count
        )

    def close(self) -> None:
        # Views into the mappings must go first, or mmap.close() raises BufferError.
        self.out = None  # type: ignore[assignment]
        self.inputs = []
        self.status = None
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # a kernel kept a view alive; the mapping goes when it does
        for fd in self._fds:
            os.close(fd)
        self._maps, self._fds = [], []


_contexts: OrderedDict[str, _JobContext] = OrderedDict()


_contexts_lock = threading.Lock()
"""A worker of a thread-based executor (a Dask worker with several threads, a
ThreadPoolExecutor) runs batches in several threads at once: one of them builds a job's
context, the others wait for it instead of mapping the same files again."""


def _context(spec_path: str, token: str) -> _JobContext:
    with _contexts_lock:
        ctx = _contexts.get(token)
        if ctx is not None:
            _contexts.move_to_end(token)
            ctx.users += 1
            return ctx
        # A new job: drop the contexts of jobs that ended (their spec file is removed at the
        # end of a job) and the least recently used beyond the cache size.
        for old_token, old in list(_contexts.items()):
            if not os.path.exists(old.spec_path):
                _retire(_contexts.pop(old_token))
        while len(_contexts) >= CONTEXT_CACHE_SIZE:
            _retire(_contexts.popitem(last=False)[1])
        with open(spec_path, "rb") as f:
            spec = pickle.load(f)
        ctx = _JobContext(spec_path, spec)
        ctx.users = 1
        _contexts[token] = ctx
        return ctx


def _drop_ended_jobs() -> None:
    """Unmap the files of jobs that ended (their spec file is gone) while this worker idles:
    an unlinked output in /dev/shm holds its memory until the last mapping goes."""
    with _contexts_lock:
        for token, ctx in list(_contexts.items()):
            if not os.path.exists(ctx.spec_path):
                _retire(_contexts.pop(token))


def _retire(ctx: _JobContext) -> None:
    """Close a context dropped from the cache, or let its last user do it. Closing unmaps
    the files: a batch still running in another thread would crash (numpy arrays over an
    mmap do not keep it open). Call with ``_contexts_lock`` held."""
    if ctx.users:
        ctx.retired = True
    else:
        ctx.close()


def _unpin(ctx: _JobContext) -> None:
    with _contexts_lock:
        ctx.users -= 1
        if ctx.retired and not ctx.users:
            ctx.close()


def _failure(
    index: int, plan: ChunkPlan, kind: str, exc: BaseException, where: str = ""
) -> ChunkFailure:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    payload: bytes | None
    try:
        payload = cloudpickle.dumps(exc)
        pickle.loads(payload)  # some exceptions pickle but can't be rebuilt; find out here
    except Exception:
        payload = None
    message = str(exc)
    if where:
        message = f"{where}: {message}"
    return ChunkFailure(
        index=index,
        region=describe_region(plan.slices(index)) if index >= 0 else "",
        kind=kind,
        exception=payload,
        type_name=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=message,
        traceback=tb,
    )


def _page_range(offset: int, stop: int, limit: int) -> tuple[int, int]:
    start = offset - offset % mmap.PAGESIZE
    return start, min(stop, limit) - start


def run_batch(spec_path: str, token: str, indices: range | tuple[int, ...]) -> BatchResult:
    """Run the chunks ``indices`` of the job described by ``spec_path``."""
    pid = os.getpid()
    result = BatchResult(pid=pid)
    try:
        ctx = _context(spec_path, token)
    except _FilesError as exc:
        first = indices[0] if len(indices) else -1
        result.failure = _failure(
            -1, ChunkPlan((), 1, "C", ()), "files", exc.args[0],
            f"the worker could not open the job's files for chunk {first}",
        )  # fmt: skip
        return result
    except Exception as exc:
        first = indices[0] if len(indices) else -1
        result.failure = _failure(
            -1, ChunkPlan((), 1, "C", ()), "serialization", exc,
            f"the worker could not load the job's kernel or arguments for chunk {first}",
        )  # fmt: skip
        return result
    try:
        return _run_chunks(ctx, indices, result)
    finally:
        _unpin(ctx)
        if _pending_limit is not None:
            _limit_started_pools()


def _run_chunks(
    ctx: _JobContext, indices: range | tuple[int, ...], result: BatchResult
) -> BatchResult:
    pid = result.pid
    spec = ctx.spec
    plan = spec.plan
    out_ref = spec.output
    if ctx.reserve_ok and len(indices):
        failure = _reserve_batch(ctx, indices)
        if failure is not None:
            result.failure = failure
            return result
    itemsize = out_ref.dtype.itemsize
    fn, args, kwargs = ctx.fn, ctx.args, ctx.kwargs
    status = ctx.status
    out_full, out_map, out_len = ctx.out, ctx.out_map, len(ctx.out_map)
    strides, base = ctx.elem_strides, out_ref.offset
    make_chunk = ctx.make_chunk
    inputs = ctx.inputs
    flush = spec.flush
    monotonic, perf_counter = time.monotonic, time.perf_counter
    done, seconds = result.done, result.seconds
    unreleased = 0  # bytes written by small chunks whose pages this worker still maps
    for index in indices:
        if status is not None:
            header, state, pids, starts = status
            if header[0]:
                break  # the job was cancelled or failed: drop the chunks not started
            pids[index] = pid
            starts[index] = monotonic()
            state[index] = RUNNING
        slices = plan.slices(index)
        views = [
            arr[tuple(slices[a] if a in axes else _ALL for a in range(k))]
            for arr, _, axes, k in inputs
        ]
        # A 0-d output indexed with () would give a scalar copy, not a writable view.
        out_view = out_full[slices] if slices else out_full[...]
        chunk = make_chunk(index, slices)
        t0 = perf_counter()
        try:
            value = fn(out_view, chunk, *views, *args, **kwargs)
        except BaseException as exc:
            if status is not None:
                # Fail fast: this worker's next queued batch, and the other workers, must
                # not start another chunk of the job while the parent hears of the error.
                status[0][0] = 1
            result.failure = _failure(index, plan, "kernel", exc)
            break
        elapsed = perf_counter() - t0
        nbytes = region_nbytes(slices, itemsize)
        if flush or nbytes >= RELEASE_MIN_BYTES:
            lo = base + itemsize * sum(s.start * st for s, st in zip(slices, strides))
            hi = base + itemsize * (sum((s.stop - 1) * st for s, st in zip(slices, strides)) + 1)
            start, length = _page_range(lo, hi, out_len)
            if flush and length > 0:
                out_map.flush(start, length)
            if length >= RELEASE_MIN_BYTES:
                out_map.madvise(mmap.MADV_DONTNEED, start, length)
                for view, (_arr, mapping, _axes, _k) in zip(views, inputs):
                    _release(view, mapping)
        del views, out_view
        if value is not None:
            try:
                result.results[index] = cloudpickle.dumps(value)
            except Exception as exc:
                result.failure = _failure(
                    index,
                    plan,
                    "serialization",
                    exc,
                    f"the value returned by the kernel ({type(value).__name__}) cannot be pickled",
                )
                break
        done.append(index)
        seconds.append(elapsed)
        result.nbytes += nbytes
        if nbytes < RELEASE_MIN_BYTES:
            unreleased += nbytes
        if status is not None:
            status[1][index] = DONE if value is None else DONE_WITH_RESULT
    if unreleased >= RELEASE_MIN_BYTES and done:
        # Small chunks are released together, once a batch of them adds up: one system call
        # for the batch's byte span instead of one per chunk.
        ran = range(done[0], done[-1] + 1) if isinstance(indices, range) else done
        lo, hi = _batch_span(plan, out_ref.offset, ran)
        start, length = _page_range(lo, hi, out_len)
        if length > 0:
            out_map.madvise(mmap.MADV_DONTNEED, start, length)
    return result


_ALL = slice(None)


def _batch_span(
    plan: ChunkPlan, offset: int, indices: range | tuple[int, ...] | list[int]
) -> tuple[int, int]:
    """File bytes ``[lo, hi)`` covering every chunk of a batch."""
    # In a C-ordered file, byte offsets grow with chunk numbers (both are lexicographic in
    # the block coordinates), so the first and last chunks of a range bound all of it; an
    # F-ordered file keeps that only when just its last axis is split.
    monotonic = plan.order == "C" or plan.block[:-1] == plan.shape[:-1]
    picks = (indices[0], indices[-1]) if isinstance(indices, range) and monotonic else indices
    spans = [plan.byte_span(i) for i in picks]
    return offset + min(a for a, _ in spans), offset + max(b for _, b in spans)


def _reserve_batch(ctx: _JobContext, indices: range | tuple[int, ...]) -> ChunkFailure | None:
    """Reserve the blocks the batch will write, in one call: the byte range from its lowest to
    its highest chunk byte. Reserving blocks twice is harmless, and one system call per batch
    instead of per chunk keeps tiny chunks cheap."""
    spec = ctx.spec
    plan, out_ref = spec.plan, spec.output
    lo, hi = _batch_span(plan, out_ref.offset, indices)
    contiguous = len(indices) == 1 and hi - lo == region_nbytes(
        plan.slices(indices[0]), out_ref.dtype.itemsize
    )
    try:
        ctx.reserve_ok = reserve(ctx.out_fd, lo, hi - lo, contiguous)
    except OSError as exc:
        return _failure(
            indices[0],
            plan,
            "storage",
            exc,
            f"reserving {hi - lo} bytes of {out_ref.path} for the chunks failed "
            "(no space left: another program may have taken it during the job)",
        )
    return None


def _release(view: np.ndarray[Any, Any], mapping: mmap.mmap) -> None:
    """Drop the pages of an input view from this process's page tables (data stays cached)."""
    if view.size == 0:
        return
    base = np.frombuffer(mapping, dtype=np.uint8, count=1).__array_interface__["data"][0]
    low = view.__array_interface__["data"][0] - base
    high = low + view.itemsize
    for n, stride in zip(view.shape, view.strides):
        if stride > 0:
            high += (n - 1) * stride
        else:
            low += (n - 1) * stride
    start, length = _page_range(low, high, len(mapping))
    if length >= RELEASE_MIN_BYTES:
        mapping.madvise(mmap.MADV_DONTNEED, start, length)


# -- worker start-up ---------------------------------------------------------------------------

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
    :func:`_limit_started_pools`)."""
    global _pending_limit, _baseline_threads
    for name in _THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return
    _pending_limit = threads
    _baseline_threads = _thread_count()
    if now or _baseline_threads is None:
        _limit_started_pools(force=True)


_pending_limit: int | None = None
_baseline_threads: int | None = None


def _thread_count() -> int | None:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def _limit_started_pools(force: bool = False) -> None:
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
        count = _thread_count()
        if count is None or _baseline_threads is None or count <= _baseline_threads:
            return
    from threadpoolctl import threadpool_limits

    _thread_limiter = threadpool_limits(limits=_pending_limit)
    _pending_limit = None


def _watch_owner(owner_pid: int, parent_pid: int) -> None:
    info = proc_state(owner_pid)
    started = info[1] if info is not None and info[1] else None
    while True:
        time.sleep(WATCHDOG_INTERVAL)
        if os.getppid() != parent_pid or not pid_alive(owner_pid, started):
            break
        _drop_ended_jobs()
    # The owner is gone: nobody will collect our results. Exit at once, without cleanup
    # that could block on locks held by the thread running a kernel.
    os._exit(ORPHAN_EXIT_CODE)


def init_worker(
    owner_pid: int,
    threads: int | None,
    user_initializer: Any,
    user_initargs: tuple[Any, ...],
) -> None:
    """Initializer of every worker process of a local pool."""
    # Ctrl-C goes to the whole process group; the parent decides what stops, so workers
    # must not die half-way through a chunk on their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the parent's Python SIGTERM handler (map_chunks installs one
    # while it waits); a worker must die of SIGTERM plainly, so that its exit code says so.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A process that loaded OpenBLAS itself (spawn, forkserver) has its pool's threads
    # running already, and limiting them is free; in a forked copy the pool is stopped
    # until first used, and limiting it would start it: wait for a kernel to start it.
    pools_running = (_thread_count() or 0) > 1
    threading.Thread(
        target=_watch_owner,
        args=(owner_pid, os.getppid()),
        name="memmap-pool-watchdog",
        daemon=True,
    ).start()
    if user_initializer is not None:
        user_initializer(*user_initargs)
    if threads is not None:
        # After the user's initializer: threads it started are part of the baseline.
        limit_threads(threads, now=pools_running)


def probe_dir(path: str) -> tuple[str, str | None]:
    """Check from a worker that ``path`` can be written; returns (host:pid, error or None)."""
    import socket

    who = f"{socket.gethostname()}:{os.getpid()}"
    probe = os.path.join(path, f".memmap-pool-probe-{who.replace(':', '-')}")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return who, f"{type(exc).__name__}: {exc}"
    return who, None


if sys.platform != "linux":  # pragma: no cover - madvise constants differ by platform
    RELEASE_MIN_BYTES = sys.maxsize
