"""map_chunks: results equal a serial numpy reference, chunk descriptors, kernels of every
kind, errors, worker reuse, empty shapes, and the lifetime of the returned array."""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from memmap_pool import Chunk, MemmapPool

STRUCTURED = np.dtype([("a", "<i4"), ("b", "<f8")])
DTYPES = [
    np.dtype("uint8"),
    np.dtype("int64"),
    np.dtype("float32"),
    np.dtype("complex128"),
    STRUCTURED,
]
# (shape, chunks): int rows, tuples with None for whole axes, "auto", ragged last chunks.
LAYOUTS = [
    ((1000,), 300),  # 1-d, last chunk ragged (100 rows)
    ((1000,), "auto"),
    ((37, 53), 10),  # 2-d, int rows, ragged last chunk (7 rows)
    ((37, 53), (8, 16)),  # 2-d blocks, ragged on both axes
    ((37, 53), (None, 5)),  # split the last axis only
    ((6, 7, 9), (4, 3, None)),  # 3-d blocks, ragged on two axes
    ((6, 7, 9), "auto"),
    ((3, 1000), (1, 100)),  # more chunks than rows
]


def global_index_fill(out, chunk):
    """Write each element's flat C index in the whole array (a value that depends on where the
    element is, so a chunk written to the wrong place or twice shows up)."""
    local = np.indices(chunk.region_shape)
    coords = tuple(ix + s.start for ix, s in zip(local, chunk.slices))
    flat = np.ravel_multi_index(coords, chunk.shape)
    if out.dtype.names:
        out["a"] = flat
        out["b"] = flat * 0.5
    elif out.dtype.kind == "c":
        out[...] = flat + 1j * (flat % 7)
    else:
        out[...] = flat.astype(out.dtype)  # uint8 wraps around, as numpy does serially


def serial_reference(shape, dtype, order="C"):
    expected = np.empty(shape, dtype=dtype, order=order)
    global_index_fill(expected, Chunk.covering(expected))
    return expected


def describe_chunk(out, chunk):
    """Kernel returning what a worker sees of its chunk."""
    return {
        "index": chunk.index,
        "count": chunk.count,
        "slices": chunk.slices,
        "out_shape": out.shape,
        "out_writeable": out.flags.writeable,
        "shape": chunk.shape,
        "order": chunk.order,
        "dtype": chunk.dtype,
        "path": chunk.path,
    }


def record_pid(out, chunk):
    out[...] = chunk.index
    return os.getpid()


class KernelFailure(Exception):
    """An exception type of the test's own, to check that its type survives the trip."""


def fail_on_chunk_three(out, chunk):
    if chunk.index == 3:
        raise KernelFailure(f"cannot compute chunk {chunk.index}")
    out[...] = 1


# -- the core cases, under fork, forkserver and spawn --------------------------------------------


@pytest.mark.timeout(60)
def test_results_equal_serial_reference_under_each_start_method(pool):
    """2-d blocks with ragged edges and a structured dtype match the serial result."""
    for dtype in (np.dtype("float32"), STRUCTURED):
        result = pool.map_chunks(global_index_fill, (37, 53), dtype, chunks=(8, 16))
        np.testing.assert_array_equal(result, serial_reference((37, 53), dtype))


