"""What runs inside a worker: one batch of chunks of one job.

A worker receives :class:`~._protocol.Batch` es: a spec path and inode, a job token and chunk
indices, a few dozen bytes. The first batch of a job loads the job's spec file once (plan,
file references, roles, the cloudpickled kernel), maps the output and input files once, and
caches all of it under the job's token; every chunk after that is a slice of those mappings
and one kernel call::

    batch ──▶ context for token (cached: spec, kernel, mappings)
              reserve the batch's blocks (fallocate, once per batch)
              for each index:  status: running, pid, start time
                               out = output[region]; views = [role.view(input, region) ...]
                               result = fn(out, chunk, *views, *args, **kwargs)
                               flush (persistent / remote outputs), release pages
                               status: done
    ◀── BatchResult: indices done, per-chunk seconds, small pickled results, or one failure
"""

from __future__ import annotations

import mmap
import os
import pickle
import sys
import threading
import time
import traceback
from collections import OrderedDict
from typing import Any, NamedTuple

import cloudpickle
import numpy as np

from . import _memory as memory
from ._blas import apply_pending_limit
from ._chunks import Chunk, ChunkPlan, describe_region, element_strides, region_nbytes
from ._halo import BorderCopies, HaloRole, border_copies, padded_shape, refresh_border
from ._protocol import (
    Batch,
    BatchResult,
    ChunkFailure,
    FailureKind,
    JobSpec,
    StatusFile,
    load_spec,
)
from ._roles import InputRole
from ._storage import ArrayRef, reserve, start_writeback

CONTEXT_CACHE_SIZE = 4
"""Jobs whose mappings a worker keeps at once. Several jobs share the workers; a context is
also dropped once its spec file is gone (the job ended: checked before each new job, and by
the watchdog while idle), which releases its mappings, so an unlinked output in /dev/shm
frees its memory."""

RELEASE_MIN_BYTES = 1 << 20
"""After a chunk at least this large, its pages are dropped from the worker's page tables
(madvise DONTNEED; the data stays in the shared page cache). Without it a worker's resident
memory grows with every chunk it maps, up to the whole output."""

if sys.platform != "linux":  # pragma: no cover - madvise constants differ by platform
    RELEASE_MIN_BYTES = sys.maxsize


def _map_input(ref: ArrayRef, role: InputRole) -> tuple[np.ndarray[Any, Any], mmap.mmap, InputRole]:
    if memory.is_key(ref.path):
        # A thread of the caller's process: the caller's array itself, seen read-only.
        arr = memory.lookup(ref.path).view()
        arr.flags.writeable = False
        return arr, mmap.mmap(-1, mmap.PAGESIZE), role
    mapping = _map_file(ref.path, writable=False)
    arr = np.ndarray(ref.shape, ref.dtype, buffer=mapping, offset=ref.offset, strides=ref.strides)
    return arr, mapping, role


def _map_file(path: str, writable: bool) -> mmap.mmap:
    """Map a whole file; the descriptor is closed at once (the mapping keeps the file)."""
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    finally:
        os.close(fd)


class _FilesError(Exception):
    """A job's files could not be opened or mapped in the worker (``args[0]``: the cause)."""


