"""The approaches compared, each written the way its documentation recommends.

Each approach has two parts:

- ``pool(w, out_dir)``: a context manager that starts what the approach runs on (a process
  pool, a thread pool, nothing) and stops it at exit. For workloads with ``startup=True`` it
  is entered and left inside the timed region; otherwise it is entered once, warmed up, and
  shared by the timed runs.
- ``run(pool, w, out_dir)``: computes the whole output of ``w`` and returns an
  :class:`Output` holding it (in memory, in shared memory or in a file, as the approach
  leaves it). Cleaning up (removing files) happens after the clock stops. For a stencil
  workload, ``run_stencil(pool, w, out_dir)`` does the same from the input file ``w.input``;
  :meth:`Approach.compute` picks the one ``w`` needs.

Every approach calls the same block function (``w.block_function``) on the same chunks of
``w.chunk_rows`` rows with the same number of workers; on a stencil workload, the same stencil
function (``w.stencil_function``) on the same row chunks, each widened by the same halo of
``STENCIL_DEPTH`` rows. Task functions that run in workers are module-level so that every start
method can import them.

Not every approach runs every workload: ``fills`` and ``stencil`` say which kinds it runs. The
block fills are compared with the ways of filling an array on several cores (pools, shared
memory, joblib, dask); the stencil with the ways of running a filter over overlapping chunks
(dask's ``map_overlap``, scikit-image's ``apply_parallel``), and with MemmapPool's halo inputs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .workloads import STENCIL_DEPTH, STENCIL_MODE, STENCIL_SIGMA, Workload

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
    """A computed output and how to release it once it has been checked."""

    array: Any
    close: Callable[[], None] = _noop


class Approach:
    """Base class: see the module docstring."""

    key = ""
    label = ""
    processes = True  # runs worker processes
    ram_only = False  # holds the whole output in RAM: not run out-of-core
    fills = True  # runs the workloads that fill an output from nothing
    stencil = False  # runs the stencil workload
    pattern = ""  # one line for the report: how it is written (the fills)
    stencil_pattern = ""  # the same for the stencil

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
        return cls.stencil if w.stencil else cls.fills

    def compute(self, pool: Any, w: Workload, out_dir: str) -> Output:
        """The whole output of ``w``, whichever kind of workload it is."""
        return self.run_stencil(pool, w, out_dir) if w.stencil else self.run(pool, w, out_dir)

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


class NpyFile:
    """A ``.npy`` file as an array-like for ``da.from_array`` under the processes scheduler.

    Pickled, it is its path: each task opens the file itself (``np.load(mmap_mode="r")``) and
    reads its own rows. An ``np.memmap`` would be pickled with all its data, so that every
    task would carry the whole input image to a worker.
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
    stencil = True
    pattern = (
        "pool.map_chunks(kernel, shape, dtype, chunks=rows): workers write the shared output file"
    )
    stencil_pattern = (
        "pool.map_chunks(kernel, shape, dtype, chunks=rows, inputs=[Halo(img, "
        f"depth={STENCIL_DEPTH}, boundary='symmetric')]): the kernel gets the chunk's rows of "
        f"the np.load(mmap_mode='r') image widened by {STENCIL_DEPTH} on every side (an int "
        "depth is every axis's, so each window reaches past the image's left and right edges "
        "and is a padded copy), blurs it, and writes chunk.interior(0) of the blur into the "
        "shared output file"
    )
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


class MemmapPoolViewApproach(MemmapPoolApproach):
    key = "memmap_pool_view"
    label = "MemmapPool, Halo(boundary='none')"
    fills = False
    stencil_pattern = (
        f"as MemmapPool, with Halo(img, depth={STENCIL_DEPTH}, boundary='none'): every window "
        "is a view of the file (clipped at the image's edges, where scipy's mode='reflect' "
        "pads the true edges itself): nothing is copied"
    )
    boundary = "none"