@pytest.mark.timeout(60)
def test_lambda_and_closure_kernels_run_under_each_start_method(pool):
    """Lambdas and closures over local state are shipped to the workers and run there."""
    offset = np.arange(5, dtype="int64") * 100  # captured by the closure

    def add_offset(out, chunk):
        out[...] = offset + chunk.index

    result = pool.map_chunks(add_offset, (12, 5), "int64", chunks=3)
    np.testing.assert_array_equal(result, offset + (np.arange(12) // 3)[:, None])

    result = pool.map_chunks(lambda out, chunk: out.fill(chunk.index * 2), (10,), "int16", chunks=4)
    np.testing.assert_array_equal(result, [0, 0, 0, 0, 2, 2, 2, 2, 4, 4])


@pytest.mark.timeout(60)
def test_kernel_exception_is_reraised_with_type_traceback_and_chunk(pool):
    """A kernel error keeps its type, carries the worker traceback and names the chunk."""
    with pytest.raises(KernelFailure, match="cannot compute chunk 3") as info:
        pool.map_chunks(fail_on_chunk_three, (100, 5), "float64", chunks=10)
    exc = info.value
    assert exc.__cause__ is not None
    worker_traceback = str(exc.__cause__)
    assert "fail_on_chunk_three" in worker_traceback
    assert "Traceback" in worker_traceback
    notes = " ".join(getattr(exc, "__notes__", []))
    assert "chunk 3" in notes
    assert "[30:40, 0:5]" in notes

    # The pool is still usable, with the same kind of result as before the failure.
    result = pool.map_chunks(global_index_fill, (100, 5), "int64", chunks=10)
    np.testing.assert_array_equal(result, serial_reference((100, 5), "int64"))


@pytest.mark.timeout(60)
def test_several_jobs_reuse_the_same_worker_processes(pool):
    """Workers start once per pool: jobs after the first run in the same processes."""
    pids: set[int] = set()
    for _ in range(4):
        job = pool.submit_chunks(record_pid, (64, 8), "int32", chunks=2)
        pids.update(job.chunk_results(timeout=60))
    pids.update(pool.submit(os.getpid).result(timeout=60) for _ in range(4))
    # New workers per job would have shown at least 4 different pids.
    assert 1 <= len(pids) <= pool.max_workers == 2
    assert os.getpid() not in pids


# -- results against the serial reference (fork: the layouts are the subject here) --------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_results_equal_serial_reference_for_every_layout(fork_pool, dtype, order):
    """1-d, 2-d and 3-d shapes with int, tuple and auto chunks match numpy run serially."""
    for shape, chunks in LAYOUTS:
        result = fork_pool.map_chunks(global_index_fill, shape, dtype, chunks=chunks, order=order)
        expected = serial_reference(shape, dtype, order)
        assert result.shape == shape
        assert result.dtype == dtype
        np.testing.assert_array_equal(result, expected, err_msg=f"{shape} chunks={chunks}")
        if len(shape) > 1:
            assert result.flags[f"{order}_CONTIGUOUS"], (shape, chunks)


def test_more_chunks_than_rows_covers_every_element_once(fork_pool):
    """Shape (3, 1000) in (1, 100) blocks is 30 chunks; each writes only its own block."""
    result = fork_pool.map_chunks(
        lambda out, chunk: out.fill(chunk.index), (3, 1000), "int32", chunks=(1, 100)
    )
    expected = np.arange(30).reshape(3, 10).repeat(100, axis=1)
    np.testing.assert_array_equal(result, expected)


def test_chunk_descriptors_tile_the_array_in_index_order(fork_pool):
    """chunk.index counts 0..count-1 in C order over the grid; slices tile the whole array."""
    shape, block = (10, 7), (4, 3)
    job = fork_pool.submit_chunks(describe_chunk, shape, "float32", chunks=block, order="F")
    seen = job.chunk_results(timeout=60)
    grid = (3, 3)
    assert len(seen) == math.prod(grid)
    covered = np.zeros(shape, dtype=int)
    for i, info in enumerate(seen):
        assert info["index"] == i
        assert info["count"] == 9
        row, col = np.unravel_index(i, grid)
        assert info["slices"] == (
            slice(row * 4, min(row * 4 + 4, 10)),
            slice(col * 3, min(col * 3 + 3, 7)),
        )
        assert info["out_shape"] == tuple(s.stop - s.start for s in info["slices"])
        assert info["out_writeable"]
        assert info["shape"] == shape
        assert info["order"] == "F"
        assert info["dtype"] == np.dtype("float32")
        covered[info["slices"]] += 1
    assert (covered == 1).all()
    result = job.result()
    assert seen[0]["path"] == result.filename


def test_int_chunks_split_axis_zero_into_that_many_rows(fork_pool):
    """chunks=int gives blocks of that many rows along axis 0, the whole of the other axes."""
    job = fork_pool.submit_chunks(describe_chunk, (25, 4, 3), "int8", chunks=10)
    seen = job.chunk_results(timeout=60)
    assert [info["slices"] for info in seen] == [
        (slice(0, 10), slice(0, 4), slice(0, 3)),
        (slice(10, 20), slice(0, 4), slice(0, 3)),
        (slice(20, 25), slice(0, 4), slice(0, 3)),
    ]


def test_auto_chunks_split_a_large_array_on_page_boundaries(fork_pool):
    """ "auto" makes several chunks per worker whose byte offsets are multiples of a page."""
    shape = (1024, 1024)  # 8 MiB of float64
    job = fork_pool.submit_chunks(describe_chunk, shape, "float64")
    seen = job.chunk_results(timeout=60)
    assert len(seen) >= 2 * fork_pool.max_workers
    row_bytes = shape[1] * 8
    for info in seen:
        rows = info["slices"][0]
        assert info["slices"][1] == slice(0, 1024)
        assert (rows.start * row_bytes) % 4096 == 0
    assert sum(info["slices"][0].stop - info["slices"][0].start for info in seen) == shape[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("shape", "dtype", "inputs"),
    [
        ((3000, 700), "float32", ()),
        ((64, 2048, 3), "float64", ()),
        ((3_000_000,), "uint8", ()),
        ((2000, 512), "float32", ("halo",)),
        ((2000, 512), "float32", ("plain", "plain")),
    ],
)
def test_auto_chunks_are_the_same_for_1_2_and_8_workers(shape, dtype, inputs, tmp_path):
    """ "auto" depends on the arrays alone (shape, dtype, inputs, halos), never on the pool:
    the same regions for 1, 2 and 8 workers."""
    from memmap_pool import Halo

    arrays = []
    for k, kind in enumerate(inputs):
        path = str(tmp_path / f"in{k}.npy")
        np.save(path, np.zeros(shape, dtype))
        arrays.append(Halo(path, 40, "edge") if kind == "halo" else path)
    seen = []
    for workers in (1, 2, 8):
        with MemmapPool(workers, mp_context="fork") as pool:
            job = pool.submit_chunks(
                lambda out, chunk, *views: chunk.slices, shape, dtype, inputs=arrays
            )
            seen.append(job.chunk_results(timeout=60))
    assert seen[0] == seen[1] == seen[2]
    assert len(seen[0]) > 1
    if inputs == ("halo",):
        assert all(s[0].stop - s[0].start >= 160 for s in seen[0][:-1])  # 4 x depth rows


def test_args_and_kwargs_are_passed_after_the_input_views(fork_pool):
    """The kernel is called as fn(out, chunk, *input_views, *args, **kwargs)."""
    base = np.arange(20, dtype="float64")

    def affine(out, chunk, values, scale, *, shift=0.0):
        out[...] = values * scale + shift

    result = fork_pool.map_chunks(
        affine, (20,), inputs=[base], args=(3.0,), kwargs={"shift": -1.0}, chunks=6
    )
    np.testing.assert_array_equal(result, base * 3.0 - 1.0)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0, 2)])
