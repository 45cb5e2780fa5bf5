"""Chunk plans as properties over random shapes, dtypes, orders and chunk arguments: chunks
tile the array, byte spans cover them, "auto" blocks stay small, and shares_pages never
misses a page two chunks write."""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from memmap_pool._chunks import (
    AUTO_HALO_MULTIPLE,
    AUTO_MAX_CHUNK_BYTES,
    PAGE_SIZE,
    ChunkPlan,
    plan_chunks,
    shares_pages,
)
from memmap_pool._chunks import (
    MAX_CHUNKS as PLAN_MAX_CHUNKS,
)

ITEMSIZES = (1, 2, 4, 8, 16)
TEXT = string.ascii_letters + string.digits + " _-.'"
"""Characters of the strings tried as chunks (a fixed alphabet: no Unicode tables to build)."""
PAGE_ROW = PAGE_SIZE // 16
"""Elements of 16 bytes in one page."""
MAX_ELEMENTS = 8192
"""Elements of the arrays checked element by element."""
MAX_CHUNKS = 512
"""Chunks of the plans checked chunk by chunk."""

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much],
)


def dtype_of(itemsize: int) -> np.dtype:
    return np.dtype(f"V{itemsize}")


@st.composite
def shapes(draw, max_elements: int = MAX_ELEMENTS) -> tuple[int, ...]:
    """0 to 4 axes, mostly short, some a power of two long (page-sized rows)."""
    ndim = draw(st.integers(0, 4))
    budget = max_elements
    dims = []
    for _ in range(ndim):
        n = draw(st.one_of(st.integers(0, 7), st.sampled_from((8, 16, 64, 256, 512, 1024))))
        n = min(n, budget)
        dims.append(n)
        budget = max(1, budget // max(n, 1))
    return tuple(dims)


@st.composite
def chunk_args(draw, shape: tuple[int, ...]) -> object:
    """A valid ``chunks`` argument for ``shape``: "auto", rows of axis 0, or a tuple."""
    # chunks=int with an empty axis after axis 0 is left out: see
    # test_int_chunks_of_an_array_with_an_empty_trailing_axis_give_a_plan.
    int_ok = bool(shape) and all(shape[1:])
    kinds = ["auto", "tuple"] + (["int"] if int_ok else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "auto":
        return "auto"
    if kind == "int":
        return draw(st.integers(1, max(shape[0], 1)))
    return tuple(draw(st.one_of(st.none(), st.just(-1), st.integers(1, max(n, 1)))) for n in shape)


@st.composite
def plans(draw, auto: bool = False) -> tuple[ChunkPlan, object, int]:
    shape = draw(shapes())
    itemsize = draw(st.sampled_from(ITEMSIZES))
    order = draw(st.sampled_from("CF"))
    chunks = "auto" if auto else draw(chunk_args(shape))
    workers = draw(st.integers(1, 16))
    plan = plan_chunks(shape, dtype_of(itemsize), order, chunks)
    assume(plan.count <= MAX_CHUNKS)
    return plan, chunks, workers


@st.composite
def page_row_plans(draw) -> tuple[ChunkPlan, object, int]:
    """Plans of arrays whose innermost axis (in memory order) holds a quarter page to two
    pages: the layouts where chunks can avoid sharing pages."""
    itemsize = draw(st.sampled_from(ITEMSIZES))
    per_page = PAGE_SIZE // itemsize
    row = per_page * draw(st.sampled_from((1, 2))) // draw(st.sampled_from((1, 1, 2, 4)))
    outer = tuple(draw(st.integers(2, 3)) for _ in range(draw(st.integers(1, 2))))
    order = draw(st.sampled_from("CF"))
    shape = (*outer, row) if order == "C" else (row, *outer[::-1])
    if draw(st.booleans()):
        chunks = draw(chunk_args(shape))
    else:  # the row whole or halved, the outer axes split at random
        row_block = draw(st.sampled_from((None, -1, row, max(1, row // 2))))
        blocks = [draw(st.one_of(st.none(), st.integers(1, n))) for n in outer]
        chunks = (*blocks, row_block) if order == "C" else (row_block, *blocks[::-1])
    plan = plan_chunks(shape, dtype_of(itemsize), order, chunks)
    return plan, chunks, 1


def element_offsets(plan: ChunkPlan, index: int) -> np.ndarray:
    """Element offsets in the file (in elements, from the array's start) of chunk ``index``,
    computed from its region with numpy's own index arithmetic."""
    region = plan.slices(index)
    if not plan.shape:
        return np.zeros(1, dtype=np.int64)
    grids = np.indices(tuple(s.stop - s.start for s in region))
    coords = tuple(g.ravel() + s.start for g, s in zip(grids, region))
    return np.ravel_multi_index(coords, plan.shape, order=plan.order)


def touched_pages(plan: ChunkPlan, index: int, offset: int) -> np.ndarray:
    """Pages of a file holding the array at byte ``offset`` that chunk ``index`` writes."""
    first = offset + element_offsets(plan, index) * plan.itemsize
    last = first + plan.itemsize - 1
    return np.union1d(first // PAGE_SIZE, last // PAGE_SIZE)


# -- tiling ---------------------------------------------------------------------------------------


@SETTINGS
@given(plans())
def test_chunks_tile_the_array_exactly(case):
    """Every element of the array lies in exactly one chunk."""
    plan, _, _ = case
    counts = np.zeros(plan.shape, dtype=np.int32)
    for i in range(plan.count):
        counts[plan.slices(i)] += 1
    assert (counts == 1).all()


@SETTINGS
@given(plans())
def test_the_chunk_count_is_the_product_of_the_grid(case):
    """count equals the product of the grid, one block count per axis."""
    plan, _, _ = case
    assert plan.count == math.prod(plan.grid)
    assert plan.grid == tuple(-(-n // b) for n, b in zip(plan.shape, plan.block))


@SETTINGS
@given(plans())
def test_chunk_slices_stay_within_the_array(case):
    """Each chunk's slices are non-empty and within the array's bounds."""
    plan, _, _ = case
    for i in range(plan.count):
        region = plan.slices(i)
        assert len(region) == len(plan.shape)
        for s, n, b in zip(region, plan.shape, plan.block):
            assert 0 <= s.start < s.stop <= n
            assert s.stop - s.start <= b


@SETTINGS
@given(plans())
def test_explicit_chunks_give_the_blocks_asked_for(case):
    """An int splits axis 0 in rows of that many; None and -1 mean the whole axis."""
    plan, chunks, _ = case
    if isinstance(chunks, int):
        assert plan.block == (chunks, *plan.shape[1:])
    elif isinstance(chunks, tuple):
        for b, asked, n in zip(plan.block, chunks, plan.shape):
            assert b == (max(n, 1) if asked in (None, -1) else asked)


# -- byte spans ----------------------------------------------------------------------------------


@SETTINGS
@given(plans())
def test_byte_span_covers_exactly_the_chunks_first_to_last_byte(case):
    """byte_span starts at the chunk's lowest byte and ends after its highest one."""
    plan, _, _ = case
    for i in range(plan.count):
        offsets = element_offsets(plan, i)
        start, stop = plan.byte_span(i)
        assert start == int(offsets.min()) * plan.itemsize
        assert stop == (int(offsets.max()) + 1) * plan.itemsize


@SETTINGS
@given(plans())
def test_byte_span_is_the_chunks_own_bytes_when_it_is_contiguous(case):
    """A chunk whose elements are consecutive in the file spans exactly its own bytes."""
    plan, _, _ = case
    for i in range(plan.count):
        offsets = np.sort(element_offsets(plan, i))
        start, stop = plan.byte_span(i)
        contiguous = offsets[-1] - offsets[0] + 1 == offsets.size
        assert contiguous == (stop - start == offsets.size * plan.itemsize)


# -- "auto" blocks -------------------------------------------------------------------------------


@st.composite
def large_auto_plans(draw) -> tuple[ChunkPlan, int]:
    """'auto' plans of arrays up to terabytes (nothing is allocated)."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(
        draw(st.one_of(st.integers(1, 200_000), st.sampled_from((1024, 4096, 8192, 65536))))
        for _ in range(ndim)
    )
    itemsize = draw(st.sampled_from(ITEMSIZES))
    order = draw(st.sampled_from("CF"))
    workers = draw(st.integers(1, 64))
    # Beyond MAX_CHUNKS chunks of at most AUTO_MAX_CHUNK_BYTES (32 PiB) a plan is refused.
    assume(math.prod(shape) * itemsize <= PLAN_MAX_CHUNKS * AUTO_MAX_CHUNK_BYTES // 2)
    return plan_chunks(shape, dtype_of(itemsize), order, "auto"), workers


def split_row_bytes(plan: ChunkPlan) -> int:
    """Bytes of one index along the innermost axis the plan splits (0 if it splits none)."""
    shape = plan.shape if plan.order == "C" else plan.shape[::-1]
    block = plan.block if plan.order == "C" else plan.block[::-1]
    split = [a for a, (n, b) in enumerate(zip(shape, block)) if b < n]
    if not split:
        return 0
    return math.prod(shape[split[-1] + 1 :]) * plan.itemsize


@SETTINGS
@given(plans(auto=True))
def test_auto_chunks_of_small_arrays_tile_them_in_few_enough_chunks(case):
    """'auto' on a small array never makes more chunks than elements, nor empty ones."""
    plan, _, _ = case
    assert plan.count <= max(1, math.prod(plan.shape))
    assert all(b >= 1 for b in plan.block)


@settings(max_examples=200, deadline=None, database=None)
@given(large_auto_plans())
@example(
    (plan_chunks((4096, 100_001), np.dtype(np.float32), "C", "auto"), 4)
)  # 1.6 GB: 4 chunks of 410 MB
def test_auto_blocks_stay_under_the_max_unless_one_row_is_larger(case):
    """An 'auto' block holds at most AUTO_MAX_CHUNK_BYTES, or one row of its split axis."""
    plan, _ = case
    block_bytes = math.prod(plan.block) * plan.itemsize
    assert block_bytes <= max(AUTO_MAX_CHUNK_BYTES, split_row_bytes(plan))


@settings(max_examples=100, deadline=None, database=None)
@given(large_auto_plans())
def test_auto_blocks_of_large_arrays_cover_them(case):
    """'auto' blocks of any array are within its shape and cover it in count chunks."""
    plan, _ = case
    for n, b, g in zip(plan.shape, plan.block, plan.grid):
        assert 1 <= b <= n
        assert (g - 1) * b < n <= g * b


# -- page sharing --------------------------------------------------------------------------------


def pages_shared(plan: ChunkPlan, offset: int) -> bool:
    """Whether any page is written by two chunks, found by listing every chunk's pages."""
    seen: set[int] = set()
    for i in range(plan.count):
        pages = set(touched_pages(plan, i, offset).tolist())
        if pages & seen:
            return True
        seen |= pages
    return False


@SETTINGS
@given(st.one_of(plans(), page_row_plans()))
@example(
    (plan_chunks((3, PAGE_ROW), np.dtype("V16"), "C", (1, None)), (1, None), 1)
)  # rows of one page
@example(
    (plan_chunks((2 * PAGE_ROW, 3), np.dtype("V16"), "F", (None, 1)), (None, 1), 1)
)  # columns of two pages, F order
@example(
    (plan_chunks((2, 4, PAGE_ROW), np.dtype("V16"), "C", (1, 2, None)), (1, 2, None), 1)
)  # blocks of two axes
def test_shares_pages_false_means_no_page_is_written_by_two_chunks(case):
    """When shares_pages predicts no sharing, no page holds bytes of two chunks."""
    plan, _, _ = case
    assume(math.prod(plan.shape) > 0)
    for offset in (0, 128, PAGE_SIZE):
        if not shares_pages(plan, offset):
            assert not pages_shared(plan, offset), offset


def test_page_aligned_rows_are_seen_as_not_sharing_pages():
    """Chunks of whole pages at a page-aligned offset do not share pages, and it is seen."""
    plan = plan_chunks((4, PAGE_ROW), np.dtype("V16"), "C", 1)
    assert not shares_pages(plan, 0)
    assert not shares_pages(plan, PAGE_SIZE)
    assert not pages_shared(plan, 0)


def test_an_unaligned_offset_or_block_is_seen_as_sharing_pages():
    """Chunk boundaries off the page grid are predicted to share pages, and they do."""
    rows = plan_chunks((4, PAGE_ROW), np.dtype("V16"), "C", 1)
    assert shares_pages(rows, 128)
    assert pages_shared(rows, 128)
    halves = plan_chunks((4, PAGE_ROW), np.dtype("V16"), "C", (1, PAGE_ROW // 2))
    assert shares_pages(halves, 0)
    assert pages_shared(halves, 0)


def test_a_single_chunk_never_shares_pages():
    """A plan of one chunk shares no page, whatever the offset."""
    plan = plan_chunks((5, 7), np.dtype("V2"), "C", "auto")
    assert plan.count == 1
    assert not shares_pages(plan, 3)


# -- bad arguments -------------------------------------------------------------------------------


@SETTINGS
@given(shapes(max_elements=4096), st.text(TEXT, max_size=6).filter(lambda s: s != "auto"))
def test_a_string_other_than_auto_is_refused_with_value_error(shape, chunks):
    """Any string but 'auto' raises ValueError."""
    with pytest.raises(ValueError, match="chunks"):
        plan_chunks(shape, dtype_of(8), "C", chunks)


@SETTINGS
@given(shapes(max_elements=4096), st.integers(max_value=0))
def test_block_lengths_below_one_are_refused_with_value_error(shape, rows):
    """chunks=int below 1, or a tuple entry below 1 (other than -1), raises ValueError."""
    with pytest.raises(ValueError, match="chunks"):
        plan_chunks(shape, dtype_of(8), "C", rows)
    if shape and rows != -1:
        chunks = (rows,) + (None,) * (len(shape) - 1)
        with pytest.raises(ValueError, match="chunks"):
            plan_chunks(shape, dtype_of(8), "C", chunks)


@SETTINGS
@given(shapes(max_elements=4096).filter(lambda s: len(s) > 0), st.integers(1, 100))
def test_blocks_longer_than_their_axis_are_refused_with_value_error(shape, excess):
    """An int beyond axis 0, or a tuple entry beyond its axis, raises ValueError."""
    with pytest.raises(ValueError, match="chunks"):
        plan_chunks(shape, dtype_of(4), "C", max(shape[0], 1) + excess)
    axis = len(shape) - 1
    chunks = tuple(max(n, 1) + excess if a == axis else None for a, n in enumerate(shape))
    with pytest.raises(ValueError, match="chunks"):
        plan_chunks(shape, dtype_of(4), "C", chunks)


@SETTINGS
@given(shapes(max_elements=4096), st.integers(1, 3))
def test_a_chunks_tuple_of_the_wrong_length_is_refused_with_value_error(shape, extra):
    """A tuple with more or fewer entries than the shape has axes raises ValueError."""
    chunks = (None,) * (len(shape) + extra)
    with pytest.raises(ValueError, match="axes"):
        plan_chunks(shape, dtype_of(4), "C", chunks)
    if shape:
        with pytest.raises(ValueError, match="axes"):
            plan_chunks(shape, dtype_of(4), "C", (None,) * (len(shape) - 1))


@pytest.mark.parametrize("shape", [(4, 0), (0, 0), (3, 2, 0)])
def test_int_chunks_of_an_array_with_an_empty_trailing_axis_give_a_plan(shape):
    """chunks=int on an array with an empty axis after axis 0 gives a plan of no chunks."""
    plan = plan_chunks(shape, dtype_of(8), "C", 1)
    assert plan.count == 0


def test_int_chunks_of_an_array_without_axes_are_refused_with_value_error():
    """chunks=int needs an axis 0 to split."""
    with pytest.raises(ValueError, match="no axes"):
        plan_chunks((), dtype_of(4), "C", 1)


@SETTINGS
@given(
    shapes(max_elements=4096).filter(lambda s: len(s) > 0),
    st.one_of(
        st.floats(allow_nan=False, min_value=0.5, max_value=10),
        st.text(TEXT, min_size=1, max_size=3),
        st.just(True),
        st.just(False),
        st.just(b"2"),
    ),
)
def test_chunk_entries_that_are_not_ints_are_refused_with_type_error(shape, entry):
    """A tuple entry that is a float, a string, a bool or bytes raises TypeError."""
    chunks = tuple(entry if a == 0 else None for a in range(len(shape)))
    with pytest.raises(TypeError, match="chunks"):
        plan_chunks(shape, dtype_of(4), "C", chunks)


@pytest.mark.parametrize("chunks", [2.0, True, None, b"auto", {"rows": 2}])
def test_chunks_of_another_type_are_refused_with_type_error(chunks):
    """chunks that is neither 'auto', an int nor a tuple raises TypeError."""
    with pytest.raises(TypeError, match="chunks"):
        plan_chunks((8, 8), dtype_of(4), "C", chunks)


# -- "auto" depends on the arrays alone ---------------------------------------------------------


@settings(max_examples=100, deadline=None, database=None)
@given(large_auto_plans(), st.integers(0, 4))
def test_auto_counts_the_inputs_bytes_in_a_chunk(case, inputs_per_output):
    """Inputs of the job make "auto" chunks smaller or equal, never larger: a chunk's size
    counts its bytes in the outputs and in the inputs together."""
    plan, _ = case
    # The inputs' bytes count too: past the most chunks of the largest size, a plan is refused.
    assume((1 + inputs_per_output) * plan.nbytes <= PLAN_MAX_CHUNKS * AUTO_MAX_CHUNK_BYTES // 2)
    with_inputs = plan_chunks(
        plan.shape,
        dtype_of(plan.itemsize),
        plan.order,
        "auto",
        input_bytes=inputs_per_output * plan.nbytes,
    )
    assert all(b2 <= b1 for b1, b2 in zip(plan.block, with_inputs.block))
    assert with_inputs.count >= plan.count


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.tuples(st.integers(1, 5000), st.integers(1, 3000)),
    st.sampled_from(ITEMSIZES),
    st.sampled_from("CF"),
    st.integers(0, 64),
)
def test_auto_chunks_span_a_multiple_of_a_halos_depth(shape, itemsize, order, depth):
    """With a halo, an "auto" chunk spans at least AUTO_HALO_MULTIPLE x its depth along the
    axes it splits (or the whole axis)."""
    least = (AUTO_HALO_MULTIPLE * depth,) * 2
    plan = plan_chunks(shape, dtype_of(itemsize), order, "auto", min_extent=least)
    for n, b, m in zip(plan.shape, plan.block, least):
        assert b >= min(n, m)
