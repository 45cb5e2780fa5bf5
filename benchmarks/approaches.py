"""The approaches compared, each written the way its documentation recommends.

Each approach has two parts:

- ``pool(w, out_dir)``: a context manager that starts what the approach runs on (a process
  pool, a thread pool, nothing) and stops it at exit. For workloads with ``startup=True`` it
  is entered and left inside the timed region; otherwise it is entered once, warmed up, and
  shared by the timed runs.
- ``run(pool, w, out_dir)``: computes the whole output of ``w`` and returns an
  :class:`Output` holding it (in memory, in shared memory or in a file, as the approach
  leaves it). Cleaning up (removing files) happens after the clock stops. Each kind of
  workload has a method of its own (``run_stencil`` for a stencil, from the input file
  ``w.input``; ``run_heat``, ``run_empty_step``, ``run_reduction``, ``run_normals``);
  :meth:`Approach.compute` picks the one ``w`` needs. After the clock stops,
  :meth:`Approach.verify` may check what only the approach knows of its result (the normals:
  its own stream of random numbers).

Every approach calls the same block function (``w.block_function``) on the same chunks of
``w.chunk_rows`` rows with the same number of workers; on a stencil workload, the same stencil
function (``w.stencil_function``) on the same row chunks, each widened by the same halo of
``STENCIL_DEPTH`` rows. Task functions that run in workers are module-level so that every start
method can import them.

Not every approach runs every workload: an approach runs the kinds of workload it has a line in
``patterns`` for (how it is written, for the report). The block fills are compared with the ways
of filling an array on several cores (pools, shared memory, joblib, dask); the stencil with the
ways of running a filter over overlapping chunks (dask's ``map_overlap``, scikit-image's
``apply_parallel``), and with MemmapPool's halo inputs; heat (``MemmapPool.iterate``) with a
serial loop and the double buffer written by hand on a ``ProcessPoolExecutor``; the reduction
(``reduce_chunks``) with numpy's sum and dask's; the normals (``chunk.random``) with one
generator and with the limit of a process pool, plain processes that each fill their part of
a shared file. The empty step is MemmapPool's alone: what a step of ``iterate`` costs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .workloads import (
    HEAT_ALPHA,
    NORMALS_PREFIX,
    NORMALS_SEED,
    STENCIL_DEPTH,
    STENCIL_MODE,
    STENCIL_SIGMA,
    Workload,
    heat_serial,
    heat_update,
)

BlockFn = Callable[[np.ndarray, int], None]
StencilFn = Callable[[np.ndarray], np.ndarray]

_counter = itertools.count()


def _unique_path(directory: str, stem: str, suffix: str = ".bin") -> str:
    return os.path.join(directory, f"bench-{stem}-{os.getpid()}-{next(_counter)}{suffix}")


def _noop() -> None:
    pass


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@dataclass
class Output:
    """A computed output and how to release it once it has been checked.

    ``measured``: the time the run reports, when it is not the wall-clock time of the whole
    call (the empty step's time per step); ``info``: facts of the run for the report (the
    chunks MemmapPool chose).
    """

    array: Any
    close: Callable[[], None] = _noop
    measured: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


RUN_METHODS = {
    "fill": "run",
    "stencil": "run_stencil",
    "heat": "run_heat",
    "empty_step": "run_empty_step",
    "reduction": "run_reduction",
    "normals": "run_normals",
}
"""The method of :class:`Approach` that computes each kind of workload."""


class Approach:
    """Base class: see the module docstring."""

    key = ""
    label = ""
    processes = True  # runs worker processes
    ram_only = False  # holds the whole output in RAM: not run out-of-core
    patterns: dict[str, str] = {}
    """Kind of workload -> one line for the report: how it is written. The approach runs the
    kinds it has a line for."""

    def __init__(self, workers: int, start_method: str, temp_dir: str) -> None:
        self.workers = workers
        self.start_method = start_method
        self.temp_dir = temp_dir  # where file-backed outputs go when not out-of-core

    def prepare(self) -> None:
        """Once per process, before anything is timed."""

    def pool(self, w: Workload, out_dir: str) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    @classmethod
    def runs(cls, w: Workload) -> bool:
        """Whether this approach runs workload ``w`` at all."""
        return w.kind in cls.patterns

    def unavailable(self, w: Workload) -> str | None:
        """Why this approach cannot run ``w`` here (reported as skipped), or None."""
        return None

    def compute(self, pool: Any, w: Workload, out_dir: str) -> Output:
        """The whole output of ``w``, whichever kind of workload it is."""
        method: Callable[[Any, Workload, str], Output] = getattr(self, RUN_METHODS[w.kind])
        return method(pool, w, out_dir)

    def verify(self, pool: Any, w: Workload, output: Output) -> str | None:
        """After the clock: what is wrong with ``output`` that only this approach can tell
        (None: nothing). ``pool`` is the started pool of a workload without start-up."""
        return None

    def run(self, pool: Any, w: Workload, out_dir: str) -> Output:
        raise NotImplementedError

    def run_stencil(self, pool: Any, w: Workload, out_dir: str) -> Output:
        raise NotImplementedError

    def _executor(self) -> ProcessPoolExecutor:
        import multiprocessing

        return ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context(self.start_method)
        )


# -- tasks that run in worker processes ------------------------------------------------------------


def return_block(fn: BlockFn, start: int, rows: int, cols: int, dtype: str) -> np.ndarray:
    """Compute one chunk into a new array and return it (pickled back to the parent)."""
    out = np.empty((rows, cols), dtype=dtype)
    fn(out, start)
    return out


def memmap_task(fn: BlockFn, path: str, start: int, rows: int, cols: int, dtype: str) -> None:
    """The hand-written pattern: reopen the output file in r+ mode, map only this chunk's
    rows, write them. No flush: processes on one host share the page cache, so the parent
    sees the rows as soon as they are written; flushing would only add durability."""
    itemsize = np.dtype(dtype).itemsize
    mm = np.memmap(path, dtype=dtype, mode="r+", offset=start * cols * itemsize, shape=(rows, cols))
    fn(mm, start)
    del mm  # unmaps


def shm_task(fn: BlockFn, name: str, start: int, rows: int, cols: int, dtype: str) -> None:
    """Attach the shared-memory block by name, write this chunk's rows, detach (the pattern of
    the ``multiprocessing.shared_memory`` documentation)."""
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=name)
    try:
        itemsize = np.dtype(dtype).itemsize
        view = np.ndarray((rows, cols), dtype=dtype, buffer=shm.buf, offset=start * cols * itemsize)
        fn(view, start)
        del view
    finally:
        shm.close()


def memmap_arg_task(fn: BlockFn, out: np.memmap, start: int, rows: int) -> None:
    """joblib's documented output pattern: the np.memmap itself is an argument; joblib sends
    it by reference and the worker writes its rows."""
    fn(out[start : start + rows], start)


def dask_block(fn: BlockFn, dtype: str, cols: int, block_info: Any = None) -> np.ndarray:
    """A dask.array block: computed from its location, returned to the scheduler."""
    (r0, r1), _ = block_info[None]["array-location"]
    out = np.empty((r1 - r0, cols), dtype=dtype)
    fn(out, r0)
    return out


def memmap_pool_kernel(out: np.ndarray, chunk: Any, fn: BlockFn) -> None:
    """MemmapPool's kernel convention around the shared block function."""
    fn(out, chunk.slices[0].start)