def test_zero_size_shape_returns_empty_array_without_running_the_kernel(fork_pool, shape, tmp_path):
    """A shape with no elements gives an empty array of that shape; the kernel never runs."""
    marker = tmp_path / "ran"

    def touch(out, chunk):
        marker.write_text("the kernel ran")

    result = fork_pool.map_chunks(touch, shape, "float32")
    assert result.shape == shape
    assert result.dtype == np.float32
    assert result.size == 0
    assert not marker.exists()


def test_result_is_a_read_only_memmap(fork_pool):
    """The result is an np.memmap the caller cannot write by mistake."""
    result = fork_pool.map_chunks(global_index_fill, (50, 3), "int64", chunks=7)
    assert isinstance(result, np.memmap)
    assert not result.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        result[0, 0] = 1


def test_temporary_output_is_removed_after_close_and_result_stays_readable(tmp_path):
    """After shutdown no file is left in the temp dir, yet the returned array still reads."""
    pool = MemmapPool(2, mp_context="fork", temp_dir=tmp_path)
    try:
        result = pool.map_chunks(global_index_fill, (64, 32), "float64", chunks=8)
        backing = result.filename
        assert os.path.exists(backing)
        assert os.path.dirname(os.path.dirname(backing)) == str(tmp_path)
    finally:
        pool.shutdown()
    assert not os.path.exists(backing)
    assert os.listdir(tmp_path) == []
    np.testing.assert_array_equal(result, serial_reference((64, 32), "float64"))


