"""ChunkRandom: values that depend only on the seed and the flat index, whatever the chunking;
equal to numpy's Generator over Philox block by block; streams; statistics; errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from memmap_pool._random import BLOCK_SIZE, ChunkRandom, _runs

B = BLOCK_SIZE

Draw = Callable[[ChunkRandom], np.ndarray]
NumpyDraw = Callable[[np.random.Generator, int], np.ndarray]

METHODS: dict[str, tuple[Draw, NumpyDraw]] = {
    "random": (lambda r: r.random(), lambda g, n: g.random(n)),
    "random-float32": (lambda r: r.random(np.float32), lambda g, n: g.random(n, np.float32)),
    "uniform": (lambda r: r.uniform(-2.0, 3.5), lambda g, n: g.uniform(-2.0, 3.5, n)),
    "standard_normal": (lambda r: r.standard_normal(), lambda g, n: g.standard_normal(n)),
    "standard_normal-float32": (
        lambda r: r.standard_normal(np.float32),
        lambda g, n: g.standard_normal(n, np.float32),
    ),
    "normal": (lambda r: r.normal(10.0, 0.5), lambda g, n: g.normal(10.0, 0.5, n)),
    "integers": (lambda r: r.integers(1000), lambda g, n: g.integers(1000, size=n)),
    "integers-int8": (
        lambda r: r.integers(-5, 100, dtype=np.int8),
        lambda g, n: g.integers(-5, 100, size=n, dtype=np.int8),
    ),
    "integers-uint32": (
        lambda r: r.integers(3, 2**32 - 7, dtype=np.uint32),
        lambda g, n: g.integers(3, 2**32 - 7, size=n, dtype=np.uint32),
    ),
}
METHOD_NAMES = sorted(METHODS)

SETTINGS = settings(max_examples=25, deadline=None, database=None)


def whole(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def reference(seed: Any, size: int, stream: int, draw: NumpyDraw) -> np.ndarray:
    """The definition, written out: block b of stream s is a fresh numpy Generator over
    Philox(key, counter=[0, 0, b, s])."""
    key = np.random.SeedSequence(seed).generate_state(2, np.uint64)
    parts = [
        draw(np.random.Generator(np.random.Philox(key=key, counter=[0, 0, b, stream])), n)
        for b, n in ((b, min(B, size - b * B)) for b in range(math.ceil(size / B)))
    ]
    return np.concatenate(parts) if parts else draw(np.random.Generator(np.random.Philox(0)), 0)


def assemble(
    seed: Any, shape: tuple[int, ...], chunks: list[tuple[slice, ...]], draw: Draw, stream: int = 0
) -> np.ndarray:
    """The whole array drawn chunk by chunk, each chunk by its own object, as workers would."""
    out = None
    for region in chunks:
        rng = ChunkRandom(seed, shape, region)
        for _ in range(stream):
            draw(rng)
        values = draw(rng)
        if out is None:
            out = np.full(shape, 0, values.dtype)
        out[region] = values
    assert out is not None
    return out


def grid(shape: tuple[int, ...], block: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """The regular grid of blocks of a chunk plan, ragged at the far edges."""
    axes = [
        [slice(i, min(i + b, n)) for i in range(0, n, b)] for n, b in zip(shape, block, strict=True)
    ]
    regions: list[tuple[slice, ...]] = [()]
    for axis in axes:
        regions = [(*r, s) for r in regions for s in axis]
    return regions


# --- the definition ---------------------------------------------------------------------


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("stream", [0, 1])
def test_values_are_numpys_generator_over_philox_block_by_block(name: str, stream: int) -> None:
    """3.5 blocks drawn whole equal the per-block numpy draws, for the first two streams."""
    draw, numpy_draw = METHODS[name]
    size = 3 * B + B // 2
    rng = ChunkRandom(11, (size,), (slice(0, size),))
    for _ in range(stream):
        draw(rng)
    np.testing.assert_array_equal(draw(rng), reference(11, size, stream, numpy_draw))


def test_the_first_block_is_what_numpys_philox_of_the_seed_draws_first() -> None:
    """Block 0 of stream 0 uses Philox(seed)'s own key and counter."""
    rng = ChunkRandom(2024, (B,), (slice(0, B),))
    expected = np.random.Generator(np.random.Philox(2024)).standard_normal(B)
    np.testing.assert_array_equal(rng.standard_normal(), expected)