def halo_kernel(out: np.ndarray, chunk: Any, window: np.ndarray, fn: StencilFn) -> None:
    """MemmapPool's kernel around the stencil function: ``window`` is the chunk's region of
    the input widened by the halo; the chunk's own rows of its blur are the output."""
    out[...] = fn(window)[chunk.interior(0)]


def heat_kernel(out: np.ndarray, chunk: Any, prev: np.ndarray, alpha: float) -> None:
    """MemmapPool's step kernel of the heat equation: ``prev`` is the chunk's rows of the
    previous state widened by one on every side (with depth 1 and boundary "edge" always a
    full window: ``chunk.interior(0)`` is its inside)."""
    heat_update(out, prev, alpha)


def noop_kernel(out: np.ndarray, chunk: Any, prev: np.ndarray) -> None:
    """The empty step: a kernel that does nothing."""


def sum_partial(chunk: Any, x: np.ndarray) -> Any:
    """MemmapPool's reduction function: the float64 sum of the chunk's part of the input."""
    return x.sum(dtype="float64")


def normals_kernel(out: np.ndarray, chunk: Any, seed: int) -> None:
    """MemmapPool's kernel of the normals: the chunk's values, which depend on ``seed`` and
    each element's flat index only."""
    out[...] = chunk.random(seed=seed).standard_normal()


def heat_rows_task(prev_path: str, out_path: str, start: int, stop: int, alpha: float) -> None:
    """The hand-written double buffer's task: open both ``.npy`` buffers, read rows
    ``start - 1 .. stop + 1`` of the previous state, pad them with the edge values where they
    reach beyond the state (and on the left and right), write rows ``start .. stop`` of the
    new state."""
    prev = np.load(prev_path, mmap_mode="r")
    out = np.load(out_path, mmap_mode="r+")
    n = prev.shape[0]
    lo, hi = max(start - 1, 0), min(stop + 1, n)
    pads = ((lo - (start - 1), (stop + 1) - hi), (1, 1))
    window = np.pad(prev[lo:hi], pads, mode="edge")
    heat_update(out[start:stop], window, alpha)
    del prev, out


def fill_part(
    fn: BlockFn, path: str, shape: tuple[int, ...], dtype: str, start: int, stop: int, rows: int
) -> None:
    """One plain process's part of the fill limit: reserve, map and fill rows [start, stop)."""
    itemsize = np.dtype(dtype).itemsize
    row_bytes = int(np.prod(shape[1:])) * itemsize
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, start * row_bytes, (stop - start) * row_bytes)
    finally:
        os.close(fd)
    out = np.memmap(path, dtype=dtype, mode="r+", shape=shape)
    for lo in range(start, stop, rows):
        fn(out[lo : min(lo + rows, stop)], lo)
    del out


def normals_part(path: str, start: int, stop: int, seed: int, k: int) -> None:
    """One plain process of the normals' limit: map elements ``start .. stop`` of the shared
    file and draw them from a generator of its own, ``default_rng([seed, k])``."""
    part = np.memmap(path, dtype=np.float64, mode="r+", offset=start * 8, shape=(stop - start,))
    np.random.default_rng([seed, k]).standard_normal(out=part)
    del part  # unmaps; processes on one host share the page cache: no flush


