"""``map_blocks``: block functions that return their result, trimmed or written as is by the
worker, with halos, the ``chunk`` keyword, and the errors for results of the wrong shape."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, median_filter, sobel

from memmap_pool import Chunk, Halo, MemmapPool

IMG = np.random.default_rng(3).random((150, 131)).astype("float32")


def blur(block):
    return gaussian_filter(block, 2, mode="reflect")


@pytest.mark.parametrize("chunks", [16, (40, 50), (5, 7)])
def test_a_padded_result_is_trimmed_to_the_chunk(fork_pool, chunks):
    """A result with the padded block's shape loses its halo: equal to the filter on the
    whole array (numpy's "symmetric" is scipy's "reflect"), for chunks smaller than the
    depth too."""
    got = fork_pool.map_blocks(blur, IMG, depth=8, boundary="symmetric", chunks=chunks)
    assert np.array_equal(got, gaussian_filter(IMG, 2, mode="reflect"))
    assert got.dtype == IMG.dtype
    assert got.shape == IMG.shape


def test_a_result_of_the_region_shape_is_written_as_it_is(fork_pool):
    """A function that trims by itself (it returns the chunk's region) is not trimmed again."""

    def interior_median(block, chunk):
        return median_filter(block, size=5, mode="nearest")[chunk.interior(0)]

    got = fork_pool.map_blocks(interior_median, IMG, depth=2, boundary="edge", chunks=(30, 30))
    assert np.array_equal(got, median_filter(IMG, size=5, mode="nearest"))


def test_with_no_halo_the_block_is_the_region(fork_pool):
    """depth=0: an elementwise function, with the output dtype given."""
    got = fork_pool.map_blocks(lambda b: b > 0.5, IMG, dtype=bool, chunks=(64, 64))
    assert got.dtype == np.bool_
    assert np.array_equal(got, IMG > 0.5)


def test_a_wrong_shape_is_an_error_naming_the_chunk(fork_pool):
    """Neither the padded nor the region shape: a ValueError that says which chunk and
    which shapes would do."""
    with pytest.raises(ValueError, match=r"shape \(3,\) for chunk \d+ \[.*\].*\(52, 133\)"):
        fork_pool.map_blocks(lambda b: np.zeros(3), IMG, depth=1, boundary="edge", chunks=50)


def test_returning_none_is_an_error_that_points_to_map_chunks(fork_pool):
    """A function that returns nothing would leave zeros: refused, with the reason."""
    with pytest.raises(ValueError, match=r"returned None.*map_chunks"):
        fork_pool.map_blocks(lambda b: None, IMG, chunks=50)


def test_a_result_of_another_kind_asks_for_dtype(fork_pool):
    """Floats into an integer output are refused rather than truncated."""
    ints = (IMG * 100).astype("int32")
    with pytest.raises(TypeError, match="pass dtype='float64'"):
        fork_pool.map_blocks(lambda b: b * 0.5, ints, chunks=50)
    halves = fork_pool.map_blocks(lambda b: b * 0.5, ints, dtype="float64", chunks=50)
    assert np.array_equal(halves, ints * 0.5)


def test_several_arrays_each_with_its_own_halo(fork_pool):
    """An array wrapped in Halo keeps its own depth; depth= applies to the others; args and
    kwargs reach the function."""
    other = np.random.default_rng(4).random(IMG.shape).astype("float32")

    def combine(a, b, scale, offset=0.0):
        # a has depth 2 (edge), b depth 1 (wrap): trim both to the region by hand.
        return sobel(a, mode="nearest")[2:-2, 2:-2] * scale + b[1:-1, 1:-1] + offset

    got = fork_pool.map_blocks(
        combine,
        IMG,
        Halo(other, 1, "wrap"),
        depth=2,
        boundary="edge",
        chunks=(25, 131),
        args=(2.0,),
        kwargs={"offset": 1.0},
    )
    expected = sobel(IMG, mode="nearest") * 2.0 + other + 1.0
    assert np.array_equal(got, expected)


def test_the_chunk_keyword_gives_the_chunk(fork_pool):
    """A function with a parameter named chunk receives the Chunk, as dask's block_info."""

    def where(block, chunk):
        assert isinstance(chunk, Chunk)
        return np.full(block.shape, chunk.index, dtype="int32")

    got = fork_pool.map_blocks(where, IMG, dtype="int32", chunks=(50, 131))
    assert np.array_equal(got[:, 0], np.arange(150) // 50)


def test_npy_paths_and_an_npy_out(fork_pool, tmp_path):
    """Arrays given by path, the result written to a .npy."""
    path = str(tmp_path / "img.npy")
    np.save(path, IMG)
    out = str(tmp_path / "blurred.npy")
    got = fork_pool.map_blocks(blur, path, depth=8, boundary="symmetric", out=out)
    assert os.path.samefile(got.filename, out)
    assert np.array_equal(np.load(out), gaussian_filter(IMG, 2, mode="reflect"))


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_lambdas_and_closures_run_under_every_start_method(start_method):
    """The function is sent by value: lambdas and closures work without fork."""
    sigma = 1.5
    with MemmapPool(2, mp_context=start_method) as pool:
        got = pool.map_blocks(
            lambda b: gaussian_filter(b, sigma, mode="wrap"), IMG, depth=6, boundary="wrap"
        )
    assert np.array_equal(got, gaussian_filter(IMG, sigma, mode="wrap"))


def test_submit_blocks_returns_a_job(fork_pool):
    """submit_blocks is map_blocks as a Job."""
    job = fork_pool.submit_blocks(blur, IMG, depth=8, boundary="symmetric", chunks=40)
    assert np.array_equal(job.result(timeout=60), gaussian_filter(IMG, 2, mode="reflect"))
    assert job.stats.chunks == 4


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: p.map_blocks(blur), TypeError, "at least one array"),
        (lambda p: p.map_blocks(3, IMG), TypeError, "fn must be callable"),
        (lambda p: p.map_blocks(blur, [1, 2, 3]), TypeError, "numpy arrays, np.memmaps"),
        (lambda p: p.map_blocks(blur, IMG, depth=-1), ValueError, r"depth must be .* \(got -1\)"),
        (lambda p: p.map_blocks(blur, IMG, depth=1, boundary="mirror"), ValueError, "'mirror'"),
        (lambda p: p.map_blocks(blur, IMG, depth=(1, 2, 3)), ValueError, "has 3 entries"),
        (lambda p: p.map_blocks(lambda a, b: a, IMG), TypeError, "can't be called"),
        (lambda p: p.map_blocks(blur, IMG, args=5), TypeError, "args must be a tuple"),
    ],
)
def test_bad_calls_are_refused_before_any_work(fork_pool, call, error, match):
    """Each mistake is an error at the call, naming what is wrong."""
    with pytest.raises(error, match=match):
        call(fork_pool)
