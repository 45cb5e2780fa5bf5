"""Chunk descriptors and chunk planning.

A plan splits an array into a regular grid of blocks. The block shape is the only thing the
plan stores; a chunk's region is computed from its index, so a worker rebuilds any chunk's
descriptor from the plan and an integer: what travels per chunk is an index, not an array.
"""

from __future__ import annotations

import math
import mmap
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._random import ChunkRandom

PAGE_SIZE = mmap.PAGESIZE
"""Chunk boundaries fall on multiples of this many bytes where the shape allows, so that no
two workers write the same memory page (page cache and NFS both work in whole pages). The
machine's own page size: 4 KiB on most, 16 or 64 KiB on some ARM and POWER kernels."""

MAX_CHUNKS = 2**31
"""Most chunks a job may have: the dispatcher and the status file keep a few bytes per chunk,
so a plan beyond this (a shape whose size overflows, chunks of one element over a huge
array) is refused before anything is allocated."""

MAX_ARRAY_BYTES = 2**62
"""Largest array a job may make: file offsets are signed 64-bit numbers, and a margin is left
for the .npy header and the arithmetic on offsets."""

AUTO_CHUNKS = 64
""""auto" aims at this many chunks, within the bounds below: enough that the workers of a
large machine share the work evenly and one finishing early finds more, few enough that the
per-chunk cost stays negligible. "auto" depends on the arrays alone, never on the number of
workers or the machine, so that whatever depends on the chunking (a float reduction, seeds
per chunk, the journal of a resumable job) is the same on a laptop and on a cluster."""

AUTO_MAX_CHUNK_BYTES = 16 * 2**20
"""Upper bound of the bytes an "auto" chunk spans in the outputs and inputs together: a
worker touches at most a few of these at once, which keeps its resident memory small
whatever the array sizes, and 16 MiB amortizes the few microseconds a chunk costs to
dispatch thousands of times over."""

AUTO_MIN_CHUNK_BYTES = 256 * 2**10
"""Lower bound of an "auto" chunk: below this, dispatch overhead starts to show."""

AUTO_MAX_STEP_CHUNK_BYTES = 256 * 2**20
"""Upper bound of an "auto" chunk of an ``iterate`` run: its state stays mapped and resident
in the workers for the whole run anyway, so the bound that keeps a worker's memory small does
not apply, and a step of fewer, larger chunks costs fewer round trips at its barrier."""

