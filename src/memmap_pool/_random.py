"""Random numbers that do not depend on the chunking.

A kernel that draws random numbers with its own ``numpy.random.Generator`` gets values that
depend on which chunk it was given and in which order: a different chunking, worker count or
retry gives a different array. :class:`ChunkRandom` instead gives each element of the whole
array a value that depends only on the seed and on the element's flat C-order index, so the
whole array is the same for any chunking, any number of workers and any process.

How a value is defined:

- Generator: numpy's ``Philox`` (Philox4x64-10), a counter-based generator: its output for a
  128-bit key and a 256-bit counter is a fixed function of the two, so any part of any stream
  can be drawn directly, without drawing what comes before it.
- Key: ``numpy.random.SeedSequence(seed).generate_state(2, numpy.uint64)``, the key numpy's own
  ``Philox(seed)`` uses.
- Blocks: the flat indices are cut into blocks of :data:`BLOCK_SIZE` elements. Block ``b`` of
  stream ``s`` (the object's ``s``-th draw, counting from 0) is what a fresh
  ``numpy.random.Generator`` over ``Philox(key=key, counter=[0, 0, b, s])`` returns when the
  method called draws the block's values one after the other: value ``i`` of the block is the
  value of flat index ``b * BLOCK_SIZE + i`` (a draw of ``n`` values begins with the draw of
  fewer, so drawing only a block's first values gives the same ones). The index is that of the
  element's position, whatever the array's memory order. Block 0 of stream 0 is therefore
  exactly what ``numpy.random.Generator(numpy.random.Philox(seed))`` draws first.

Why blocks: numpy's ziggurat normals and Lemire integers use a variable number of raw words per
value, so the value of an element can only be found by drawing its block from the block's
start. A block is drawn with numpy's own methods, so the transforms (ziggurat, Lemire, the
53-bit uniform) are numpy's.

Statistical guarantees: Philox4x64-10 passes TestU01's BigCrush (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011). No two blocks or streams of a seed share raw
words: a block draws a few thousand words, which moves only counter word 0 (it would carry
into word 1 after 2**64 steps), while words 2 and 3 hold the block and the stream. Different
seeds have different keys (SeedSequence hashes the seed). Within a block the values are those
of a numpy Generator, with numpy's statistical properties. What is not guaranteed: numpy may
change a Generator method's algorithm between releases (NEP 19 promises stable bit
generators, not stable transforms), and then the values of that method change with numpy.

Cost: see :class:`ChunkRandom`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import numpy as np

BLOCK_SIZE: Final = 2**12
"""Elements per block. It is part of the definition of every value, so it must never change.

Two costs pull opposite ways. Each block costs a reset of the generator, ~1.5-2 us, which is
~4% of drawing 4096 normals (~50 us) and more for smaller blocks. A run that starts mid-block
draws normals and integers from the block's start, ~BLOCK_SIZE / 2 values in vain on average,
which n-d chunks (short runs) pay once per run. 2**12 keeps row chunks within a few percent of
numpy drawing the values in one go, and 512 x 512 blocks of a 12207-wide array at ~5x (2**13
would give ~2% and ~9x, 2**11 ~6% and ~3.5x)."""

_FLOAT64: Final = np.dtype(np.float64)
_FLOATS: Final = (np.dtype(np.float32), _FLOAT64)

_Fill = Callable[[np.random.Generator, np.ndarray[Any, Any]], None]
"""Fills a contiguous 1-d array with the generator's next values of one method."""


