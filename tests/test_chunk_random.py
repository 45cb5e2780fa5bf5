"""``chunk.random(seed)`` end to end: the same array for any chunking, any number of workers
and any start method, with the distribution it claims."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from memmap_pool import Chunk, MemmapPool

SHAPE = (240, 170)


def normals(out, chunk, seed):
    out[...] = chunk.random(seed).standard_normal()


def two_streams(outs, chunk, seed):
    rng = chunk.random(seed)
    outs[0][...] = rng.random()
    outs[1][...] = rng.integers(0, 10, dtype=np.int16)


@pytest.fixture(scope="module")
def reference():
    """The array in one chunk, in this process: what every job must give."""
    out = np.empty(SHAPE)
    normals(out, Chunk.covering(out), 2024)
    return out


@pytest.mark.parametrize("chunks", [1, 17, (50, 33), (7, 170), SHAPE, "auto"])
def test_the_same_array_for_every_chunking(fork_pool, reference, chunks):
    """Rows, n-d blocks with ragged edges, one chunk, auto: the same values."""
    got = fork_pool.map_chunks(normals, SHAPE, chunks=chunks, args=(2024,))
    assert np.array_equal(got, reference)


@pytest.mark.parametrize(
    ("workers", "start_method"), [(1, "fork"), (3, "spawn"), (2, "forkserver")]
)
def test_the_same_array_for_every_pool(reference, workers, start_method):
    """Worker counts and start methods don't change it."""
    with MemmapPool(workers, mp_context=start_method) as pool:
        got = pool.map_chunks(normals, SHAPE, chunks=(31, 40), args=(2024,))
    assert np.array_equal(got, reference)


def test_the_key_is_the_flat_index_not_the_shape(fork_pool, reference):
    """A 1-d array of the same size holds the same values in C order."""
    flat = fork_pool.map_chunks(normals, (reference.size,), chunks=999, args=(2024,))
    assert np.array_equal(flat, reference.ravel())


def test_successive_calls_are_separate_streams(fork_pool):
    """The second call of one object differs from the first; each call is reproducible."""
    u, k = fork_pool.map_chunks(
        two_streams, SHAPE, outputs=[_out("f8"), _out("i2")], chunks=40, args=(5,)
    )
    u_again, _ = fork_pool.map_chunks(
        two_streams, SHAPE, outputs=[_out("f8"), _out("i2")], chunks=(60, 17), args=(5,)
    )
    assert np.array_equal(u, u_again)
    first_stream_ints = np.floor(np.asarray(u) * 10)
    assert not np.array_equal(first_stream_ints, k)  # not the first stream's values again
    assert set(np.unique(k)) == set(range(10))


def _out(dtype):
    from memmap_pool import Output

    return Output(dtype)


def test_different_seeds_differ(fork_pool, reference):
    other = fork_pool.map_chunks(normals, SHAPE, chunks=40, args=(2025,))
    assert not np.array_equal(other, reference)
    assert abs(np.corrcoef(other.ravel(), reference.ravel())[0, 1]) < 0.02


def test_the_distribution_is_what_the_method_says(fork_pool):
    """1 M normals from many chunks: moments and a Kolmogorov-Smirnov test (fixed seed)."""
    x = np.asarray(fork_pool.map_chunks(normals, (1_000_000,), chunks=30_000, args=(77,)))
    assert abs(x.mean()) < 5 / np.sqrt(x.size)
    assert abs(x.std() - 1) < 5 / np.sqrt(2 * x.size)
    assert stats.kstest(x, "norm").pvalue > 1e-3


def test_reduce_with_random_numbers_is_reproducible(fork_pool):
    """A Monte Carlo estimate of pi through reduce_chunks: the same for any worker count."""

    def hits(chunk):
        xy = chunk.random(9).random()
        return int(np.count_nonzero(xy[:, 0] ** 2 + xy[:, 1] ** 2 < 1))

    one = fork_pool.reduce_chunks(hits, [], np.add, shape=(200_000, 2), chunks=(10_000, 2))
    with MemmapPool(3, mp_context="fork") as pool:
        three = pool.reduce_chunks(hits, [], np.add, shape=(200_000, 2), chunks=(10_000, 2))
    assert one == three
    assert 4 * one / 200_000 == pytest.approx(np.pi, abs=0.02)