class MemmapPoolBlocksApproach(MemmapPoolApproach):
    key = "memmap_pool_blocks"
    label = "MemmapPool.map_blocks"
    fills = False
    stencil_pattern = (
        f"pool.map_blocks(blur, img, depth={STENCIL_DEPTH}, boundary='symmetric', "
        "chunks=rows): blur gets the same windows as with Halo(img, 16, 'symmetric') and "
        "returns their blur; the library trims the halo and writes the rest into the shared "
        "output file"
    )

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


class SerialApproach(Approach):
    key = "serial"
    label = "serial numpy / scipy"
    processes = False
    stencil = True
    pattern = "one process, a loop over the same chunks into np.empty (np.memmap out-of-core)"
    stencil_pattern = (
        "one process, one call: gaussian_filter(np.load(path, mmap_mode='r'), "
        f"sigma={STENCIL_SIGMA:g}, mode={STENCIL_MODE!r}), the result in memory"
    )

    def run_stencil(self, pool: Any, w: Workload, out_dir: str) -> Output:
        return Output(w.stencil_function(np.load(w.input, mmap_mode="r")))

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
    pattern = "ThreadPoolExecutor.map over the chunks, threads write into one np.empty array"

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
    pattern = (
        "ProcessPoolExecutor.map(chunksize=task_batch): each task returns its chunk, "
        "the parent copies it into np.empty as results stream in"
    )

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
    pattern = (
        "parent creates an np.memmap file (w+); ProcessPoolExecutor.map tasks reopen it "
        "in r+ mode (only their rows) and write them"
    )

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
    pattern = (
        "SharedMemory(create=True) in the parent; ProcessPoolExecutor.map tasks attach "
        "by name, write their rows into an ndarray on shm.buf, close"
    )

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
    pattern = (
        "Parallel(n_jobs=2, return_as='generator')(delayed(f)(...) for each chunk), "
        "results copied into np.empty as they stream in; loky backend, auto batching"
    )

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
    pattern = (
        "joblib's documented shared-output pattern: np.memmap(w+) created by the parent "
        "and passed to Parallel(n_jobs=2)(delayed(f)(out, ...) for each chunk)"
    )

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
    stencil = True
    stencil_pattern = (
        "da.from_array(NpyFile(path), chunks=(rows, cols)).map_overlap(blur, "
        f"depth={STENCIL_DEPTH}, boundary='reflect').compute(scheduler='processes', "
        "num_workers=2): NpyFile (a small array-like class) pickles as its path, so each "
        "task opens the .npy file itself (an np.memmap would be pickled with all its data "
        "into every task); the result in memory"
    )
    pattern = (
        "da.map_blocks over the same row chunks, .compute(scheduler='processes', "
        "num_workers=2): blocks go back to the scheduler in the parent, and the final "
        "concatenation is a task too, run in a worker"
    )

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
    fills = False
    stencil = True
    stencil_pattern = (
        "da.from_array(np.load(path, mmap_mode='r'), chunks=(rows, cols)).map_overlap(blur, "
        f"depth={STENCIL_DEPTH}, boundary='reflect'), then da.store(..., "
        "np.lib.format.open_memmap(out, 'w+'), scheduler='threads', num_workers=2): "
        "threads write the blocks into a .npy output file"
    )

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


class SkimageApproach(Approach):
    key = "skimage"
    label = "skimage.util.apply_parallel"
    processes = False
    fills = False
    stencil = True
    stencil_pattern = (
        "apply_parallel(blur, np.load(path, mmap_mode='r'), chunks=(rows, cols), "
        f"depth={STENCIL_DEPTH}, mode='symmetric', dtype=float32): dask's map_overlap on its "
        "threaded scheduler (2 threads, dask.config num_workers), the result in memory"
    )

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


APPROACHES: dict[str, type[Approach]] = {
    cls.key: cls
    for cls in (
        MemmapPoolApproach,
        MemmapPoolViewApproach,
        MemmapPoolBlocksApproach,
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
    "dask_threads": "dask.array",
    "skimage": "skimage",
}
"""The module an approach needs; approaches whose module is missing are skipped, with the
reason, rather than failing the run."""