class ChunkRandom:
    """Random numbers for one chunk's region that depend only on the seed and the flat index.

    Each method returns an array of the region's shape. Each call is a new stream: the second
    call's values are independent of the first's, and a new object with the same seed starts
    again at the first stream. A call that raises uses no stream.

    The values are defined in the module's docstring: flat index ``i`` of stream ``s`` is value
    ``i % BLOCK_SIZE`` of a numpy Generator over ``Philox(key, counter=[0, 0, i // BLOCK_SIZE,
    s])``, with the key from ``SeedSequence(seed)``. The shape does not enter: a (10, 10) and a
    (100,) array with the same seed hold the same values.

    Cost, measured on 200 M float64 in one process (2 shared cores, numpy 2.4): standard
    normals over row chunks of 2M elements take 0.8-1.0x the time of
    ``Generator(Philox(seed)).standard_normal(200_000_000)``, and 1.1-1.3x that of the same
    draw into a preallocated array (``out=``): the per-block reset is ~4%, the rest is the copy
    of each chunk's result and noise. Over 512 x 512 blocks of a 16384 x 12207 array they take
    ~4.7x, because each short run of normals or integers also draws the part of its block
    before it. ``random`` and ``uniform`` use one raw word per value, so they enter a block
    mid-way without that: ~1.0-1.2x over rows, ~2.8x over those blocks (a seek per run).

    Not thread-safe: one object per chunk, used by the kernel that received it.

    Args:
        seed: a non-negative int, or a sequence of them (as ``numpy.random.SeedSequence``
            takes; ``5`` and ``[5]`` are the same seed).
        shape: the whole array's shape.
        slices: the chunk's region, one ``slice(start, stop)`` per axis of ``shape``.

    Raises:
        TypeError: ``seed`` is not an int or a sequence of ints, or ``shape`` or ``slices``
            are not tuples of the right kinds.
        ValueError: ``seed`` is negative or an empty sequence, or a slice is not within
            ``shape`` with step 1.

    Example:
        >>> rng = ChunkRandom(42, (100, 10), (slice(20, 30), slice(0, 10)))
        >>> rng.standard_normal().shape
        (10, 10)
    """

    __slots__ = (
        "_bitgen",
        "_counter",
        "_generator",
        "_length",
        "_shape",
        "_starts",
        "_state",
        "_stream",
    )

    def __init__(self, seed: int | Sequence[int], shape: Sequence[int], slices: Sequence[slice]):
        key = _philox_key(seed)
        full = _check_shape(shape)
        bounds = _check_slices(slices, full)
        self._shape = tuple(stop - start for start, stop in bounds)
        self._starts, self._length = _runs(full, bounds)
        self._bitgen = np.random.Philox(key=key)
        self._generator = np.random.Generator(self._bitgen)
        # Setting a whole state is the cheapest way to move a Philox to a counter and empty
        # its buffers (buffered words and the half word kept for 32-bit draws), so that a
        # block's values never depend on what was drawn before. The dict is built once and its
        # counter changed in place; lists of ints are read faster than arrays.
        self._counter = [0, 0, 0, 0]
        self._state: Any = {  # a dict of the form of Philox.state
            "bit_generator": "Philox",
            "state": {"counter": self._counter, "key": key.tolist()},
            "buffer": [0, 0, 0, 0],
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        self._stream = 0  # how many draws this object has made

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the arrays the methods return: the region's."""
        return self._shape

    def random(self, dtype: Any = np.float64) -> np.ndarray[Any, Any]:
        """Uniform floats in [0, 1), as ``numpy.random.Generator.random``.

        Raises:
            TypeError: ``dtype`` is not float32 or float64.
        """
        dt = _float_dtype(dtype, "random")
        fill = _fill_into(np.random.Generator.random, dt)
        # A float64 takes one raw 64-bit word, a float32 half of one.
        return self._draw(fill, dt, 2 if dt.itemsize == 4 else 1)

    def uniform(self, low: float = 0.0, high: float = 1.0) -> np.ndarray[Any, Any]:
        """Uniform float64 in [low, high), as ``numpy.random.Generator.uniform``.

        Raises:
            TypeError: ``low`` or ``high`` is not a real number (arrays are refused: one
                distribution per call).
            ValueError: ``high < low``, as numpy 2 does.
            OverflowError: ``high - low`` is not finite, as numpy.
        """
        fill = _fill_copied(np.random.Generator.uniform, _real(low, "low"), _real(high, "high"))
        return self._draw(fill, _FLOAT64, 1)

    def standard_normal(self, dtype: Any = np.float64) -> np.ndarray[Any, Any]:
        """Standard normal floats, as ``numpy.random.Generator.standard_normal``.

        Raises:
            TypeError: ``dtype`` is not float32 or float64.
        """
        dt = _float_dtype(dtype, "standard_normal")
        return self._draw(_fill_into(np.random.Generator.standard_normal, dt), dt, None)

    def normal(self, loc: float = 0.0, scale: float = 1.0) -> np.ndarray[Any, Any]:
        """Normal float64 of mean ``loc`` and standard deviation ``scale``, as
        ``numpy.random.Generator.normal``.

        Raises:
            TypeError: ``loc`` or ``scale`` is not a real number (arrays are refused).
            ValueError: ``scale < 0``, as numpy.
        """
        fill = _fill_copied(np.random.Generator.normal, _real(loc, "loc"), _real(scale, "scale"))
        return self._draw(fill, _FLOAT64, None)

    def integers(
        self, low: int, high: int | None = None, dtype: Any = np.int64
    ) -> np.ndarray[Any, Any]:
        """Integers in [low, high), or [0, low) when ``high`` is None, as
        ``numpy.random.Generator.integers``.

        Raises:
            TypeError: ``low`` or ``high`` is not an int (floats and arrays are refused), or
                ``dtype`` is not an integer dtype.
            ValueError: ``low >= high``, or a bound does not fit ``dtype``, as numpy.
        """
        lo, hi = _int(low, "low"), None if high is None else _int(high, "high")
        dt = _integer_dtype(dtype, "integers")
        return self._draw(_fill_copied(np.random.Generator.integers, lo, hi, dtype=dt), dt, None)

    def _draw(
        self, fill: _Fill, dtype: np.dtype[Any], values_per_word: int | None
    ) -> np.ndarray[Any, Any]:
        """The region's values of the next stream.

        ``values_per_word`` is how many values one raw word makes when that is fixed (1 for
        float64 uniforms, 2 for float32 ones), so that a block can be entered mid-way; None
        when it varies, and then each block is drawn from its start.
        """
        # numpy checks the arguments on a draw of one value (not on a draw of none). That draw
        # is made before any block's reset, and an error leaves the stream unused.
        fill(self._generator, np.empty(1, dtype))
        out = np.empty(int(np.prod(self._shape)), dtype)
        self._counter[3] = self._stream
        for block, whole, segments in _blocks(self._starts, self._length):
            if whole:  # most of a row chunk: kept tight, this per-block cost is the overhead
                pos = segments[0][2]
                for b in range(block, block + whole):
                    self._seek(b, 0)
                    fill(self._generator, out[pos : pos + BLOCK_SIZE])
                    pos += BLOCK_SIZE
                continue
            first, end = segments[0][0], segments[-1][1]  # segments are in increasing order
            if values_per_word is None:
                start = 0
                self._seek(block, 0)
            else:
                start = first
                self._seek(block, first // values_per_word)
                if first % values_per_word:
                    # a float32 uses the low half of a word first: skip the half before it
                    self._generator.random(1, np.float32)
            if len(segments) == 1 and first == start:
                fill(self._generator, out[segments[0][2] :][: end - first])
                continue
            values = np.empty(end - start, dtype)
            fill(self._generator, values)
            for lo, hi, pos in segments:
                out[pos : pos + hi - lo] = values[lo - start : hi - start]
        self._stream += 1
        return out.reshape(self._shape)

    def _seek(self, block: int, word: int) -> None:
        """Move the generator to raw word ``word`` of ``block`` of the current stream."""
        # Philox increments counter word 0 before it computes 4 words, so counter word 0 at k
        # gives the block's words 4k..4k+3 next.
        self._counter[0] = word >> 2
        self._counter[2] = block
        self._bitgen.state = self._state
        if word & 3:
            self._bitgen.random_raw(word & 3)


def _fill_into(method: Callable[..., Any], dtype: np.dtype[Any]) -> _Fill:
    """The fill of a Generator method that writes its values into ``out=`` itself."""

    def fill(gen: np.random.Generator, out: np.ndarray[Any, Any]) -> None:
        method(gen, dtype=dtype, out=out)

    return fill


def _fill_copied(method: Callable[..., Any], *args: Any, **kwargs: Any) -> _Fill:
    """The fill of a Generator method that has no ``out=``: ``method(gen, *args, size,
    **kwargs)``, its values copied in."""

    def fill(gen: np.random.Generator, out: np.ndarray[Any, Any]) -> None:
        out[...] = method(gen, *args, out.size, **kwargs)

    return fill


def _blocks(
    starts: np.ndarray[Any, Any], length: int
) -> Iterator[tuple[int, int, list[tuple[int, int, int]]]]:
    """The blocks the runs touch, in increasing order, as ``(block, whole, segments)``.

    ``whole > 0``: blocks ``block`` to ``block + whole - 1`` are all in one run, and go to the
    flat output from ``segments[0][2]`` on. ``whole == 0``: only parts of ``block`` are in the
    region, each segment ``(lo, hi, pos)`` saying that the block's values ``lo:hi`` go to
    ``pos:pos + hi - lo`` of the flat output; the segments of all runs in the block come
    together, so the block is drawn once.
    """
    block = -1  # the block the pending segments are of
    segments: list[tuple[int, int, int]] = []
    pos = 0
    for x in starts.tolist():
        end = x + length
        while x < end:
            b, lo = divmod(x, BLOCK_SIZE)
            if lo == 0 and end - x >= BLOCK_SIZE:
                if segments:
                    yield block, 0, segments
                    segments = []
                whole = (end - x) // BLOCK_SIZE
                yield b, whole, [(0, BLOCK_SIZE, pos)]
                pos += whole * BLOCK_SIZE
                x += whole * BLOCK_SIZE
                continue
            hi = min(BLOCK_SIZE, lo + end - x)
            if b != block and segments:
                yield block, 0, segments
                segments = []
            block = b
            segments.append((lo, hi, pos))
            pos += hi - lo
            x += hi - lo
    if segments:
        yield block, 0, segments


def _runs(
    shape: tuple[int, ...], bounds: tuple[tuple[int, int], ...]
) -> tuple[np.ndarray[Any, Any], int]:
    """The region as runs contiguous in flat index: their starts (increasing) and length.

    Trailing axes the region spans whole merge with the axis before them, so a chunk of whole
    rows is a single run.
    """
    extents = [stop - start for start, stop in bounds]
    if 0 in extents:
        return np.zeros(0, np.int64), 0
    # walk in from the last axis: the run spans `axis` (perhaps partly) and all after it (whole)
    axis = len(shape)
    length = 1
    while axis > 0:
        axis -= 1
        length *= extents[axis]
        if extents[axis] != shape[axis]:
            break
    # C-order strides of the whole array, in elements
    strides = [int(np.prod(shape[ax + 1 :], dtype=np.int64)) for ax in range(len(shape))]
    starts = np.full(1, bounds[axis][0] * strides[axis] if shape else 0, np.int64)
    for ax in range(axis - 1, -1, -1):
        start, stop = bounds[ax]
        steps = np.arange(start, stop, dtype=np.int64) * strides[ax]
        starts = (steps[:, None] + starts[None, :]).ravel()
    return starts, length


def _philox_key(seed: object) -> np.ndarray[Any, Any]:
    if isinstance(seed, (list, tuple)):
        words = [_seed_word(w, seed) for w in seed]
        if not words:
            msg = "seed must be a non-negative int or a non-empty sequence of them (got [])"
            raise ValueError(msg)
        entropy: int | list[int] = words
    else:
        entropy = _seed_word(seed, seed)
    return np.random.SeedSequence(entropy).generate_state(2, np.uint64)


def _seed_word(word: object, seed: object) -> int:
    if isinstance(word, bool) or not isinstance(word, (int, np.integer)):
        msg = f"seed must be a non-negative int or a sequence of them (got {seed!r})"
        raise TypeError(msg)
    if word < 0:
        msg = f"seed must be a non-negative int or a sequence of them (got {seed!r})"
        raise ValueError(msg)
    return int(word)


def _check_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)):
        msg = f"shape must be a tuple of non-negative ints (got {shape!r})"
        raise TypeError(msg)
    out = []
    for n in shape:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            msg = f"shape must be a tuple of non-negative ints (got {shape!r})"
            raise TypeError(msg)
        if n < 0:
            msg = f"shape must be a tuple of non-negative ints (got {shape!r})"
            raise ValueError(msg)
        out.append(int(n))
    return tuple(out)


