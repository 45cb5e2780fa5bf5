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

from ._chunks import Chunk, ChunkPlan, describe_region
from ._storage import ArrayRef, reserve

# Chunk states in the status file.
PENDING, RUNNING, DONE, DONE_WITH_RESULT = 0, 1, 2, 3
STATUS_HEADER_BYTES = 64  # byte 0: the job's cancel flag; the per-chunk arrays follow

CONTEXT_CACHE_SIZE = 4
"""Jobs whose mappings a worker keeps at once. Several jobs share the workers; a context is
also dropped as soon as its spec file is gone (the job ended), which releases its mappings,
so an unlinked output in /dev/shm frees its memory."""

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
    reserve: bool


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


class _JobContext:
    def __init__(self, spec_path: str, spec: JobSpec) -> None:
        self.spec_path = spec_path
        self.spec = spec
        self._maps: list[mmap.mmap] = []
        self._fds: list[int] = []
        fn, args, kwargs = pickle.loads(spec.kernel)
        self.fn, self.args, self.kwargs = fn, tuple(args), dict(kwargs)
        out = spec.output
        self.out_fd = os.open(out.path, os.O_RDWR)
        self._fds.append(self.out_fd)
        self.out_map = mmap.mmap(self.out_fd, 0, access=mmap.ACCESS_WRITE)
        self._maps.append(self.out_map)
        self.out = np.ndarray(
            out.shape, out.dtype, buffer=self.out_map, offset=out.offset, strides=out.strides
        )
        self.inputs: list[tuple[np.ndarray[Any, Any], mmap.mmap, tuple[int, ...]]] = []
        for ref, axes in zip(spec.inputs, spec.input_axes):
            fd = os.open(ref.path, os.O_RDONLY)
            try:
                mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            self._maps.append(mapping)
            arr = np.ndarray(
                ref.shape, ref.dtype, buffer=mapping, offset=ref.offset, strides=ref.strides
            )
            self.inputs.append((arr, mapping, axes))
        self.status: tuple[np.ndarray[Any, Any], ...] | None = None
        if spec.status_path is not None:
            fd = os.open(spec.status_path, os.O_RDWR)
            try:
                smap = mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE)
            finally:
                os.close(fd)
            self._maps.append(smap)
            self.status = status_views(smap, spec.plan.count)
        self.reserve_ok = spec.reserve

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


def _context(spec_path: str, token: str) -> _JobContext:
    ctx = _contexts.get(token)
    if ctx is not None:
        _contexts.move_to_end(token)
        return ctx
    # A new job: drop the contexts of jobs that ended (their spec file is removed at the end
    # of a job) and the least recently used beyond the cache size.
    for old_token, old in list(_contexts.items()):
        if not os.path.exists(old.spec_path):
            _contexts.pop(old_token).close()
    while len(_contexts) >= CONTEXT_CACHE_SIZE:
        _contexts.popitem(last=False)[1].close()
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    ctx = _JobContext(spec_path, spec)
    _contexts[token] = ctx
    return ctx


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
    except Exception as exc:
        first = indices[0] if len(indices) else -1
        result.failure = _failure(
            -1, ChunkPlan((), 1, "C", ()), "serialization", exc,
            f"the worker could not load the job (kernel, arguments or files) for chunk {first}",
        )
        return result
    spec = ctx.spec
    plan = spec.plan
    out_ref = spec.output
    itemsize = out_ref.dtype.itemsize
    fn, args, kwargs = ctx.fn, ctx.args, ctx.kwargs
    status = ctx.status
    out_len = len(ctx.out_map)
    monotonic, perf_counter = time.monotonic, time.perf_counter
    for index in indices:
        if status is not None:
            header, state, pids, starts = status
            if header[0]:
                break  # the job was cancelled or failed: drop the chunks not started
            pids[index] = pid
            starts[index] = monotonic()
            state[index] = RUNNING
        slices = plan.slices(index)
        lo, hi = plan.byte_span(index)
        lo += out_ref.offset
        hi += out_ref.offset
        if ctx.reserve_ok:
            try:
                contiguous = hi - lo == plan_region_bytes(slices, itemsize)
                ctx.reserve_ok = reserve(ctx.out_fd, lo, hi - lo, contiguous)
            except OSError as exc:
                result.failure = _failure(
                    index, plan, "storage", exc,
                    f"reserving {hi - lo} bytes of {out_ref.path} for the chunk failed "
                    "(no space left: another program may have taken it during the job)",
                )
                break
        chunk = Chunk(
            index, slices, out_ref.path, out_ref.dtype, plan.shape, spec.order,
            out_ref.offset, plan.count,
        )
        views = [
            arr[tuple(slices[a] if a in axes else slice(None) for a in range(min(arr.ndim, len(slices))))]
            for arr, _, axes in ctx.inputs
        ]
        t0 = perf_counter()
        try:
            value = fn(ctx.out[slices], chunk, *views, *args, **kwargs)
        except BaseException as exc:
            result.failure = _failure(index, plan, "kernel", exc)
            break
        elapsed = perf_counter() - t0
        start, length = _page_range(lo, hi, out_len)
        if spec.flush and length > 0:
            ctx.out_map.flush(start, length)
        if length >= RELEASE_MIN_BYTES:
            ctx.out_map.madvise(mmap.MADV_DONTNEED, start, length)
            for view, (_arr, mapping, _axes) in zip(views, ctx.inputs):
                _release(view, mapping)
        del views
        if value is not None:
            try:
                result.results[index] = cloudpickle.dumps(value)
            except Exception as exc:
                result.failure = _failure(
                    index, plan, "serialization", exc,
                    f"the value returned by the kernel ({type(value).__name__}) "
                    "cannot be pickled",
                )
                break
        result.done.append(index)
        result.seconds.append(elapsed)
        result.nbytes += plan_region_bytes(slices, itemsize)
        if status is not None:
            status[1][index] = DONE if value is None else DONE_WITH_RESULT
    return result


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


def plan_region_bytes(slices: tuple[slice, ...], itemsize: int) -> int:
    n = itemsize
    for s in slices:
        n *= s.stop - s.start
    return n


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


def limit_threads(threads: int) -> None:
    """Cap BLAS/OpenMP pools: already loaded ones through threadpoolctl (when installed),
    later ones through the environment variables they read when they load."""
    global _thread_limiter
    for name in _THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    _thread_limiter = threadpool_limits(limits=threads)


def _watch_owner(owner_pid: int, parent_pid: int) -> None:
    while True:
        time.sleep(WATCHDOG_INTERVAL)
        if os.getppid() != parent_pid:
            break
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
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
    threading.Thread(
        target=_watch_owner, args=(owner_pid, os.getppid()), name="memmap-pool-watchdog",
        daemon=True,
    ).start()
    if threads is not None:
        limit_threads(threads)
    if user_initializer is not None:
        user_initializer(*user_initargs)


def ping() -> int:
    """A no-op task: returns the worker's pid (used to start workers and in checks)."""
    return os.getpid()


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
