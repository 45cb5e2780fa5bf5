"""``reduce_chunks``: values from every chunk of the inputs, combined in a fixed order, with no
output array; the same bits whatever the number of workers; flat parent memory."""

from __future__ import annotations

import glob
import os
import tracemalloc

import numpy as np
import pytest

from memmap_pool import Halo, MemmapPool

X = np.random.default_rng(11).standard_normal(1_500_000)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The float input as a .npy, and an integer one."""
    where = tmp_path_factory.mktemp("reduce")
    np.save(where / "x.npy", X)
    np.save(where / "i.npy", (X * 1e6).astype(np.int64))
    return where


def chunk_sum(chunk, x):
    return x.sum(dtype=np.float64)


def test_integer_sums_are_exact(fork_pool, data):
    """An integer sum equals numpy's exactly."""
    ints = np.load(data / "i.npy")
    total = fork_pool.reduce_chunks(chunk_sum, [str(data / "i.npy")], np.add)
    assert total == ints.sum()


@pytest.mark.timeout(120)
def test_float_sums_are_identical_for_1_2_and_4_workers_and_repeated_runs(data):
    """The fold's order is the chunks', so a float sum has the same bits on every run and
    every pool size; and it is close to numpy's own (another order of additions)."""
    path = str(data / "x.npy")
    sums = []
    for workers in (1, 2, 4, 2):
        with MemmapPool(workers, mp_context="fork") as pool:
            sums.append(pool.reduce_chunks(chunk_sum, [path], np.add, chunks=10_007))
    assert len({s.tobytes() for s in map(np.float64, sums)}) == 1
    assert sums[0] == pytest.approx(X.sum(), rel=1e-12)
    # The reference fold in chunk order, by hand: the very same bits.
    expected = 0.0
    for start in range(0, X.size, 10_007):
        part = X[start : start + 10_007].sum(dtype=np.float64)
        expected = part if start == 0 else expected + part
    assert np.float64(sums[0]).tobytes() == np.float64(expected).tobytes()


def test_histogram_of_a_npy(fork_pool, data):
    """Partial histograms, added: numpy's histogram of the whole."""
    bins = np.linspace(-4, 4, 33)
    hist = fork_pool.reduce_chunks(
        lambda chunk, x: np.histogram(x, bins)[0], [str(data / "x.npy")], np.add
    )
    assert np.array_equal(hist, np.histogram(X, bins)[0])


def test_combine_may_be_any_associative_function(fork_pool, data):
    """max, min and a tuple of moments, with args and kwargs for fn."""
    path = str(data / "x.npy")
    assert fork_pool.reduce_chunks(lambda c, x: x.max(), [path], max) == X.max()

    def moments(chunk, x, power, *, scale=1.0):
        return (x.size, float((x * scale) ** power @ np.ones(x.size)))

    def add_pairs(a, b):
        return (a[0] + b[0], a[1] + b[1])

    n, s2 = fork_pool.reduce_chunks(
        moments, [path], add_pairs, args=(2,), kwargs={"scale": 2.0}, chunks=100_000
    )
    assert n == X.size
    assert s2 == pytest.approx(((2 * X) ** 2).sum(), rel=1e-12)


def test_a_reduction_over_a_npy_makes_no_array_file(data, tmp_path):
    """Only the job's small bookkeeping files exist while it runs, whatever the data size."""
    temp = tmp_path / "pool-temp"
    temp.mkdir()

    def files_now(chunk, x):
        return frozenset(
            (os.path.basename(p), os.path.getsize(p))
            for p in glob.glob(str(temp / "memmap-pool-*" / "*"))
        )

    with MemmapPool(2, mp_context="fork", temp_dir=temp) as pool:
        seen = pool.reduce_chunks(files_now, [str(data / "x.npy")], frozenset.union)
    names = {name.split("-")[0] for name, _ in seen}
    assert names <= {"spec", "status", ".memmap"}, seen
    assert all(size < 64 * 1024 for _, size in seen), seen


def test_a_reduction_over_a_bare_shape_and_with_a_halo(fork_pool, data):
    """No inputs: the grid is shape=; a Halo input: each chunk sees its neighbourhood."""
    counted = fork_pool.reduce_chunks(lambda c: c.size, [], lambda a, b: a + b, shape=(10**6,))
    assert counted == 10**6
    # Differences with the next element, which lies in the next chunk at a chunk's end.

    def forward_differences(chunk, x):
        (inner,) = chunk.interior(0)
        following = x[inner.start + 1 : inner.stop + 1]  # one short at the array's end
        return (following - x[inner][: len(following)]).sum()

    diffs = fork_pool.reduce_chunks(
        forward_differences, [Halo(str(data / "x.npy"), {0: 1})], np.add, chunks=65_536
    )
    assert diffs == pytest.approx(np.diff(X).sum(), abs=1e-9)


@pytest.mark.timeout(120)
def test_100000_chunks_keep_the_parents_memory_flat(fork_pool):
    """Partials are folded as they arrive, not kept: 100,000 partials of 1 KiB each do not
    add up in the parent."""
    tracemalloc.start()
    try:
        total = fork_pool.reduce_chunks(
            lambda c: np.full(128, c.index, dtype=np.float64),
            [],
            np.add,
            shape=(100_000,),
            chunks=1,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.all(total == 100_000 * 99_999 / 2)
    assert peak < 40 * 2**20, f"the parent's Python memory peaked at {peak / 2**20:.0f} MiB"


def test_errors_of_fn_and_combine(fork_pool, data):
    """fn returning None, fn raising and combine raising: the job fails with a note."""
    path = str(data / "x.npy")
    with pytest.raises(TypeError, match=r"returned None for chunk 0"):
        fork_pool.reduce_chunks(lambda c, x: None, [path], np.add)
    with pytest.raises(ZeroDivisionError) as info:
        fork_pool.reduce_chunks(lambda c, x: 1, [path], lambda a, b: 1 / 0, chunks=1000)
    assert any("combine" in note for note in info.value.__notes__)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: p.reduce_chunks(chunk_sum, [], np.add), ValueError, "needs shape="),
        (lambda p: p.reduce_chunks(chunk_sum, [], np.add, shape=(0, 3)), ValueError, "no elements"),
        (lambda p: p.reduce_chunks(chunk_sum, [X], 42), TypeError, "combine must be callable"),
        (lambda p: p.reduce_chunks(7, [X], np.add), TypeError, "fn must be callable"),
        (lambda p: p.reduce_chunks(lambda c: 0, [X], np.add), TypeError, "can't be called"),
        (lambda p: p.reduce_chunks(chunk_sum, [X], np.add, shape=(5,)), ValueError, "shape"),
        (lambda p: p.reduce_chunks(chunk_sum, ["no.npy"], np.add), FileNotFoundError, "no such"),
    ],
)
def test_bad_calls_are_refused_before_any_work(fork_pool, call, error, match):
    """Each mistake is an error at the call."""
    with pytest.raises(error, match=match):
        call(fork_pool)


def test_submit_reduce_is_a_job_with_progress_and_stats(fork_pool, data):
    """submit_reduce returns a Job: its result is the value; progress and stats as usual;
    chunk_results() holds no partials."""
    job = fork_pool.submit_reduce(chunk_sum, [str(data / "x.npy")], np.add, chunks=150_000)
    assert job.result(timeout=60) == pytest.approx(X.sum())
    assert job.progress.done == job.progress.total == 10
    assert job.stats.chunks_done == 10
    assert job.chunk_results() == [None] * 10