def _check_slices(slices: object, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    if not isinstance(slices, (tuple, list)) or not all(isinstance(s, slice) for s in slices):
        msg = f"slices must be a tuple of slices, one per axis (got {slices!r})"
        raise TypeError(msg)
    if len(slices) != len(shape):
        msg = f"slices must have one slice per axis of shape {shape} (got {slices!r})"
        raise ValueError(msg)
    out = []
    for s, n in zip(slices, shape):
        try:
            start, stop = operator.index(s.start), operator.index(s.stop)
        except TypeError:
            msg = f"slices must have int starts and stops (got {slices!r})"
            raise TypeError(msg) from None
        if s.step not in (None, 1) or not 0 <= start <= stop <= n:
            msg = f"slices must lie within shape {shape} with step 1 (got {slices!r})"
            raise ValueError(msg)
        out.append((start, stop))
    return tuple(out)


def _dtype(dtype: object, method: str) -> np.dtype[Any]:
    try:
        return np.dtype(dtype)  # type: ignore[call-overload,no-any-return]
    except TypeError:
        msg = f"{method}: dtype {dtype!r} is not a numpy dtype"
        raise TypeError(msg) from None


def _float_dtype(dtype: object, method: str) -> np.dtype[Any]:
    dt = _dtype(dtype, method)
    if dt not in _FLOATS:
        msg = f"{method}: dtype must be float32 or float64 (got {dt})"
        raise TypeError(msg)
    return dt


def _integer_dtype(dtype: object, method: str) -> np.dtype[Any]:
    dt = _dtype(dtype, method)
    if dt.kind not in "iu":
        msg = f"{method}: dtype must be an integer dtype (got {dt})"
        raise TypeError(msg)
    return dt


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        msg = f"{name} must be a real number (got {value!r}); arrays are not taken"
        raise TypeError(msg)
    return float(value)


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        msg = f"{name} must be an int (got {value!r}); floats and arrays are not taken"
        raise TypeError(msg)
    return int(value)