def test_temporary_output_is_removed_when_the_result_is_dropped(fork_pool):
    """An unreferenced result frees its file without waiting for the pool to close."""
    # With the garbage collector off, only reference counting can free the result: a
    # reference cycle holding it would keep its file (maybe gigabytes of /dev/shm) alive.
    gc.disable()
    try:
        result = fork_pool.map_chunks(global_index_fill, (16, 16), "int32", chunks=4)
        backing = result.filename
        assert os.path.exists(backing)
        del result
        # The pool's dispatcher thread may still be wrapping the job up: give it time.
        deadline = time.monotonic() + 30
        while os.path.exists(backing) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not os.path.exists(backing)
    finally:
        gc.enable()


# -- kernels defined in a script's __main__ ------------------------------------------------------

MAIN_SCRIPT = textwrap.dedent(
    """
    import multiprocessing
    import sys

    import numpy as np

    from memmap_pool import MemmapPool

    SCALE = 3


    def triple_rows(out, chunk):
        rows = chunk.slices[0]
        out[...] = np.arange(rows.start, rows.stop)[:, None] * SCALE


    if __name__ == "__main__":
        method = sys.argv[1]
        with MemmapPool(2, mp_context=method) as pool:
            result = pool.map_chunks(triple_rows, (40, 6), "int64", chunks=7)
            square = pool.map_chunks(lambda out, chunk: out.fill(chunk.index ** 2), (9,),
                                     "int64", chunks=2)
            ok = (np.array_equal(result, np.arange(40)[:, None].repeat(6, axis=1) * 3)
                  and square.tolist() == [0, 0, 1, 1, 4, 4, 9, 9, 16])
        print("RESULT", "ok" if ok else "wrong", result.sum(), square.tolist())
        print("CHILDREN", len(multiprocessing.active_children()))
    """
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_kernel_defined_in_main_script_runs_under_spawn_and_forkserver(tmp_path, method):
    """A kernel defined in a script's __main__ (and a lambda there) runs in fresh workers."""
    script = tmp_path / "main_kernel.py"
    script.write_text(MAIN_SCRIPT)
    temp = tmp_path / "pool-files"
    temp.mkdir()
    env = dict(os.environ, MEMMAP_POOL_TEMP_DIR=str(temp))
    proc = subprocess.run(
        [sys.executable, str(script), method],
        capture_output=True,
        text=True,
        timeout=80,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "RESULT ok" in proc.stdout, proc.stdout + proc.stderr
    assert "CHILDREN 0" in proc.stdout
    assert os.listdir(temp) == []


@pytest.mark.timeout(90)
def test_kernel_defined_in_python_c_main_runs_under_spawn(tmp_path):
    """A kernel typed at `python -c` (a __main__ with no file, like a REPL) runs under spawn."""
    code = MAIN_SCRIPT.replace('if __name__ == "__main__":', "if True:")
    proc = subprocess.run(
        [sys.executable, "-c", code, "spawn"],
        capture_output=True,
        text=True,
        timeout=80,
        cwd=tmp_path,
        env=dict(os.environ, MEMMAP_POOL_TEMP_DIR=str(tmp_path)),
    )
    assert proc.returncode == 0, proc.stderr
    assert "RESULT ok" in proc.stdout, proc.stdout + proc.stderr
    assert "CHILDREN 0" in proc.stdout
    assert os.listdir(tmp_path) == []


def test_zero_dimensional_shape_runs_the_kernel_once_on_a_writable_view(fork_pool):
    """shape=() is one chunk holding one element, which the kernel can write."""

    def fill(out, chunk):
        assert out.shape == ()
        out[...] = 42
        return chunk.count

    job = fork_pool.submit_chunks(fill, (), "int64")
    assert job.chunk_results(timeout=60) == [1]
    result = job.result()
    assert result.shape == ()
    assert int(result) == 42


def test_int_shape_is_a_one_dimensional_shape(fork_pool):
    """shape=7 means (7,)."""
    result = fork_pool.map_chunks(global_index_fill, 7, "int32", chunks=3)
    assert result.shape == (7,)
    np.testing.assert_array_equal(result, np.arange(7))