def heat_part(
    initial: str, path: str, start: int, stop: int, steps: int, rows: int, alpha: float
) -> None:
    """One plain process of the heat equation's limit: step rows ``start .. stop`` of the
    state on its own, with no exchange and no barrier, and write them to the shared file.

    It steps ``steps`` more rows on each side than its own (or up to the state's edges): a
    wrong value at a cut moves one row per step, so after ``steps`` steps its own rows are
    exact, the serial loop's bits (:func:`heat_serial` on the part)."""
    u0 = np.load(initial, mmap_mode="r")
    n = u0.shape[0]
    lo, hi = max(start - steps, 0), min(stop + steps, n)
    part = heat_serial(np.array(u0[lo:hi]), steps, rows, alpha)
    out = np.load(path, mmap_mode="r+")
    out[start:stop] = part[start - lo : stop - lo]
    del out


def sum_part(path: str, partials: str, start: int, stop: int, k: int) -> None:
    """One plain process of the reduction's limit: map the ``.npy`` input, sum elements
    ``start .. stop`` in float64 and store the partial sum in slot ``k`` of ``partials``."""
    x = np.load(path, mmap_mode="r")
    out = np.load(partials, mmap_mode="r+")
    out[k] = x[start:stop].sum(dtype="float64")
    del x, out