AUTO_HALO_MULTIPLE = 4
"""With a ``Halo`` input, "auto" chunks span at least this many times its depth along each
split axis (where the array allows), so that a chunk's halo is at most half of its view."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Where one chunk lives: a small picklable record, the same in every process.

    A kernel receives it as its second argument. ``slices`` is the region in global
    coordinates, so ``inputs[chunk.slices]`` or ``np.indices`` arithmetic work directly.

    Attributes:
        index: the chunk's number, from 0 to ``count - 1`` (C order over the chunk grid).
        slices: the chunk's region of the whole array, one ``slice`` per axis.
        path: the file that holds the whole array.
        dtype: the array's dtype.
        shape: the shape of the whole array.
        order: ``"C"`` or ``"F"``, the array's memory layout in the file.
        offset: byte offset of the array's first element in the file.
        count: how many chunks the job has.
        step: the step of an ``iterate`` run the chunk belongs to (1 to ``steps``); 0 in
            other jobs.

    With several outputs, ``path``, ``dtype``, ``offset`` and ``order`` describe the first.
    """

    index: int
    slices: tuple[slice, ...]
    path: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    order: str
    offset: int
    count: int
    step: int = 0
    # (role, shape) of each input: what interior() needs. Shared by all the chunks of a job.
    _inputs: tuple[tuple[Any, tuple[int, ...]], ...] = field(default=(), repr=False, compare=False)

    def interior(self, k: int) -> tuple[slice, ...]:
        """Where the chunk's own region lies in the view of input ``k``: one slice per axis
        of that view, so that ``result[chunk.interior(k)]`` trims a result computed on the
        whole view to the chunk's ``out``.

        For a :class:`~memmap_pool.Halo` input the view reaches ``depth`` beyond the region
        (less at an edge with ``boundary="none"``); for a plain input the slices cover the
        whole view.

        Raises:
            IndexError: the job has no input ``k``.
        """
        try:
            role, shape = self._inputs[k]
        except IndexError:
            n = len(self._inputs)
            msg = f"chunk.interior({k}): the job has {n} input{'' if n == 1 else 's'}"
            raise IndexError(msg) from None
        result: tuple[slice, ...] = role.interior(shape, self.slices)
        return result

    def random(self, seed: int | Sequence[int]) -> ChunkRandom:
        """Random numbers for this chunk that depend only on ``seed`` and on each element's
        flat C-order index in the whole array: the same array for any ``chunks=``, any number
        of workers, any start method and the Dask backend.

        The returned object's methods (``random``, ``uniform``, ``standard_normal``,
        ``normal``, ``integers``) each return an array of the chunk's region shape; each call
        is a new, independent stream, and a new ``chunk.random(seed)`` starts again at the
        first. See docs/random.md for the generator (Philox) and how streams are keyed.

        Raises:
            TypeError, ValueError: ``seed`` is not a non-negative int or a sequence of them.

        Example:
            >>> def noise(out, chunk):  # doctest: +SKIP
            ...     out[:] = chunk.random(seed=42).standard_normal()
        """
        return ChunkRandom(seed, self.shape, self.slices)

    @property
    def region_shape(self) -> tuple[int, ...]:
        """The shape of this chunk's region."""
        return tuple(s.stop - s.start for s in self.slices)

    @property
    def start(self) -> tuple[int, ...]:
        """The region's first index along each axis."""
        return tuple(s.start for s in self.slices)

    @property
    def size(self) -> int:
        """Number of elements in the region."""
        return math.prod(self.region_shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the region."""
        return self.size * self.dtype.itemsize

    @classmethod
    def covering(cls, array: np.ndarray[Any, Any]) -> Chunk:
        """A descriptor for the whole of ``array``, for calling a kernel without a pool.

        Example:
            >>> out = np.zeros((4, 4))
            >>> my_kernel(out, Chunk.covering(out))  # doctest: +SKIP
        """
        order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
        return cls(
            index=0,
            slices=tuple(slice(0, n) for n in array.shape),
            path=str(getattr(array, "filename", "") or ""),
            dtype=array.dtype,
            shape=tuple(array.shape),
            order=order,
            offset=int(getattr(array, "offset", 0) or 0),
            count=1,
        )


def normalize_shape(shape: object) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of non-negative ints, or raise a clear error."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        items: Sequence[object] = (shape,)
    elif isinstance(shape, (tuple, list)):
        items = shape
    else:
        msg = f"shape must be an int or a tuple of ints (got {shape!r})"
        raise TypeError(msg)

    def problem(_: str) -> str:
        # The whole shape, not the offending item: the item alone says little.
        return f"shape must be a tuple of non-negative ints (got {tuple(items)!r})"

    return tuple(non_negative_index(n, problem) for n in items)


def non_negative_index(value: object, problem: Callable[[str], str]) -> int:
    """``value`` as a non-negative int: anything ``operator.index`` takes, but a bool.

    ``problem(shown)`` is the error's message, ``shown`` the offending value as the message
    shows it: ``repr(value)`` for a wrong type, the int itself for a negative one (a numpy
    integer then shows as its plain value).

    Raises:
        TypeError: not an int, or a bool.
        ValueError: a negative int.
    """
    # operator.index takes a bool (an int subclass); True for a length is likely a mistake.
    if isinstance(value, bool):
        raise TypeError(problem(repr(value)))
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(problem(repr(value))) from None
    if n < 0:
        raise ValueError(problem(str(n)))
    return n


def normalize_dtype(dtype: object) -> np.dtype[Any]:
    """Return ``dtype`` as a numpy dtype that can live in a file, or raise a clear error."""
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError as exc:
        msg = f"dtype {dtype!r} is not a numpy dtype: {exc}"
        raise TypeError(msg) from None
    if dt.hasobject:
        msg = (
            f"dtype {dt} holds Python objects, which cannot live in a shared file; "
            "use a numeric, string or structured dtype"
        )
        raise TypeError(msg)
    if dt.itemsize == 0:
        msg = f"dtype {dt} has zero size; give a size, e.g. 'S16' or 'U8'"
        raise TypeError(msg)
    return dt  # type: ignore[no-any-return]


def normalize_order(order: object) -> str:
    if order not in ("C", "F"):
        msg = f"order must be 'C' or 'F' (got {order!r})"
        raise ValueError(msg)
    return str(order)


def element_strides(shape: tuple[int, ...], order: str) -> tuple[int, ...]:
    """Strides in elements of a contiguous array of ``shape`` in ``order``."""
    strides = [0] * len(shape)
    step = 1
    axes = range(len(shape) - 1, -1, -1) if order == "C" else range(len(shape))
    for axis in axes:
        strides[axis] = step
        step *= max(shape[axis], 1)
    return tuple(strides)


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """A regular grid of blocks over an array of ``shape``; chunk ``i`` is block ``i`` in C
    order over the grid, and the last block along an axis may be smaller (ragged)."""

    shape: tuple[int, ...]
    itemsize: int
    order: str
    block: tuple[int, ...]
    # (length, block, blocks) per axis, last axis first: what slices() walks for each chunk,
    # computed once (it runs in the worker's per-chunk loop).
    _axes_reversed: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        grid = (-(-n // b) for n, b in zip(self.shape, self.block))
        axes = tuple(zip(self.shape, self.block, grid))[::-1]
        object.__setattr__(self, "_axes_reversed", axes)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-n // b) for n, b in zip(self.shape, self.block))

    @property
    def count(self) -> int:
        return math.prod(self.grid) if self.shape else 1

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array."""
        return math.prod(self.shape) * self.itemsize

    def chunks_nbytes(self, indices: Iterable[int], itemsize: int) -> int:
        """Bytes of the regions of chunks ``indices``, for elements of ``itemsize`` bytes
        (the sum over a job's outputs)."""
        return sum(region_nbytes(self.slices(int(i)), itemsize) for i in indices)

    @property
    def chunked_axes(self) -> tuple[int, ...]:
        """Axes the plan splits: the ones on which inputs must match the output."""
        return tuple(i for i, (n, b) in enumerate(zip(self.shape, self.block)) if b < n)

    def slices(self, index: int) -> tuple[slice, ...]:
        out = []
        rest = index
        # Unravel the index over the grid in C order (last axis fastest), by hand: this runs
        # once per chunk in the worker's hot loop and np.unravel_index costs ~10x more.
        for n, b, g in self._axes_reversed:
            rest, k = divmod(rest, g)
            start = k * b
            out.append(slice(start, min(start + b, n)))
        return tuple(out[::-1])

    def byte_span(self, index: int) -> tuple[int, int]:
        """``(start, stop)`` bytes, relative to the array's first byte, that hold the chunk.

        For a chunk that is contiguous in the file this is exactly its data; for an n-d
        block it also covers the bytes of its neighbours in between.
        """
        strides = element_strides(self.shape, self.order)
        sl = self.slices(index)
        first = sum(s.start * st for s, st in zip(sl, strides))
        last = sum((s.stop - 1) * st for s, st in zip(sl, strides))
        return first * self.itemsize, (last + 1) * self.itemsize

    def for_output(self, shape: tuple[int, ...], itemsize: int, order: str) -> ChunkPlan:
        """The same chunks as seen by one output of ``shape`` (the grid's, or with trailing
        axes, which every chunk covers whole), ``itemsize`` and ``order``: its byte spans."""
        extra = shape[len(self.shape) :]
        if shape == self.shape and itemsize == self.itemsize and order == self.order:
            return self
        block = (*self.block, *(max(n, 1) for n in extra))
        return ChunkPlan(shape=shape, itemsize=itemsize, order=order, block=block)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "itemsize": self.itemsize,
            "order": self.order,
            "block": list(self.block),
            "count": self.count,
        }


