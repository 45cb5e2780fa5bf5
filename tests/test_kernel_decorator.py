"""@kernel: defaults that map_chunks uses unless the call overrides them, and kernels called
directly on ordinary arrays, without a pool."""

from __future__ import annotations

import numpy as np
import pytest

from memmap_pool import Chunk, Kernel, kernel


@kernel
def row_numbers(out, chunk):
    """Each row holds its global row number."""
    rows = chunk.slices[0]
    out[...] = np.arange(rows.start, rows.stop).reshape((-1,) + (1,) * (out.ndim - 1))


@kernel(dtype="int16", chunks=4, order="F")
def chunk_numbers(out, chunk):
    out[...] = chunk.index
    return chunk.count, out.dtype.str, out.flags.f_contiguous or out.ndim < 2


@kernel(dtype="float32")
def scaled(out, chunk, values, factor=1.0):
    out[...] = values * factor


def test_bare_decorator_keeps_the_function_and_the_library_defaults(fork_pool):
    """@kernel without arguments gives a Kernel with no defaults: float64, C, "auto"."""
    assert isinstance(row_numbers, Kernel)
    assert row_numbers.__name__ == "row_numbers"
    assert row_numbers.__doc__ == "Each row holds its global row number."
    assert (row_numbers.dtype, row_numbers.chunks, row_numbers.order) == (None, None, None)
    result = fork_pool.map_chunks(row_numbers, (9, 3))
    assert result.dtype == np.float64
    assert result.flags.c_contiguous
    np.testing.assert_array_equal(result, np.arange(9)[:, None].repeat(3, axis=1))


def test_decorator_defaults_are_used_when_the_call_gives_none(fork_pool):
    """dtype, chunks and order given to @kernel(...) shape the job when map_chunks omits them."""
    job = fork_pool.submit_chunks(chunk_numbers, (10, 3))
    seen = job.chunk_results(timeout=60)
    result = job.result()
    assert result.dtype == np.int16
    assert result.flags.f_contiguous
    assert not result.flags.c_contiguous
    assert len(seen) == 3  # 10 rows in chunks of 4
    assert {count for count, _, _ in seen} == {3}
    assert {dtype for _, dtype, _ in seen} == {"<i2"}
    np.testing.assert_array_equal(result[:, 0], [0, 0, 0, 0, 1, 1, 1, 1, 2, 2])


def test_call_arguments_override_the_decorator_defaults(fork_pool):
    """dtype=, chunks= and order= given to map_chunks win over the kernel's own."""
    job = fork_pool.submit_chunks(chunk_numbers, (10, 3), "uint32", chunks=5, order="C")
    seen = job.chunk_results(timeout=60)
    result = job.result()
    assert result.dtype == np.uint32
    assert result.flags.c_contiguous
    assert len(seen) == 2
    np.testing.assert_array_equal(result[:, 2], [0] * 5 + [1] * 5)


def test_decorated_kernel_with_inputs_and_kwargs_runs_on_the_pool(fork_pool):
    """A decorated kernel takes input views and keyword arguments as any kernel does."""
    values = np.arange(12, dtype="float64").reshape(4, 3)
    result = fork_pool.map_chunks(scaled, (4, 3), inputs=[values], kwargs={"factor": 0.5}, chunks=1)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, values * 0.5)


def test_decorated_kernel_called_directly_without_a_chunk_covers_the_array():
    """Called on a plain ndarray with no chunk, a kernel sees the whole array as one chunk."""
    out = np.zeros((5, 2), dtype="int16")
    count, dtype, _ = chunk_numbers(out)
    assert count == 1
    assert dtype == "<i2"
    assert (out == 0).all()  # chunk 0 of 1
    rows = np.full((4, 3), -1.0)
    row_numbers(rows)
    np.testing.assert_array_equal(rows, np.arange(4)[:, None].repeat(3, axis=1))


def test_decorated_kernel_called_directly_with_a_chunk_and_inputs():
    """Called with Chunk.covering(out), inputs and kwargs, a kernel runs as in a worker."""
    out = np.empty(6, dtype="float32")
    chunk = Chunk.covering(out)
    assert chunk.slices == (slice(0, 6),)
    assert (chunk.index, chunk.count, chunk.shape) == (0, 1, (6,))
    scaled(out, chunk, np.arange(6.0), factor=2.0)
    np.testing.assert_array_equal(out, np.arange(6.0) * 2)


def test_chunk_covering_describes_a_fortran_array():
    """Chunk.covering records the layout of the array it covers."""
    array = np.zeros((3, 4), order="F")
    chunk = Chunk.covering(array)
    assert chunk.order == "F"
    assert chunk.region_shape == (3, 4)
    assert chunk.size == 12
    assert chunk.nbytes == 96


def test_decorator_rejects_bad_defaults_when_applied():
    """A bad dtype or order in @kernel(...) fails at decoration, naming the value."""
    with pytest.raises(TypeError, match="object"):
        kernel(dtype=object)(lambda out, chunk: None)
    with pytest.raises(ValueError, match="'Z'"):
        kernel(order="Z")(lambda out, chunk: None)
    with pytest.raises(TypeError, match="42"):
        kernel(42)


def test_decorator_chunks_that_do_not_fit_the_call_are_refused(fork_pool):
    """A kernel's default chunks are validated against each call's shape."""
    with pytest.raises(ValueError, match="chunks=4"):
        fork_pool.map_chunks(chunk_numbers, (3, 2))