def part_bounds(n: int, parts: int) -> list[int]:
    """Where each of ``parts`` nearly equal parts of ``n`` elements starts, and the end."""
    return [n * k // parts for k in range(parts + 1)]


def first_difference(got: np.ndarray, want: np.ndarray, offset: int = 0) -> str | None:
    """None when the two equal-sized arrays are equal, else where they first differ."""
    bad = np.flatnonzero(np.asarray(got) != np.asarray(want))
    if not bad.size:
        return None
    i = int(bad[0])
    return (
        f"{bad.size} of {want.size} values differ, first at [{offset + i}]: "
        f"{np.asarray(got)[i].item()!r}, expected {np.asarray(want)[i].item()!r}"
    )


class NpyFile:
    """A ``.npy`` file as an array-like for ``da.from_array``.

    Pickled, it is its path: each task opens the file itself (``np.load(mmap_mode="r")``) and
    reads its own rows. An ``np.memmap`` would be pickled with all its data under the processes
    scheduler, so that every task would carry the whole input image to a worker; and
    ``from_array`` copies an array that has a ``copy()`` method, an ``np.memmap`` included,
    into memory before anything else.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        image = np.load(path, mmap_mode="r")
        self.shape, self.dtype, self.ndim = image.shape, image.dtype, image.ndim

    def __getitem__(self, index: Any) -> np.ndarray:
        return np.asarray(np.load(self.path, mmap_mode="r")[index])


# -- the approaches ------------------------------------------------------------------------------


class MemmapPoolApproach(Approach):
    key = "memmap_pool"
    label = "MemmapPool"
    patterns = {
        "fill": "pool.map_chunks(kernel, shape, dtype, chunks=rows): workers write the shared "
        "output file",
        "stencil": "pool.map_chunks(kernel, shape, dtype, chunks=rows, inputs=[Halo(img, "
        f"depth={STENCIL_DEPTH}, boundary='symmetric')]): the kernel gets the chunk's rows of "
        f"the np.load(mmap_mode='r') image widened by {STENCIL_DEPTH} on every side (an int "
        "depth is every axis's, so each window reaches past the image's left and right edges "
        "and is a padded copy), blurs it, and writes chunk.interior(0) of the blur into the "
        "shared output file",
        "heat": f"pool.iterate(heat, 'initial.npy', steps, depth=1, boundary='edge', "
        f"args=({HEAT_ALPHA:g},), chunks=rows): the kernel gets the chunk's rows of the "
        "previous state widened by 1 on every side, a view of the previous buffer (the two "
        "buffers in /dev/shm alternate, each padded by a border the workers keep at the edge "
        "values), and writes its rows of the new state",
        "empty_step": "pool.submit_iterate(noop, 'initial.npy', steps) with a kernel that "
        "returns at once, auto chunks; timed: job.stats.wall_time (from the job's creation, "
        "after its two buffers are allocated, to its end) of a job of n steps minus that of a "
        "job of 1 step, / (n - 1)",
        "reduction": "pool.reduce_chunks(lambda chunk, x: x.sum(dtype='float64'), [path], "
        "np.add): auto chunks, workers map their rows of the .npy file, the parent adds the "
        "partial sums in chunk order",
        "normals": "pool.map_chunks(kernel, (n,), 'float64', args=(seed,)), the kernel "
        "out[...] = chunk.random(seed).standard_normal(): auto chunks, values that depend on "
        "the seed and each element's index only",
    }
    boundary = "symmetric"

    def pool(self, w: Workload, out_dir: str) -> contextlib.AbstractContextManager[Any]:
        from memmap_pool import MemmapPool

        return MemmapPool(self.workers, mp_context=self.start_method, temp_dir=out_dir)

    def run(self, pool: Any, w: Workload, out_dir: str) -> Output:
        result = pool.map_chunks(
            memmap_pool_kernel, w.shape, w.dtype, chunks=w.chunk_rows, args=(w.block_function,)
        )
        # The library removes the file when the result is no longer referenced.
        return Output(result)

    def run_stencil(self, pool: Any, w: Workload, out_dir: str) -> Output:
        from memmap_pool import Halo

        img = np.load(w.input, mmap_mode="r")
        result = pool.map_chunks(
            halo_kernel,
            img.shape,
            img.dtype,
            chunks=w.chunk_rows,
            inputs=[Halo(img, depth=STENCIL_DEPTH, boundary=self.boundary)],
            args=(w.stencil_function,),
        )
        return Output(result)

    def unavailable(self, w: Workload) -> str | None:
        if w.kind == "normals":
            from memmap_pool import Chunk

            if not hasattr(Chunk, "random"):
                return "waits for chunk.random: this memmap-pool's Chunk has no random() method yet"
        return None

    def run_heat(self, pool: Any, w: Workload, out_dir: str) -> Output:
        result = pool.iterate(
            heat_kernel,
            w.input,
            w.steps,
            depth=1,
            boundary="edge",
            args=(HEAT_ALPHA,),
            chunks=w.chunk_rows,
        )
        return Output(result)

    def run_empty_step(self, pool: Any, w: Workload, out_dir: str) -> Output:
        # job.stats.wall_time runs from the job's creation, after its two buffers are
        # allocated, to its end; a 1-step job's is what every job costs besides its steps.
        job = pool.submit_iterate(noop_kernel, w.input, 1)
        job.wait()
        one = job.stats.wall_time
        del job
        job = pool.submit_iterate(noop_kernel, w.input, w.steps)
        result = job.wait()
        stats = job.stats
        return Output(
            result,
            measured=(stats.wall_time - one) / (w.steps - 1),
            info={
                "chunks": stats.chunks // w.steps,
                "steps": w.steps,
                "job_1_step": one,
                "job_steps": stats.wall_time,
            },
        )

    def run_reduction(self, pool: Any, w: Workload, out_dir: str) -> Output:
        job = pool.submit_reduce(sum_partial, [w.input], np.add)
        total = job.wait()
        return Output(total, info={"chunks": job.stats.chunks})

    def run_normals(self, pool: Any, w: Workload, out_dir: str) -> Output:
        job = pool.submit_chunks(normals_kernel, w.shape, w.dtype, args=(NORMALS_SEED,))
        result = job.wait()
        return Output(result, info={"chunks": job.stats.chunks})

    def verify(self, pool: Any, w: Workload, output: Output) -> str | None:
        """The normals: the first elements again, in chunks of another size (not a divisor
        of the timed run's), must be the same values."""
        if w.kind != "normals" or pool is None:
            return None
        n = min(w.shape[0], 4 * NORMALS_PREFIX)
        rows = n // 7 + 3
        again = pool.map_chunks(normals_kernel, (n,), w.dtype, chunks=rows, args=(NORMALS_SEED,))
        problem = first_difference(again, output.array[:n])
        del again
        if problem:
            return f"not the same values in chunks of {rows} elements: {problem}"
        return None


class MemmapPoolViewApproach(MemmapPoolApproach):
    key = "memmap_pool_view"
    label = "MemmapPool, Halo(boundary='none')"
    patterns = {
        "stencil": f"as MemmapPool, with Halo(img, depth={STENCIL_DEPTH}, boundary='none'): "
        "every window is a view of the file (clipped at the image's edges, where scipy's "
        "mode='reflect' pads the true edges itself): nothing is copied"
    }
    boundary = "none"


class MemmapPoolBlocksApproach(MemmapPoolApproach):
    key = "memmap_pool_blocks"
    label = "MemmapPool.map_blocks"
    patterns = {
        "stencil": f"pool.map_blocks(blur, img, depth={STENCIL_DEPTH}, boundary='symmetric', "
        "chunks=rows): blur gets the same windows as with Halo(img, 16, 'symmetric') and "
        "returns their blur; the library trims the halo and writes the rest into the shared "
        "output file"
    }

    def run_stencil(self, pool: Any, w: Workload, out_dir: str) -> Output:
        img = np.load(w.input, mmap_mode="r")
        result = pool.map_blocks(
            w.stencil_function,
            img,
            depth=STENCIL_DEPTH,
            boundary="symmetric",
            chunks=w.chunk_rows,
        )
        return Output(result)


class MemmapPoolThreadsApproach(MemmapPoolApproach):
    key = "memmap_pool_threads"
    label = "MemmapPool, backend='threads'"
    processes = False
    # Its temporary outputs live in anonymous memory: one larger than RAM is refused
    # (NotEnoughSpaceError) before any work, so it is not run out-of-core.
    ram_only = True
    patterns = {
        kind: f"as MemmapPool, on MemmapPool(backend='threads'): {how}"
        for kind, how in {
            "fill": "threads of this process write a temporary output in anonymous memory "
            "(transparent huge pages), returned as a read-only array",
            "stencil": "the same Halo windows, read from the image's file",
            "heat": "the two state buffers are files in /dev/shm, as on processes",
            "empty_step": "the same measure",
            "reduction": "the same reduction",
            "normals": "the output in anonymous memory",
        }.items()
    }

    def pool(self, w: Workload, out_dir: str) -> contextlib.AbstractContextManager[Any]:
        from memmap_pool import MemmapPool

        return MemmapPool(self.workers, backend="threads", temp_dir=out_dir)


class SerialApproach(Approach):
    key = "serial"
    label = "serial numpy / scipy"
    processes = False
    patterns = {
        "fill": "one process, a loop over the same chunks into np.empty (np.memmap out-of-core)",
        "stencil": "one process, one call: gaussian_filter(np.load(path, mmap_mode='r'), "
        f"sigma={STENCIL_SIGMA:g}, mode={STENCIL_MODE!r}), the result in memory",
        "heat": "one process: two preallocated padded states (np.empty), swapped after each "
        "step; the border refreshed from the edge values, then the same update row block by "
        "row block (the same chunks)",
        "reduction": "one process: np.load(path, mmap_mode='r').sum()",
        "normals": "one process: np.random.default_rng(seed).standard_normal(n), the result "
        "in memory",
    }

    def run_stencil(self, pool: Any, w: Workload, out_dir: str) -> Output:
        return Output(w.stencil_function(np.load(w.input, mmap_mode="r")))

    def run_heat(self, pool: Any, w: Workload, out_dir: str) -> Output:
        return Output(heat_serial(np.load(w.input, mmap_mode="r"), w.steps, w.chunk_rows))

    def run_reduction(self, pool: Any, w: Workload, out_dir: str) -> Output:
        return Output(np.load(w.input, mmap_mode="r").sum())

    def run_normals(self, pool: Any, w: Workload, out_dir: str) -> Output:
        return Output(np.random.default_rng(NORMALS_SEED).standard_normal(w.shape[0]))

    def verify(self, pool: Any, w: Workload, output: Output) -> str | None:
        """The normals: the first values are the generator's first values."""
        if w.kind != "normals":
            return None
        n = min(w.shape[0], NORMALS_PREFIX)
        want = np.random.default_rng(NORMALS_SEED).standard_normal(n)
        return first_difference(output.array[:n], want)

    def run(self, pool: Any, w: Workload, out_dir: str) -> Output:
        fn = w.block_function
        if w.on_disk:
            path = _unique_path(out_dir, "serial")
            out: Any = np.memmap(path, dtype=w.dtype, mode="w+", shape=w.shape)

            def close() -> None:
                _unlink(path)
        else:
            out = np.empty(w.shape, dtype=w.dtype)
            close = _noop
        for start in w.starts():
            fn(out[start : start + w.chunk_rows], start)
        return Output(out, close)


class ThreadsApproach(Approach):
    key = "threads"
    label = "ThreadPoolExecutor"
    processes = False
    ram_only = True
    patterns = {
        "fill": "ThreadPoolExecutor.map over the chunks, threads write into one np.empty array"
    }

    def pool(self, w: Workload, out_dir: str) -> contextlib.AbstractContextManager[Any]:
        return ThreadPoolExecutor(self.workers)

    def run(self, pool: Any, w: Workload, out_dir: str) -> Output:
        fn, rows = w.block_function, w.chunk_rows
        out = np.empty(w.shape, dtype=w.dtype)
        for _ in pool.map(lambda s: fn(out[s : s + rows], s), w.starts()):
            pass
        return Output(out)


class ProcessReturnApproach(Approach):
    key = "ppe_return"
    label = "ProcessPoolExecutor, returning arrays"
    ram_only = True
    patterns = {
        "fill": "ProcessPoolExecutor.map(chunksize=task_batch): each task returns its chunk, "
        "the parent copies it into np.empty as results stream in"
    }

    def pool(self, w: Workload, out_dir: str) -> contextlib.AbstractContextManager[Any]:
        return self._executor()

    def run(self, pool: Any, w: Workload, out_dir: str) -> Output:
        out = np.empty(w.shape, dtype=w.dtype)
        starts = w.starts()
        blocks = pool.map(
            return_block,
            itertools.repeat(w.block_function),
            starts,
            (w.rows_at(s) for s in starts),
            itertools.repeat(w.shape[1]),
            itertools.repeat(w.dtype),
            chunksize=w.task_batch,
        )
        for start, block in zip(starts, blocks):
            out[start : start + len(block)] = block
        return Output(out)


class HandMemmapApproach(Approach):
    key = "hand_memmap"
    label = "hand-written np.memmap + ProcessPoolExecutor"
    patterns = {
        "fill": "parent creates an np.memmap file (w+); ProcessPoolExecutor.map tasks reopen "
        "it in r+ mode (only their rows) and write them"
    }

    def pool(self, w: Workload, out_dir: str) -> contextlib.AbstractContextManager[Any]:
        return self._executor()

    def run(self, pool: Any, w: Workload, out_dir: str) -> Output:
        path = _unique_path(out_dir, "hand")
        np.memmap(path, dtype=w.dtype, mode="w+", shape=w.shape)  # creates the (sparse) file
        starts = w.starts()
        for _ in pool.map(
            memmap_task,
            itertools.repeat(w.block_function),
            itertools.repeat(path),
            starts,
            (w.rows_at(s) for s in starts),
            itertools.repeat(w.shape[1]),
            itertools.repeat(w.dtype),
            chunksize=w.task_batch,
        ):
            pass
        result = np.memmap(path, dtype=w.dtype, mode="r", shape=w.shape)
        return Output(result, lambda: _unlink(path))


class SharedMemoryApproach(Approach):
    key = "shared_memory"
    label = "multiprocessing.shared_memory"
    ram_only = True
    patterns = {
        "fill": "SharedMemory(create=True) in the parent; ProcessPoolExecutor.map tasks attach "
        "by name, write their rows into an ndarray on shm.buf, close"
    }

    def prepare(self) -> None:
        # Start the resource tracker before the workers, so that they share the parent's
        # (with fork, a worker would otherwise start its own, which unlinks the block when
        # the worker exits).
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()

    def pool(self, w: Workload, out_dir: str) -> contextlib.AbstractContextManager[Any]:
        return self._executor()

    def run(self, pool: Any, w: Workload, out_dir: str) -> Output:
        from multiprocessing import shared_memory

        shm = shared_memory.SharedMemory(create=True, size=max(w.nbytes, 1))
        starts = w.starts()
        for _ in pool.map(
            shm_task,
            itertools.repeat(w.block_function),
            itertools.repeat(shm.name),
            starts,
            (w.rows_at(s) for s in starts),
            itertools.repeat(w.shape[1]),
            itertools.repeat(w.dtype),
            chunksize=w.task_batch,
        ):
            pass
        holder = {"array": np.ndarray(w.shape, dtype=w.dtype, buffer=shm.buf)}

        def close() -> None:
            holder.clear()  # the view must go before the buffer can be closed
            shm.close()
            shm.unlink()

        return Output(holder["array"], close)


@contextlib.contextmanager
def _loky_pool(workers: int, shut_down: bool) -> Iterator[None]:
    """joblib runs on loky's reusable executor: it starts on the first ``Parallel`` call and
    then stays. With ``shut_down``, stop it at exit so start-up and shutdown are both timed."""
    try:
        yield None
    finally:
        if shut_down:
            from joblib.externals.loky import get_reusable_executor

            get_reusable_executor(max_workers=workers).shutdown(wait=True)


class JoblibReturnApproach(Approach):
    key = "joblib_return"
    label = "joblib, returning arrays"
    ram_only = True
    patterns = {
        "fill": "Parallel(n_jobs=2, return_as='generator')(delayed(f)(...) for each chunk), "
        "results copied into np.empty as they stream in; loky backend, auto batching"
    }

    def prepare(self) -> None:
        _stop_loky(self.workers)

    def pool(self, w: Workload, out_dir: str) -> contextlib.AbstractContextManager[Any]:
        return _loky_pool(self.workers, w.startup)

    def run(self, pool: Any, w: Workload, out_dir: str) -> Output:
        from joblib import Parallel, delayed

        out = np.empty(w.shape, dtype=w.dtype)
        fn, cols = w.block_function, w.shape[1]
        starts = w.starts()
        blocks = Parallel(n_jobs=self.workers, return_as="generator")(
            delayed(return_block)(fn, s, w.rows_at(s), cols, w.dtype) for s in starts
        )
        for start, block in zip(starts, blocks):
            out[start : start + len(block)] = block
        return Output(out)


class JoblibMemmapApproach(Approach):
    key = "joblib_memmap"
    label = "joblib, np.memmap output"
    patterns = {
        "fill": "joblib's documented shared-output pattern: np.memmap(w+) created by the parent "
        "and passed to Parallel(n_jobs=2)(delayed(f)(out, ...) for each chunk)"
    }

    def prepare(self) -> None:
        _stop_loky(self.workers)

    def pool(self, w: Workload, out_dir: str) -> contextlib.AbstractContextManager[Any]:
        return _loky_pool(self.workers, w.startup)

    def run(self, pool: Any, w: Workload, out_dir: str) -> Output:
        from joblib import Parallel, delayed

        path = _unique_path(out_dir, "joblib")
        out = np.memmap(path, dtype=w.dtype, mode="w+", shape=w.shape)
        fn = w.block_function
        Parallel(n_jobs=self.workers)(
            delayed(memmap_arg_task)(fn, out, s, w.rows_at(s)) for s in w.starts()
        )
        return Output(out, lambda: _unlink(path))


def _stop_loky(workers: int) -> None:
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor(max_workers=workers).shutdown(wait=True)


class DaskApproach(Approach):
    key = "dask"
    label = "dask.array, processes scheduler"
    ram_only = True
    patterns = {
        "fill": "da.map_blocks over the same row chunks, .compute(scheduler='processes', "
        "num_workers=2): blocks go back to the scheduler in the parent, and the final "
        "concatenation is a task too, run in a worker",
        "stencil": "da.from_array(NpyFile(path), chunks=(rows, cols)).map_overlap(blur, "
        f"depth={STENCIL_DEPTH}, boundary='reflect').compute(scheduler='processes', "
        "num_workers=2): NpyFile (a small array-like class) pickles as its path, so each "
        "task opens the .npy file itself (an np.memmap would be pickled with all its data "
        "into every task); the result in memory",
    }

    def prepare(self) -> None:
        import dask

        # The same start method as every other process pool (dask's own default is spawn).
        dask.config.set({"multiprocessing.context": self.start_method})

    def pool(self, w: Workload, out_dir: str) -> contextlib.AbstractContextManager[Any]:
        if w.startup:
            # Let dask create and shut down its own pool inside compute(), as it does by default.
            return contextlib.nullcontext()
        return self._executor()

    def run(self, pool: Any, w: Workload, out_dir: str) -> Output:
        import dask.array as da

        chunks = (tuple(w.rows_at(s) for s in w.starts()), (w.shape[1],))
        arr = da.map_blocks(
            dask_block,
            w.block_function,
            w.dtype,
            w.shape[1],
            dtype=w.dtype,
            chunks=chunks,
            meta=np.empty((0, 0), dtype=w.dtype),
        )
        out = arr.compute(scheduler="processes", num_workers=self.workers, pool=pool)
        return Output(out)

    def run_stencil(self, pool: Any, w: Workload, out_dir: str) -> Output:
        import dask.array as da

        # The file, not an np.memmap (see NpyFile); the chunks of the other approaches.
        x = da.from_array(NpyFile(w.input), chunks=(w.chunk_rows, w.shape[1]))
        y = x.map_overlap(
            w.stencil_function, depth=STENCIL_DEPTH, boundary="reflect", dtype=w.dtype
        )
        out = y.compute(scheduler="processes", num_workers=self.workers, pool=pool)
        return Output(out)


class DaskThreadsApproach(Approach):
    key = "dask_threads"
    label = "dask.array, threaded scheduler"
    processes = False
    patterns = {
        "stencil": "da.from_array(np.load(path, mmap_mode='r'), chunks=(rows, cols))"
        f".map_overlap(blur, depth={STENCIL_DEPTH}, boundary='reflect'), then da.store(..., "
        "np.lib.format.open_memmap(out, 'w+'), scheduler='threads', num_workers=2): "
        "threads write the blocks into a .npy output file",
        "reduction": "da.from_array(NpyFile(path)).sum(dtype='float64')"
        ".compute(scheduler='threads', num_workers=2): dask's auto chunks, numpy's sum of "
        "each in a thread (it releases the GIL), partial sums added in a tree; NpyFile "
        "(see the stencil) because from_array copies an np.memmap it is given, the whole "
        "file into memory, before anything else",
    }

    def run_stencil(self, pool: Any, w: Workload, out_dir: str) -> Output:
        import dask.array as da

        x = da.from_array(np.load(w.input, mmap_mode="r"), chunks=(w.chunk_rows, w.shape[1]))
        y = x.map_overlap(
            w.stencil_function, depth=STENCIL_DEPTH, boundary="reflect", dtype=w.dtype
        )
        path = _unique_path(out_dir, "dask", ".npy")
        out = np.lib.format.open_memmap(path, mode="w+", dtype=w.dtype, shape=w.shape)
        da.store(y, out, scheduler="threads", num_workers=self.workers)
        return Output(out, lambda: _unlink(path))

    def run_reduction(self, pool: Any, w: Workload, out_dir: str) -> Output:
        import dask.array as da

        # The file, not an np.memmap: from_array copies an array it is given (x.copy()), the
        # whole input into memory; NpyFile has no copy() and gives each chunk a view of a map.
        x = da.from_array(NpyFile(w.input))
        total = x.sum(dtype="float64").compute(scheduler="threads", num_workers=self.workers)
        return Output(total, info={"chunks": x.npartitions})


class SkimageApproach(Approach):
    key = "skimage"
    label = "skimage.util.apply_parallel"
    processes = False
    patterns = {
        "stencil": "apply_parallel(blur, np.load(path, mmap_mode='r'), chunks=(rows, cols), "
        f"depth={STENCIL_DEPTH}, mode='symmetric', dtype=float32): dask's map_overlap on its "
        "threaded scheduler (2 threads, dask.config num_workers), the result in memory"
    }

    def run_stencil(self, pool: Any, w: Workload, out_dir: str) -> Output:
        import dask
        from skimage.util import apply_parallel

        img = np.load(w.input, mmap_mode="r")
        with dask.config.set(num_workers=self.workers):
            out = apply_parallel(
                w.stencil_function,
                img,
                chunks=(w.chunk_rows, w.shape[1]),
                depth=STENCIL_DEPTH,
                mode="symmetric",
                dtype=w.dtype,
            )
        return Output(out)


class HandStepsApproach(Approach):
    key = "hand_steps"
    label = "hand-written double buffer + ProcessPoolExecutor"
    patterns = {
        "heat": "two .npy buffers (np.lib.format.open_memmap, w+) in /dev/shm; each step, one "
        "ProcessPoolExecutor.submit per row block (the same chunks): the task opens both "
        "files (np.load, mmap_mode r and r+), reads its rows +-1 of the previous state, pads "
        "them with np.pad(mode='edge'), writes its rows of the other; the parent waits for "
        "every task before the next step"
    }

    def pool(self, w: Workload, out_dir: str) -> contextlib.AbstractContextManager[Any]:
        return self._executor()

    def run_heat(self, pool: Any, w: Workload, out_dir: str) -> Output:
        buffers = [_unique_path(out_dir, f"steps{k}", ".npy") for k in range(2)]
        for path in buffers:
            np.lib.format.open_memmap(path, mode="w+", dtype=w.dtype, shape=w.shape)
        prev = w.input  # step 1 reads the initial state; step k writes buffers[k % 2]
        for step in range(1, w.steps + 1):
            out = buffers[step % 2]
            futures = [
                pool.submit(heat_rows_task, prev, out, s, s + w.rows_at(s), HEAT_ALPHA)
                for s in w.starts()
            ]
            for f in futures:
                f.result()
            prev = out
        result = np.load(prev, mmap_mode="r")

        def close() -> None:
            for path in buffers:
                _unlink(path)

        return Output(result, close)


class ProcessesApproach(Approach):
    key = "processes"
    label = "plain processes, one per worker (the limit)"
    patterns = {
        "fill": "a fresh file in the temp dir; one multiprocessing.Process per worker, started, "
        "run and joined in the timed region, reserves its part (posix_fallocate), maps it "
        "(np.memmap r+) and fills it with the block function, chunk by chunk: what any "
        "process pool writing a shared file can at best do",
        "normals": "a fresh file of n float64 in /dev/shm; one multiprocessing.Process per "
        "worker, started, run and joined in the timed region, maps its part (np.memmap r+) "
        "and fills it with np.random.default_rng([seed, k]).standard_normal(out=part): what "
        "any process pool can at best do",
        "heat": "one multiprocessing.Process per worker, started, run and joined in the timed "
        "region, steps its part of the rows in private memory as the serial loop does, "
        "widened by one row per step on each side so that its own rows come out exact with "
        "no exchange and no barrier (the redundant rows cost it ~10%), then writes them to a "
        ".npy in /dev/shm: what any process pool can at best do on this memory bus",
        "reduction": "one multiprocessing.Process per worker, started, run and joined in the "
        "timed region, maps the .npy (np.load mmap_mode='r') and sums its half in float64; "
        "the parent adds the partial sums: what any process pool can at best do",
    }

    def run(self, pool: Any, w: Workload, out_dir: str) -> Output:
        rows, cols = w.shape
        itemsize = np.dtype(w.dtype).itemsize
        path = _unique_path(out_dir, "limit")
        with open(path, "wb") as f:
            f.truncate(rows * cols * itemsize)
        bounds = part_bounds(rows, self.workers)
        self._run_parts(
            fill_part,
            [
                (w.block_function, path, w.shape, w.dtype, bounds[k], bounds[k + 1], w.chunk_rows)
                for k in range(self.workers)
            ],
            path,
            "a process filling its part",
        )
        result = np.memmap(path, dtype=w.dtype, mode="r", shape=w.shape)
        return Output(result, lambda: _unlink(path))

    def run_heat(self, pool: Any, w: Workload, out_dir: str) -> Output:
        path = _unique_path(out_dir, "heat", ".npy")
        np.lib.format.open_memmap(path, mode="w+", dtype=w.dtype, shape=w.shape).flush()
        bounds = part_bounds(w.shape[0], self.workers)
        self._run_parts(
            heat_part,
            [
                (w.input, path, bounds[k], bounds[k + 1], w.steps, w.chunk_rows, HEAT_ALPHA)
                for k in range(self.workers)
            ],
            path,
            "a process stepping its part of the heat equation",
        )
        return Output(np.load(path, mmap_mode="r"), lambda: _unlink(path))

    def run_reduction(self, pool: Any, w: Workload, out_dir: str) -> Output:
        path = _unique_path(out_dir, "partials", ".npy")
        np.lib.format.open_memmap(path, mode="w+", dtype="float64", shape=(self.workers,)).flush()
        bounds = part_bounds(w.shape[0], self.workers)
        self._run_parts(
            sum_part,
            [(w.input, path, bounds[k], bounds[k + 1], k) for k in range(self.workers)],
            path,
            "a process summing its part",
        )
        total = np.load(path).sum()
        _unlink(path)
        return Output(total)

    def _run_parts(self, target: Any, args: list[tuple[Any, ...]], path: str, what: str) -> None:
        """Start one process per ``args``, wait for all; remove ``path`` if one failed."""
        import multiprocessing

        context = multiprocessing.get_context(self.start_method)
        procs = [context.Process(target=target, args=a) for a in args]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            _unlink(path)
            msg = f"{what} exited with code {failed[0]}"
            raise RuntimeError(msg)

    def run_normals(self, pool: Any, w: Workload, out_dir: str) -> Output:
        n = w.shape[0]
        path = _unique_path(out_dir, "normals")
        with open(path, "wb") as f:
            f.truncate(n * np.dtype(w.dtype).itemsize)
        bounds = part_bounds(n, self.workers)
        self._run_parts(
            normals_part,
            [(path, bounds[k], bounds[k + 1], NORMALS_SEED, k) for k in range(self.workers)],
            path,
            "a process drawing normals",
        )
        result = np.memmap(path, dtype=w.dtype, mode="r", shape=w.shape)
        return Output(result, lambda: _unlink(path))

    def verify(self, pool: Any, w: Workload, output: Output) -> str | None:
        """Each part begins with its own generator's first values (the normals)."""
        if w.kind != "normals":
            return None
        bounds = part_bounds(w.shape[0], self.workers)
        for k in range(self.workers):
            start = bounds[k]
            n = min(bounds[k + 1] - start, NORMALS_PREFIX)
            want = np.random.default_rng([NORMALS_SEED, k]).standard_normal(n)
            problem = first_difference(output.array[start : start + n], want, start)
            if problem:
                return f"part {k}: {problem}"
        return None


APPROACHES: dict[str, type[Approach]] = {
    cls.key: cls
    for cls in (
        MemmapPoolApproach,
        MemmapPoolViewApproach,
        MemmapPoolBlocksApproach,
        MemmapPoolThreadsApproach,
        SerialApproach,
        ThreadsApproach,
        ProcessReturnApproach,
        HandMemmapApproach,
        SharedMemoryApproach,
        JoblibReturnApproach,
        JoblibMemmapApproach,
        DaskThreadsApproach,
        DaskApproach,
        SkimageApproach,
        HandStepsApproach,
        ProcessesApproach,
    )
}
"""Every approach, MemmapPool first (the one the others are compared with)."""

REQUIRES: dict[str, str] = {
    "memmap_pool": "memmap_pool",
    "joblib_return": "joblib",
    "joblib_memmap": "joblib",
    "dask": "dask.array",
    "memmap_pool_view": "memmap_pool",
    "memmap_pool_blocks": "memmap_pool",
    "memmap_pool_threads": "memmap_pool",
    "dask_threads": "dask.array",
    "skimage": "skimage",
}
"""The module an approach needs; approaches whose module is missing are skipped, with the
reason, rather than failing the run."""