def test_the_values_stay_those_once_released() -> None:
    """Values are a contract: these catch a change of the block size, the keying or the
    counter layout. Uniform floats only, whose transform (53 bits of a raw word) numpy keeps."""
    rng = ChunkRandom(0, (20_000,), (slice(0, 20_000),))
    first, second = rng.random(), rng.random()
    pinned = {0: "0x1.ccf2d9115c140p-7", 4095: "0x1.317df55a4c5fap-2", 4096: "0x1.8ec6d88aafae0p-6"}
    pinned[12345] = "0x1.80f571ada4f7ep-1"
    assert {i: float(first[i]).hex() for i in pinned} == pinned
    assert float(second[4096]).hex() == "0x1.bdd0326977ed8p-2"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_method_returns_the_region_shape_and_its_dtype(name: str) -> None:
    draw, numpy_draw = METHODS[name]
    values = draw(ChunkRandom(0, (9, 8, 7), (slice(2, 5), slice(0, 8), slice(1, 6))))
    assert values.shape == (3, 8, 5)
    assert values.dtype == numpy_draw(np.random.default_rng(0), 1).dtype


# --- independence from the chunking -------------------------------------------------------


CHUNKINGS = {
    "rows of 7": ((50, 33), (7, 33)),
    "7x5 blocks": ((50, 33), (7, 5)),
    "7x5 blocks over several blocks": ((130, 97), (7, 5)),
    "rows over several blocks": ((130, 97), (11, 97)),
    "3-d blocks": ((13, 17, 40), (4, 5, 9)),
    "one element each": ((6, 7), (1, 1)),
}


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
def test_the_whole_array_is_the_same_for_any_chunking(name: str, chunking: str) -> None:
    """Rows, n-d blocks with ragged edges and single elements all give the one-chunk array."""
    draw, _ = METHODS[name]
    shape, block = CHUNKINGS[chunking]
    one_chunk = draw(ChunkRandom(5, shape, whole(shape)))
    np.testing.assert_array_equal(assemble(5, shape, grid(shape, block), draw), one_chunk)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_the_values_depend_on_the_flat_index_not_the_shape(name: str) -> None:
    """A (10, 10) and a (100,) array hold the same values, and so do (64, 3, 50) and (9600,)."""
    draw, _ = METHODS[name]
    for shape, flat in (((10, 10), (100,)), ((64, 3, 50), (9600,))):
        nd = draw(ChunkRandom(3, shape, whole(shape)))
        np.testing.assert_array_equal(nd.ravel(), draw(ChunkRandom(3, flat, whole(flat))))