def _align_multiple(row_bytes: int) -> int:
    """Smallest number of rows whose bytes are a multiple of the page size."""
    return PAGE_SIZE // math.gcd(PAGE_SIZE, row_bytes) if row_bytes else 1


def plan_chunks(
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    order: str,
    chunks: object,
    itemsizes: Sequence[int] = (),
    *,
    input_bytes: int = 0,
    min_extent: Sequence[int] = (),
    max_chunk_bytes: int = AUTO_MAX_CHUNK_BYTES,
) -> ChunkPlan:
    """Validate ``chunks`` against ``shape`` and return the plan, or raise ``ValueError``.

    ``itemsizes``: for a job with several outputs, the bytes each one holds per element of
    ``shape`` (its itemsize times its trailing axes); "auto" chunks then fall on page
    boundaries in every output. Default: one output of ``dtype``. For "auto" only:
    ``input_bytes``, the inputs' bytes (counted in a chunk's size), ``min_extent``, the
    least extent of a chunk along each axis (from the halos), and ``max_chunk_bytes``, the
    upper bound of a chunk.
    """
    sizes = tuple(itemsizes) or (dtype.itemsize,)
    itemsize = sum(sizes)
    nbytes = math.prod(shape) * itemsize
    if nbytes > MAX_ARRAY_BYTES:
        msg = (
            f"shape {shape} of {dtype} is {nbytes} bytes, more than a file can hold "
            f"({MAX_ARRAY_BYTES} bytes); check the shape"
        )
        raise ValueError(msg)
    if isinstance(chunks, str):
        if chunks != "auto":
            msg = f"chunks must be 'auto', an int or a tuple of ints (got {chunks!r})"
            raise ValueError(msg)
        block = _auto_block(shape, sizes, order, input_bytes, tuple(min_extent), max_chunk_bytes)
    elif isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool):
        if not shape:
            msg = "chunks=int splits axis 0, but the shape has no axes; use chunks='auto'"
            raise ValueError(msg)
        rows = int(chunks)
        if not 1 <= rows <= max(shape[0], 1):
            msg = (
                f"chunks={rows} rows does not fit shape {shape}: it must be between 1 and "
                f"{shape[0]} (the length of axis 0)"
            )
            raise ValueError(msg)
        block = (rows, *(max(n, 1) for n in shape[1:]))  # an empty axis: blocks of 1
    elif isinstance(chunks, (tuple, list)):
        if len(chunks) != len(shape):
            msg = (
                f"chunks {tuple(chunks)} has {len(chunks)} axes but shape {shape} has "
                f"{len(shape)}; give one block length per axis (None for the whole axis)"
            )
            raise ValueError(msg)
        items = []
        for axis, (b, n) in enumerate(zip(chunks, shape)):
            if b is None or b == -1:
                items.append(max(n, 1))  # a zero-length axis still has blocks of 1
                continue
            if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
                msg = f"chunks must hold ints or None (got {tuple(chunks)!r})"
                raise TypeError(msg)
            if not 1 <= int(b) <= max(n, 1):
                msg = (
                    f"chunks {tuple(chunks)} do not fit shape {shape}: axis {axis} block "
                    f"{b} must be between 1 and {n}"
                )
                raise ValueError(msg)
            items.append(int(b))
        block = tuple(items)
    else:
        msg = f"chunks must be 'auto', an int or a tuple of ints (got {chunks!r})"
        raise TypeError(msg)
    plan = ChunkPlan(shape=shape, itemsize=itemsize, order=order, block=block)
    if plan.count > MAX_CHUNKS:
        msg = (
            f"chunks={chunks!r} makes {plan.count} chunks of shape {shape}, more than a job "
            f"can have ({MAX_CHUNKS}); use larger chunks"
        )
        raise ValueError(msg)
    return plan