class _MappedOutput:
    """One output file mapped for writing, and the page arithmetic of its chunks."""

    def __init__(self, ref: ArrayRef, plan: ChunkPlan, order: str) -> None:
        self.ref = ref
        self.itemsize = ref.dtype.itemsize
        # The job's chunks as this output sees them: its trailing axes (beyond the grid's)
        # are covered whole by every chunk.
        self.plan = plan.for_output(ref.shape, self.itemsize, order)
        self.extra = tuple(slice(0, n) for n in ref.shape[len(plan.shape) :])
        self.elem_strides = element_strides(ref.shape, order)
        self.reserve_ok = True  # until the filesystem says it can't reserve blocks
        # Whether its pages are released after chunks: not for an array in this process's
        # memory (that would zero it), nor for an empty one.
        self.releasable = False
        if memory.is_key(ref.path):
            # A thread of the caller's process writes the caller's memory directly.
            self.fd = -1
            self.reserve_ok = False
            self.mapping = mmap.mmap(-1, mmap.PAGESIZE)
            self.array = memory.lookup(ref.path)
            return
        self.fd = os.open(ref.path, os.O_RDWR)
        if self.plan.nbytes == 0:
            # Nothing to write (an empty trailing axis), and an empty file can't be mapped.
            self.reserve_ok = False
            self.mapping = mmap.mmap(-1, mmap.PAGESIZE)
            self.array = np.empty(ref.shape, ref.dtype)
            return
        self.releasable = True
        try:
            self.mapping = mmap.mmap(self.fd, 0, access=mmap.ACCESS_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.array = np.ndarray(
            ref.shape, ref.dtype, buffer=self.mapping, offset=ref.offset, strides=ref.strides
        )

    def view(self, region: tuple[slice, ...]) -> np.ndarray[Any, Any]:
        # A 0-d output indexed with () would give a scalar copy, not a writable view.
        return self.array[region] if region else self.array[...]

    def page_span(self, region: tuple[slice, ...]) -> tuple[int, int]:
        """``(start, length)`` of the whole pages holding the region's bytes (none for an
        output whose pages are not released)."""
        if not self.releasable:
            return 0, 0
        region = region + self.extra
        strides, itemsize, base = self.elem_strides, self.itemsize, self.ref.offset
        lo = base + itemsize * sum(s.start * st for s, st in zip(region, strides))
        hi = base + itemsize * (sum((s.stop - 1) * st for s, st in zip(region, strides)) + 1)
        return _page_range(lo, hi, len(self.mapping))

    def batch_span(self, indices: range | tuple[int, ...] | list[int]) -> tuple[int, int]:
        """File bytes ``[lo, hi)`` covering every chunk of a batch."""
        plan = self.plan
        # In a C-ordered file, byte offsets grow with chunk numbers (both are lexicographic
        # in the block coordinates), so the first and last chunks of a range bound all of
        # it; an F-ordered file keeps that only when just its last axis is split.
        monotonic = plan.order == "C" or plan.block[:-1] == plan.shape[:-1]
        picks = (indices[0], indices[-1]) if isinstance(indices, range) and monotonic else indices
        spans = [plan.byte_span(i) for i in picks]
        base = self.ref.offset
        return base + min(a for a, _ in spans), base + max(b for _, b in spans)

    def close(self) -> None:
        self.array = None  # type: ignore[assignment]
        try:
            self.mapping.close()
        except BufferError:
            pass  # a kernel kept a view alive; the mapping goes when it does
        if self.fd >= 0:
            os.close(self.fd)


class _JobContext:
    """A job as one worker holds it: the spec, the kernel and the mapped files."""

    users = 0  # batches running with this context (several threads may share a worker)
    retired = False  # dropped from the cache while in use: closed when the last user leaves

    def __init__(self, spec_path: str, spec: JobSpec) -> None:
        self.spec_path = spec_path
        self.spec = spec
        self.outputs: list[_MappedOutput] = []
        self.inputs: list[tuple[np.ndarray[Any, Any], mmap.mmap, InputRole]] = []
        self.input_pages: list[_InputPages] = []
        self.buffers: list[_MappedOutput] = []  # an iterate run's two state buffers
        self.padded: list[np.ndarray[Any, Any]] = []  # the same, with their borders
        self.step_geometry: dict[int, _StepGeometry] = {}  # per chunk of an iterate run
        self.initial: tuple[np.ndarray[Any, Any], mmap.mmap, InputRole] | None = None
        self.status: StatusFile | None = None
        fn, args, kwargs = pickle.loads(spec.kernel)
        self.fn, self.args, self.kwargs = fn, tuple(args), dict(kwargs)
        try:
            self._open_files()
        except Exception as exc:
            self.close()
            raise _FilesError(exc) from exc

    def _open_files(self) -> None:
        spec = self.spec
        orders = spec.output_orders or (spec.order,) * len(spec.outputs)
        reserve = spec.reserve or (True,) * len(spec.outputs)
        for ref, order, reserved in zip(spec.outputs, orders, reserve):
            output = _MappedOutput(ref, spec.plan, order)
            output.reserve_ok = output.reserve_ok and reserved
            self.outputs.append(output)
        for binding in spec.inputs:
            self.inputs.append(_map_input(binding.ref, binding.role))
        self.input_pages = [
            _InputPages(mapping, not memory.is_key(binding.ref.path))
            for (_arr, mapping, _role), binding in zip(self.inputs, spec.inputs)
        ]
        steps = spec.steps
        if steps is not None:
            # An iterate run: both state buffers stay mapped, writable, for every step.
            for ref in steps.buffers:
                buffer = _MappedOutput(ref, spec.plan, "C")
                buffer.reserve_ok = False  # allocated whole by the parent
                self.buffers.append(buffer)
                if steps.pad:
                    # The whole padded file; the buffer's own array is its inside.
                    front = sum(p * stride for p, stride in zip(steps.pad, ref.strides))
                    self.padded.append(
                        np.ndarray(
                            padded_shape(ref.shape, steps.pad),
                            ref.dtype,
                            buffer=buffer.mapping,
                            offset=ref.offset - front,
                            strides=ref.strides,
                        )
                    )
            if steps.initial is not None:
                self.initial = _map_input(steps.initial.ref, steps.initial.role)
        if spec.status_path is not None:
            self.status = StatusFile.open(spec.status_path, spec.plan.count)
        plan = spec.plan
        inputs = tuple((binding.role, binding.ref.shape) for binding in spec.inputs)
        if steps is not None and spec.prev_role is not None:
            inputs = ((spec.prev_role, plan.shape), *inputs)  # interior(0): the previous state
        # The descriptor names the first output's file; a reduction has none.
        path, dtype, offset = "", np.dtype(np.float64), 0
        if spec.outputs:
            first = spec.outputs[0]
            path, dtype, offset = first.path, first.dtype, first.offset
        elif spec.inputs:
            dtype = spec.inputs[0].ref.dtype
        shape, order, count = plan.shape, spec.order, plan.count

        def make_chunk(index: int, region: tuple[slice, ...], step: int = 0) -> Chunk:
            # Positional: a keyword call costs ~1 us more per chunk (20,000 tiny chunks).
            return Chunk(index, region, path, dtype, shape, order, offset, count, step, inputs)

        self.make_chunk = make_chunk

    def close(self) -> None:
        self.padded = []
        for out in (*self.outputs, *self.buffers):
            out.close()
        self.buffers = []
        if self.initial is not None:
            self.inputs.append(self.initial)  # closed with the inputs below
            self.initial = None
        # Views into the mappings must go first, or mmap.close() raises BufferError.
        mappings = [mapping for _arr, mapping, _role in self.inputs]
        self.inputs, self.outputs, self.input_pages = [], [], []
        for mapping in mappings:
            try:
                mapping.close()
            except BufferError:
                pass  # a kernel kept a view alive; the mapping goes when it does
        if self.status is not None:
            self.status.close()
            self.status = None


_contexts: OrderedDict[str, _JobContext] = OrderedDict()

_contexts_lock = threading.Lock()
"""A worker of a thread-based executor (a Dask worker with several threads, a
ThreadPoolExecutor) runs batches in several threads at once: one of them builds a job's
context, the others wait for it instead of mapping the same files again."""


def _context(batch: Batch) -> _JobContext:
    with _contexts_lock:
        ctx = _contexts.get(batch.token)
        if ctx is not None:
            _contexts.move_to_end(batch.token)
            ctx.users += 1
            return ctx
        # A new job: drop the contexts of jobs that ended (their spec file is removed at the
        # end of a job) and the least recently used beyond the cache size.
        for old_token, old in list(_contexts.items()):
            if not os.path.exists(old.spec_path):
                _retire(_contexts.pop(old_token))
        while len(_contexts) >= CONTEXT_CACHE_SIZE:
            _retire(_contexts.popitem(last=False)[1])
        spec = load_spec(batch.spec_path, batch.spec_inode)
        ctx = _JobContext(batch.spec_path, spec)
        ctx.users = 1
        _contexts[batch.token] = ctx
        return ctx


def release_ended_jobs() -> int:
    """Unmap the files of jobs that ended (their spec file is gone); return how many.

    Run by an idle worker's watchdog, and on each Dask worker when a pool closes: an
    unlinked output in /dev/shm holds its memory until the last mapping goes, and Dask
    workers outlive the pool. A batch of such a job still running in another thread closes
    the context when it ends.
    """
    released = 0
    with _contexts_lock:
        for token, ctx in list(_contexts.items()):
            if not os.path.exists(ctx.spec_path):
                _retire(_contexts.pop(token))
                released += 1
    return released


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


def _text(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except Exception as inner:
        return f"<the {type(exc).__name__}'s message could not be made: {type(inner).__name__}>"


def _format_traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        frames = "".join(traceback.format_tb(exc.__traceback__))
        return f"Traceback (most recent call last):\n{frames}{type(exc).__name__}: {_text(exc)}\n"


def _failure(
    index: int, plan: ChunkPlan | None, kind: FailureKind, exc: BaseException, where: str = ""
) -> ChunkFailure:
    tb = _format_traceback(exc)
    payload: bytes | None
    try:
        payload = cloudpickle.dumps(exc)
        pickle.loads(payload)  # some exceptions pickle but can't be rebuilt; find out here
    except Exception:
        payload = None
    message = _text(exc)
    if where:
        message = f"{where}: {message}"
    return ChunkFailure(
        index=index,
        region=describe_region(plan.slices(index)) if plan is not None and index >= 0 else "",
        kind=kind,
        exception=payload,
        type_name=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=message,
        traceback=tb,
    )


def _page_range(offset: int, stop: int, limit: int) -> tuple[int, int]:
    start = offset - offset % mmap.PAGESIZE
    return start, min(stop, limit) - start


def run_batch(batch: Batch) -> BatchResult:
    """Run the chunks of ``batch`` (the function the dispatcher submits to the backend)."""
    result = BatchResult(pid=os.getpid())
    indices = batch.indices
    first = indices[0] if len(indices) else -1
    try:
        ctx = _context(batch)
    except _FilesError as exc:
        where = f"the worker could not open the job's files for chunk {first}"
        result.failure = _failure(-1, None, FailureKind.FILES, exc.args[0], where)
        return result
    except Exception as exc:
        kind = FailureKind.FILES if isinstance(exc, OSError) else FailureKind.SERIALIZATION
        where = f"the worker could not load the job's kernel or arguments for chunk {first}"
        result.failure = _failure(-1, None, kind, exc, where)
        return result
    try:
        if ctx.spec.steps is not None:
            return _run_step(ctx, indices, batch.step, result)
        return _run_chunks(ctx, indices, result)
    finally:
        _unpin(ctx)
        apply_pending_limit()


def _run_chunks(
    ctx: _JobContext, indices: range | tuple[int, ...], result: BatchResult
) -> BatchResult:
    pid = result.pid
    spec = ctx.spec
    plan = spec.plan
    if len(indices):
        failure = _reserve_batch(ctx, indices)
        if failure is not None:
            result.failure = failure
            return result
    fn, args, kwargs = ctx.fn, ctx.args, ctx.kwargs
    status = ctx.status
    outputs = ctx.outputs
    single = outputs[0] if len(outputs) == 1 else None
    itemsize = plan.itemsize  # all outputs' bytes per element of the grid
    make_chunk = ctx.make_chunk
    inputs = ctx.inputs
    flush = spec.flush
    monotonic, perf_counter = time.monotonic, time.perf_counter
    done, seconds = result.done, result.seconds
    unreleased = 0  # bytes written by small chunks whose pages this worker still maps
    # Persistent or remote outputs: the page spans of the chunks done, made durable together
    # at the end of the batch (one msync per contiguous run of them), before the parent hears.
    unflushed: list[list[tuple[int, int]]] = [[] for _ in outputs] if flush else []
    input_pages = ctx.input_pages
    for index in indices:
        if status is not None:
            if status.cancelled:
                break  # the job was cancelled or failed: drop the chunks not started
            status.start(index, pid, monotonic())
        region = plan.slices(index)
        views = [role.view(arr, region) for arr, _, role in inputs]
        out_view: Any = (
            single.view(region) if single is not None else tuple(o.view(region) for o in outputs)
        )
        chunk = make_chunk(index, region)
        t0 = perf_counter()
        try:
            value = fn(out_view, chunk, *views, *args, **kwargs)
        except BaseException as exc:
            if status is not None:
                # Fail fast: this worker's next queued batch, and the other workers, must
                # not start another chunk of the job while the parent hears of the error.
                status.cancel()
            result.failure = _failure(index, plan, FailureKind.KERNEL, exc)
            break
        elapsed = perf_counter() - t0
        nbytes = region_nbytes(region, itemsize)
        if flush or nbytes >= RELEASE_MIN_BYTES:
            _release(ctx, region, unflushed)
        for pages, view, (arr, _mapping, role) in zip(input_pages, views, inputs):
            pages.add(view, arr, role, region)
        del views, out_view
        if value is not None:
            try:
                result.results[index] = cloudpickle.dumps(value)
            except Exception as exc:
                what = (
                    f"the value returned by the kernel ({type(value).__name__}) cannot be pickled"
                )
                result.failure = _failure(index, plan, FailureKind.SERIALIZATION, exc, what)
                break
        done.append(index)
        seconds.append(elapsed)
        result.nbytes += nbytes
        if nbytes < RELEASE_MIN_BYTES:
            unreleased += nbytes
        if status is not None:
            status.finish(index, value is not None)
    for pages in input_pages:
        pages.release()  # what the batch's small chunks read, at most a few MiB
    if unreleased >= RELEASE_MIN_BYTES and done:
        # Small chunks are released together, once a batch of them adds up: one system call
        # for the batch's byte span instead of one per chunk.
        ran = range(done[0], done[-1] + 1) if isinstance(indices, range) else done
        for out in outputs:
            if not out.releasable:
                continue
            lo, hi = out.batch_span(ran)
            start, length = _page_range(lo, hi, len(out.mapping))
            if length > 0:
                out.mapping.madvise(mmap.MADV_DONTNEED, start, length)
    if unflushed and done:
        _flush(outputs, unflushed)
    return result


def _run_step(
    ctx: _JobContext, indices: range | tuple[int, ...], step: int, result: BatchResult
) -> BatchResult:
    """The chunks of one step of an iterate run: ``fn(out, chunk, prev, *inputs, ...)`` with
    ``out`` in ``buffers[step % 2]`` and ``prev`` from the other buffer (from the initial
    state for step 1). The buffers stay mapped and resident: nothing is released."""
    pid = result.pid
    spec = ctx.spec
    plan = spec.plan
    steps, prev_role = spec.steps, spec.prev_role
    assert steps is not None
    assert prev_role is not None
    out_buffer = ctx.buffers[step % 2]
    # Padded buffers: the window is a view of the previous buffer with its border, and each
    # chunk refreshes the border cells its region is the source of (a constant border is
    # written once, by the parent).
    padded_prev = padded_out = None
    if steps.pad:
        padded_out = ctx.padded[step % 2]
        if step != steps.first_step or ctx.initial is None:
            padded_prev = ctx.padded[(step - 1) % 2]
    if step == steps.first_step and ctx.initial is not None:
        prev_array = ctx.initial[0]
    else:
        prev_array = ctx.buffers[(step - 1) % 2].array
    fn, args, kwargs = ctx.fn, ctx.args, ctx.kwargs
    status = ctx.status
    make_chunk = ctx.make_chunk
    inputs = ctx.inputs
    perf_counter = time.perf_counter
    geometry = ctx.step_geometry
    for index in indices:
        if status is not None:
            if status.cancelled:
                break
            status.start(index, pid, time.monotonic())
        g = geometry.get(index)
        if g is None:
            g = geometry[index] = _StepGeometry.of(ctx, index)
        region = g.region
        if padded_prev is not None:
            prev = padded_prev[g.padded_window]
        elif g.window is not None:
            prev = prev_array[g.window]
        else:
            prev = prev_role.view(prev_array, region)
        prev.flags.writeable = False  # a view of the other buffer: the kernel only reads it
        views = [role.view(arr, region) for arr, _, role in inputs]
        out = out_buffer.view(region)
        chunk = make_chunk(index, region, step=step)
        t0 = perf_counter()
        try:
            fn(out, chunk, prev, *views, *args, **kwargs)
        except BaseException as exc:
            if status is not None:
                status.cancel()
            result.failure = _failure(index, plan, FailureKind.KERNEL, exc)
            break
        result.seconds.append(perf_counter() - t0)
        if padded_out is not None:  # a constant border has no copies: written once
            refresh_border(padded_out, g.border_copies)
        if spec.flush:  # workers on other hosts: the next step may read it elsewhere
            start, length = out_buffer.page_span(region)
            if length > 0:
                out_buffer.mapping.flush(start, length)
        del prev, views, out
        result.done.append(index)
        result.nbytes += g.nbytes
        if status is not None:
            status.finish(index, False)
    return result


class _StepGeometry(NamedTuple):
    """What a chunk of an iterate run needs at every step and that depends only on where it
    is: computed once per worker and chunk (an empty step is then mostly the round trip)."""

    region: tuple[slice, ...]
    padded_window: tuple[slice, ...]  # the window in a padded buffer (padded runs)
    window: tuple[slice, ...] | None  # the window as a slice of an unpadded buffer, if inside
    nbytes: int
    border_copies: BorderCopies  # the border cells this chunk is the source of

    @classmethod
    def of(cls, ctx: _JobContext, index: int) -> _StepGeometry:
        spec = ctx.spec
        plan, steps, role = spec.plan, spec.steps, spec.prev_role
        assert steps is not None
        region = plan.slices(index)
        pad = steps.pad
        padded_window = tuple(slice(r.start, r.stop + 2 * p) for r, p in zip(region, pad))
        window = role.inside_window(plan.shape, region) if isinstance(role, HaloRole) else None
        copies: BorderCopies = []
        if pad and steps.pad_mode != "constant":
            copies = border_copies(plan.shape, pad, region, steps.pad_mode)
        return cls(region, padded_window, window, region_nbytes(region, plan.itemsize), copies)


def _release(
    ctx: _JobContext, region: tuple[slice, ...], unflushed: list[list[tuple[int, int]]]
) -> None:
    """After a chunk: drop a large chunk's pages from this worker's page tables (the data
    stays in the page cache); for a persistent or remote output (``unflushed`` not empty),
    start writing the chunk to disk without waiting, and remember its pages for the
    msync at the end of the batch.

    Writeback runs while the next chunks compute, so the msync mostly finds its pages
    written; releasing the pages first spares writeback the write-protecting of this
    worker's mappings of them.
    """
    for k, out in enumerate(ctx.outputs):
        start, length = out.page_span(region)
        if length >= RELEASE_MIN_BYTES:
            out.mapping.madvise(mmap.MADV_DONTNEED, start, length)
        if unflushed and length > 0:
            unflushed[k].append((start, length))
            if length >= RELEASE_MIN_BYTES:
                start_writeback(out.fd, start, length)


def _flush(outputs: list[_MappedOutput], unflushed: list[list[tuple[int, int]]]) -> None:
    """msync the pages of a batch's chunks: one call (and one flush of the disk's cache)
    per run of adjacent or overlapping chunk spans, usually one for the batch. msync
    writes and waits for the file's pages whether or not they are still mapped here."""
    for out, spans in zip(outputs, unflushed):
        for start, length in _merge_spans(spans):
            out.mapping.flush(start, length)


def _merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(start, length)`` spans joined where they touch or overlap, in file order."""
    merged: list[tuple[int, int]] = []
    lo = hi = -1
    for start, length in sorted(spans):
        if start <= hi:
            hi = max(hi, start + length)
            continue
        if hi > lo:
            merged.append((lo, hi - lo))
        lo, hi = start, start + length
    if hi > lo:
        merged.append((lo, hi - lo))
    return merged


class _InputPages:
    """The pages of one mapped input that chunks read and this worker still maps.

    Chunks add the byte span of their view of the input; once the spans add up to
    :data:`RELEASE_MIN_BYTES`, and at the end of each batch, the pages are dropped from the
    worker's page tables (the data stays in the page cache). Whatever the size of the output's
    chunks, a worker then maps at most a few MiB of each input beyond its current chunk.
    """

    def __init__(self, mapping: mmap.mmap, in_file: bool = True) -> None:
        self.in_file = in_file  # False: an array in this process's memory, nothing to release
        self.mapping = mapping
        self.size = len(mapping)
        self.base = np.frombuffer(mapping, dtype=np.uint8, count=1).__array_interface__["data"][0]
        self.lo, self.hi = self.size, 0

    def add(
        self,
        view: np.ndarray[Any, Any],
        array: np.ndarray[Any, Any],
        role: InputRole,
        region: tuple[slice, ...],
    ) -> None:
        if not self.in_file:
            return
        span = self._span(view)
        if span is None:  # a padded copy: the part of the file it was made from
            span = self._span(role.mapped_part(array, region))
            if span is None:
                return
        lo, hi = span
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if self.hi - self.lo >= RELEASE_MIN_BYTES:
            self.release()

    def release(self) -> None:
        if self.hi > self.lo and sys.maxsize != RELEASE_MIN_BYTES:
            start, length = _page_range(self.lo, self.hi, self.size)
            if length > 0:
                self.mapping.madvise(mmap.MADV_DONTNEED, start, length)
        self.lo, self.hi = self.size, 0

    def _span(self, view: np.ndarray[Any, Any]) -> tuple[int, int] | None:
        """Bytes ``[lo, hi)`` of the mapping that ``view`` covers; None if it is not in it."""
        if view.size == 0:
            return None
        low = view.__array_interface__["data"][0] - self.base
        if not 0 <= low < self.size:
            return None
        high = low + view.itemsize
        for n, stride in zip(view.shape, view.strides):
            if stride > 0:
                high += (n - 1) * stride
            else:
                low += (n - 1) * stride
        return max(low, 0), min(high, self.size)


def _reserve_batch(ctx: _JobContext, indices: range | tuple[int, ...]) -> ChunkFailure | None:
    """Reserve the blocks the batch will write, in one call per output: the byte range from
    its lowest to its highest chunk byte. Reserving blocks twice is harmless, and one system
    call per batch instead of per chunk keeps tiny chunks cheap."""
    for out in ctx.outputs:
        if not out.reserve_ok:
            continue
        lo, hi = out.batch_span(indices)
        contiguous = len(indices) == 1 and hi - lo == region_nbytes(
            out.plan.slices(indices[0]), out.itemsize
        )
        try:
            out.reserve_ok = reserve(out.fd, lo, hi - lo, contiguous)
        except OSError as exc:
            where = (
                f"reserving {hi - lo} bytes of {out.ref.path} for the chunks failed "
                "(no space left: another program may have taken it during the job)"
            )
            return _failure(indices[0], ctx.spec.plan, FailureKind.STORAGE, exc, where)
    return None