@st.composite
def arrays_and_chunkings(draw: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """0 to 3 axes up to ~3 blocks of elements, and a block shape for a chunk grid."""
    ndim = draw(st.integers(0, 3))
    shape: list[int] = []
    budget = 3 * B
    for _ in range(ndim):
        n = draw(st.integers(1, max(1, min(budget, 3 * B if ndim == 1 else 200))))
        shape.append(n)
        budget = max(1, budget // n)
    block = tuple(draw(st.integers(1, n)) for n in shape)
    # keep the number of chunks (objects built) small
    chunks = math.prod(math.ceil(n / b) for n, b in zip(shape, block))
    if chunks > 64:
        block = tuple(max(b, math.ceil(n / 4)) for n, b in zip(shape, block))
    return tuple(shape), block


@SETTINGS
@given(
    case=arrays_and_chunkings(),
    name=st.sampled_from(METHOD_NAMES),
    seed=st.integers(0, 2**64),
    stream=st.integers(0, 2),
)
def test_any_chunking_of_any_shape_gives_the_definition(
    case: tuple[tuple[int, ...], tuple[int, ...]], name: str, seed: int, stream: int
) -> None:
    shape, block = case
    draw, numpy_draw = METHODS[name]
    got = assemble(seed, shape, grid(shape, block), draw, stream)
    expected = reference(seed, math.prod(shape), stream, numpy_draw)
    np.testing.assert_array_equal(got.ravel(), expected)


# --- block boundaries --------------------------------------------------------------------

RUNS = {
    "starts mid-block, ends in the next": (B // 2, B + 17),
    "inside one block": (100, 900),
    "spans several blocks": (B - 3, 4 * B + 5),
    "ends on a block boundary": (B // 3, 2 * B),
    "one whole block": (B, 2 * B),
    "last element of a block": (B - 1, B),
    "first element of a block": (B, B + 1),
    "odd start (float32 half word)": (2 * B + 1, 2 * B + 10),
}


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_run_anywhere_relative_to_the_blocks_gives_the_definition(name: str, run: str) -> None:
    draw, numpy_draw = METHODS[name]
    start, stop = RUNS[run]
    size = 5 * B
    got = draw(ChunkRandom(8, (size,), (slice(start, stop),)))
    np.testing.assert_array_equal(got, reference(8, size, 0, numpy_draw)[start:stop])


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_runs_of_one_chunk_that_share_a_block_give_the_definition(name: str) -> None:
    """Short rows: several runs of the chunk fall in one block, some cross into the next."""
    draw, numpy_draw = METHODS[name]
    shape = (40, 300)
    region = (slice(3, 37), slice(250, 290))
    got = draw(ChunkRandom(8, shape, region))
    expected = reference(8, math.prod(shape), 0, numpy_draw).reshape(shape)[region]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("shape", "bounds", "starts", "length"),
    [
        ((100, 30), ((10, 20), (0, 30)), [300], 300),  # whole rows: one run
        ((4, 5, 6), ((1, 3), (0, 5), (0, 6)), [30], 60),
        ((4, 5, 6), ((1, 3), (2, 4), (0, 6)), [42, 72], 12),
        ((4, 5, 6), ((1, 2), (2, 3), (1, 4)), [43], 3),
        ((10, 10), ((0, 10), (0, 10)), [0], 100),
        ((), (), [0], 1),
    ],
)
def test_a_region_is_cut_into_the_fewest_runs(
    shape: tuple[int, ...], bounds: Any, starts: list[int], length: int
) -> None:
    """Trailing axes the region spans whole merge into longer runs: a row chunk is one run."""
    got_starts, got_length = _runs(shape, bounds)
    assert got_starts.tolist() == starts
    assert got_length == length


def test_an_empty_region_and_a_0d_array() -> None:
    assert ChunkRandom(1, (4, 5), (slice(2, 2), slice(0, 5))).standard_normal().shape == (0, 5)
    assert ChunkRandom(1, (0,), (slice(0, 0),)).integers(3).shape == (0,)
    scalar = ChunkRandom(1, (), ()).random()
    assert scalar.shape == ()
    assert scalar[()] == np.random.Generator(np.random.Philox(1)).random()


# --- streams and seeds -------------------------------------------------------------------


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_a_second_call_differs_and_a_new_object_repeats_the_first(name: str) -> None:
    draw, _ = METHODS[name]
    shape, region = (300, 40), (slice(10, 200), slice(5, 30))
    rng = ChunkRandom(4, shape, region)
    first, second = draw(rng), draw(rng)
    assert np.mean(first == second) < 0.05
    np.testing.assert_array_equal(draw(ChunkRandom(4, shape, region)), first)


def test_the_stream_counts_draws_of_every_method() -> None:
    """A normal drawn after a uniform is stream 1: not the first normal of a new object."""
    rng = ChunkRandom(4, (1000,), (slice(0, 1000),))
    rng.random()
    second = rng.standard_normal()
    assert not np.array_equal(second, ChunkRandom(4, (1000,), (slice(0, 1000),)).standard_normal())
    np.testing.assert_array_equal(second, reference(4, 1000, 1, METHODS["standard_normal"][1]))


def test_a_call_that_raises_uses_no_stream() -> None:
    rng = ChunkRandom(4, (100,), (slice(0, 100),))
    with pytest.raises(ValueError, match="scale"):
        rng.normal(0.0, -1.0)
    np.testing.assert_array_equal(rng.normal(), ChunkRandom(4, (100,), (slice(0, 100),)).normal())


def test_different_seeds_differ_and_an_int_is_the_sequence_of_it() -> None:
    region = (slice(0, 5000),)
    values = {seed: ChunkRandom(seed, (5000,), region).random() for seed in (0, 1, 2**40)}
    assert not np.array_equal(values[0], values[1])
    assert not np.array_equal(values[1], values[2**40])
    np.testing.assert_array_equal(ChunkRandom([1], (5000,), region).random(), values[1])
    assert not np.array_equal(ChunkRandom([1, 2], (5000,), region).random(), values[1])
    assert (
        ChunkRandom(np.uint64(7), (10,), (slice(0, 10),)).random()[0]
        == (ChunkRandom(7, (10,), (slice(0, 10),)).random()[0])
    )


# --- statistics --------------------------------------------------------------------------
# Assembled from many chunks with a fixed seed: deterministic, and the assertions hold with
# a wide margin for that seed (p > 1e-3, moments within 5 standard errors).

STATS_SHAPE = (500, 1000)
STATS_CHUNKS = grid(STATS_SHAPE, (64, 300))


def many_chunks(draw: Draw) -> np.ndarray:
    return assemble(20240601, STATS_SHAPE, STATS_CHUNKS, draw).ravel().astype(np.float64)


def assert_moments(x: np.ndarray, mean: float, var: float, skew: float, kurt: float) -> None:
    """Moments within 5 standard errors. The variance's is var * sqrt((kurt + 2) / n); for
    skewness and excess kurtosis, the normal's sqrt(6 / n) and sqrt(24 / n) are used, which
    are larger than the uniform's."""
    n = x.size
    assert abs(x.mean() - mean) < 5 * math.sqrt(var / n)
    assert abs(x.var() - var) < 5 * var * math.sqrt((kurt + 2) / n)
    assert abs(stats.skew(x) - skew) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(x) - kurt) < 5 * math.sqrt(24 / n)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_random_is_uniform_on_0_1(dtype: Any) -> None:
    x = many_chunks(lambda r: r.random(dtype))
    assert x.min() >= 0.0
    assert x.max() < 1.0
    assert_moments(x, 0.5, 1 / 12, 0.0, -1.2)
    assert stats.kstest(x, "uniform").pvalue > 1e-3


def test_uniform_is_uniform_on_low_high() -> None:
    x = many_chunks(lambda r: r.uniform(-3.0, 5.0))
    assert x.min() >= -3.0
    assert x.max() < 5.0
    assert_moments(x, 1.0, 64 / 12, 0.0, -1.2)
    assert stats.kstest(x, "uniform", args=(-3.0, 8.0)).pvalue > 1e-3


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_standard_normal_is_normal(dtype: Any) -> None:
    x = many_chunks(lambda r: r.standard_normal(dtype))
    assert_moments(x, 0.0, 1.0, 0.0, 0.0)
    assert stats.kstest(x, "norm").pvalue > 1e-3


def test_normal_has_its_loc_and_scale() -> None:
    x = many_chunks(lambda r: r.normal(-7.0, 3.0))
    assert_moments(x, -7.0, 9.0, 0.0, 0.0)
    assert stats.kstest(x, "norm", args=(-7.0, 3.0)).pvalue > 1e-3


@pytest.mark.parametrize(
    ("low", "high", "dtype"),
    [(0, 10, np.int64), (-20, 17, np.int64), (0, 256, np.uint8), (-128, 0, np.int8)],
)
def test_integers_are_uniform_over_low_to_high_excluded(low: int, high: int, dtype: Any) -> None:
    x = assemble(99, STATS_SHAPE, STATS_CHUNKS, lambda r: r.integers(low, high, dtype))
    assert x.dtype == dtype
    counts = np.bincount((x.astype(np.int64) - low).ravel(), minlength=high - low)
    assert counts.size == high - low  # nothing at high or above
    assert x.min() == low  # every value is hit, low included
    assert counts.min() > 0
    assert stats.chisquare(counts).pvalue > 1e-3


def test_integers_with_one_bound_start_at_zero() -> None:
    x = ChunkRandom(1, (10_000,), (slice(0, 10_000),)).integers(5)
    assert set(np.unique(x).tolist()) == {0, 1, 2, 3, 4}


def test_integers_that_fill_the_dtype() -> None:
    x = ChunkRandom(1, (10_000,), (slice(0, 10_000),)).integers(0, 2**64, np.uint64)
    assert x.dtype == np.uint64
    assert x.max() > 2**63  # the upper half is reached


# --- errors ------------------------------------------------------------------------------

REGION = ((10,), (slice(0, 10),))


@pytest.mark.parametrize(
    ("seed", "error"),
    [
        (-1, ValueError),
        ([1, -2], ValueError),
        ([], ValueError),
        (1.5, TypeError),
        ("7", TypeError),
        (None, TypeError),
        (True, TypeError),
        ([1, 2.0], TypeError),
        (np.array([1, 2]), TypeError),
    ],
)
def test_a_bad_seed_is_refused_naming_it(seed: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"seed must be a non-negative int"):
        ChunkRandom(seed, *REGION)


@pytest.mark.parametrize(
    ("shape", "slices", "error"),
    [
        ((10,), (slice(0, 11),), ValueError),
        ((10,), (slice(5, 3),), ValueError),
        ((10,), (slice(0, 10, 2),), ValueError),
        ((10,), (slice(-1, 10),), ValueError),
        ((10, 3), (slice(0, 10),), ValueError),
        ((10,), (slice(None, 10),), TypeError),
        ((10,), slice(0, 10), TypeError),
        ((-1,), (slice(0, 0),), ValueError),
        ((2.0,), (slice(0, 2),), TypeError),
        (10, (slice(0, 10),), TypeError),
    ],
)
def test_a_bad_shape_or_region_is_refused(shape: Any, slices: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"shape|slices"):
        ChunkRandom(0, shape, slices)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda r: r.random(np.float16), TypeError, "float32 or float64"),
        (lambda r: r.random(np.int64), TypeError, "float32 or float64"),
        (lambda r: r.standard_normal("int32"), TypeError, "float32 or float64"),
        (lambda r: r.random("nonsense"), TypeError, "not a numpy dtype"),
        (lambda r: r.integers(0, 5, np.float64), TypeError, "integer dtype"),
        (lambda r: r.integers(0, 5, bool), TypeError, "integer dtype"),
        (lambda r: r.integers(5, 5), ValueError, "low >= high"),
        (lambda r: r.integers(6, 5), ValueError, "low >= high"),
        (lambda r: r.integers(0), ValueError, "high <= 0"),
        (lambda r: r.integers(0, 300, np.int8), ValueError, "out of bounds"),
        (lambda r: r.integers(-1, 3, np.uint8), ValueError, "out of bounds"),
        (lambda r: r.integers(0.0, 3), TypeError, "low must be an int"),
        (lambda r: r.integers(0, np.array([3, 4])), TypeError, "high must be an int"),
        (lambda r: r.uniform(1.0, 0.0), ValueError, "high - low"),
        (lambda r: r.uniform(0.0, np.inf), OverflowError, "high - low"),
        (lambda r: r.uniform(np.zeros(3), 1.0), TypeError, "low must be a real number"),
        (lambda r: r.normal(0.0, -1.0), ValueError, "scale < 0"),
        (lambda r: r.normal("0", 1.0), TypeError, "loc must be a real number"),
    ],
)
def test_bad_arguments_are_refused_as_numpy_does(
    call: Callable[[ChunkRandom], Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call(ChunkRandom(0, *REGION))