def _auto_block(
    shape: tuple[int, ...],
    itemsizes: tuple[int, ...],
    order: str,
    input_bytes: int = 0,
    min_extent: tuple[int, ...] = (),
    max_chunk_bytes: int = AUTO_MAX_CHUNK_BYTES,
) -> tuple[int, ...]:
    """Blocks that split the slowest-varying axes only, so each chunk is one contiguous,
    page-aligned byte range of each output's file where the shape allows; about
    :data:`AUTO_CHUNKS` of them, within the byte bounds (see there)."""
    if not shape or math.prod(shape) == 0:
        return tuple(max(n, 1) for n in shape)
    itemsize = sum(itemsizes)
    cells = math.prod(shape)
    total = cells * itemsize + input_bytes
    target = max(AUTO_MIN_CHUNK_BYTES, min(max_chunk_bytes, total // AUTO_CHUNKS))
    # Sized on the outputs alone from here: the target in output bytes.
    target = max(1, target * cells * itemsize // total)
    least = list(min_extent) or [0] * len(shape)
    # Work in C terms; an F-ordered array is a C-ordered one with its axes reversed.
    dims = list(shape) if order == "C" else list(shape[::-1])
    if order != "C":
        least = least[::-1]
    block = list(dims)
    for axis in range(len(dims)):
        inner = math.prod(dims[axis + 1 :]) * itemsize
        if inner * dims[axis] <= target:
            break  # the rest fits in one chunk whole
        if inner <= target:
            rows = max(1, target // inner)
            per_row = inner // itemsize
            align = math.lcm(*(_align_multiple(per_row * size) for size in itemsizes))
            # Round to whole pages unless that would leave fewer than two chunks on this axis.
            if align <= rows or (align * 2 <= dims[axis] and align * inner <= max_chunk_bytes):
                rows = max(align, rows - rows % align)
            if rows < least[axis]:
                rows = -(-least[axis] // align) * align  # whole pages still
            block[axis] = min(rows, dims[axis])
            break
        # A single slab of this axis is still too big: split deeper, keeping a halo's
        # least extent on this axis.
        block[axis] = min(max(1, least[axis]), dims[axis])
        target = max(1, target // block[axis])
    return tuple(block) if order == "C" else tuple(block[::-1])


def describe_region(slices: tuple[slice, ...]) -> str:
    """``[0:128, 0:64]``: a region as the user would index it."""
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in slices) + "]"


def shares_pages(plan: ChunkPlan, offset: int) -> bool:
    """Whether two chunks of ``plan`` write bytes of one memory page, for an array starting
    ``offset`` bytes into its file.

    Harmless on one host (all processes share one page cache), but across hosts each one
    writes whole pages back to the shared filesystem, so a page two hosts wrote ends up
    with one host's bytes only.
    """
    # In C terms: an F-ordered array is a C-ordered one with its axes reversed.
    shape = plan.shape if plan.order == "C" else plan.shape[::-1]
    block = plan.block if plan.order == "C" else plan.block[::-1]
    split = [axis for axis, (n, b) in enumerate(zip(shape, block)) if b < n]
    if not split:
        return False  # one chunk
    inner = split[-1]  # chunks are contiguous runs of whole blocks along this axis
    step = math.prod(shape[inner + 1 :]) * plan.itemsize
    # Runs start at the array's start, at every block of `inner` and at every slab of the
    # axis before it (where the last run of one slab meets the first of the next).
    return bool(
        offset % PAGE_SIZE
        or block[inner] * step % PAGE_SIZE
        or (inner > 0 and shape[inner] * step % PAGE_SIZE)
    )


def region_nbytes(slices: tuple[slice, ...], itemsize: int) -> int:
    """Bytes of the region ``slices`` of an array of ``itemsize``-byte elements."""
    n = itemsize
    for s in slices:
        n *= s.stop - s.start
    return n
