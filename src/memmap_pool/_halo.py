"""Halo inputs: a chunk's region of an input widened by a neighbourhood on every side.

A stencil (a filter, a convolution, a finite difference) needs the elements around its
region. :class:`Halo` says how far (``depth`` per axis) and what lies beyond the array's
edges (``boundary``); :class:`HaloRole` is the role it becomes in a job's spec, and turns a
chunk's region into the kernel's view::

         array's edge
              |<- depth ->|<------ chunk's region ------>|<- depth ->|
    "none":   |...........|##############################|...........|  clipped at the edge
    padded: ..|...........|##############################|...........|  np.pad's values beyond

Inside the array the view is a slice of the worker's read-only mapping of the input file:
no copy. Only a window that reaches beyond an edge is built as a new array, and only its
part beyond the edge is computed; numpy's ``np.pad`` is the reference for those values.
"""

from __future__ import annotations

import itertools
import numbers
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._chunks import non_negative_index
from ._roles import InputRole, SameRegion

BOUNDARIES = ("none", "edge", "reflect", "symmetric", "wrap")
"""Boundary names: "none" clips views at the array's edges; the others are ``np.pad``'s modes
of the same names (a number pads with that constant)."""


class Halo:
    """An input seen with its neighbourhood: the chunk's region widened by ``depth``.

    Pass it in ``inputs=`` in place of the array it wraps. The kernel then gets, for each
    chunk, the window ``region - depth .. region + depth`` of the input, read-only; inside
    the array it is a view of the shared file (no copy), and beyond the array's edges
    ``boundary`` says what it holds. ``chunk.interior(k)`` locates the chunk's own region in
    that view.

    Args:
        array: an array, an ``np.memmap`` or the path of a ``.npy`` file, as ``inputs=``
            accepts.
        depth: how many elements beyond the region on each side: an int for every axis of
            the input (as ``np.pad`` takes one), a tuple with one int per axis, or a dict
            ``{axis: depth}`` (other axes 0). On an axis the chunks don't split the view is
            the whole axis, padded at both ends as ``boundary`` says.
        boundary: what lies beyond the array's edges: ``"none"`` (views are clipped at the
            edges, so edge views are smaller), ``"edge"``, ``"reflect"``, ``"symmetric"``,
            ``"wrap"`` (``np.pad``'s modes), or a number (constant padding, cast to the
            input's dtype).

    Raises:
        TypeError: ``depth`` is not an int, a tuple of ints or a dict of ints; ``boundary``
            is neither a name nor a number; ``array`` is itself a ``Halo``.
        ValueError: a negative depth, or an unknown boundary name. A depth for an axis the
            input lacks, and a constant the input's dtype can't hold exactly, are
            ``ValueError`` s when the job is submitted (the input's shape and dtype are
            known then), before any work starts.

    Example:
        >>> inputs = [Halo(img, depth=16, boundary="symmetric")]  # doctest: +SKIP
    """

    __slots__ = ("array", "boundary", "depth")

    def __init__(self, array: Any, depth: Any, boundary: Any = "none") -> None:
        if isinstance(array, Halo):
            msg = "Halo(array, ...) wraps an array or a .npy path, not another Halo"
            raise TypeError(msg)
        self.array = array
        self.depth: int | tuple[int, ...] | dict[int, int] = _check_depth(depth)
        self.boundary: str | numbers.Number = _check_boundary(boundary)

    def __repr__(self) -> str:
        what = self.array if isinstance(self.array, str) else type(self.array).__name__
        return f"Halo({what!r}, depth={self.depth!r}, boundary={self.boundary!r})"

    def depths(self, ndim: int, k: int) -> tuple[int, ...]:
        """The depth along each of the ``ndim`` axes of input ``k``.

        Raises:
            ValueError: ``depth`` does not fit an input of ``ndim`` axes.
        """
        return _depth_per_axis(self.depth, ndim, k)

    def role(
        self, k: int, shape: tuple[int, ...], dtype: np.dtype[Any], axes: tuple[int, ...]
    ) -> HaloRole:
        """The role of this halo for input ``k`` of ``shape`` and ``dtype``, in a job whose
        chunks split ``axes``.

        Raises:
            ValueError: a depth names an axis the input lacks; a constant boundary the
                dtype can't hold; a padded boundary on an empty axis.
        """
        depths = self.depths(len(shape), k)
        boundary = self.boundary
        fill = None
        if not isinstance(boundary, str):
            fill = _constant(boundary, dtype, k)
            mode = "constant"
        else:
            mode = boundary
        if mode not in ("none", "constant"):
            for axis, (n, d) in enumerate(zip(shape, depths)):
                if n == 0 and d > 0:
                    msg = (
                        f"inputs[{k}]: boundary={mode!r} can't extend axis {axis}, which is "
                        "empty; use a constant boundary or depth 0 on that axis"
                    )
                    raise ValueError(msg)
        return HaloRole(axes=axes, depth=depths, mode=mode, fill=fill)


def _check_depth(depth: object) -> int | tuple[int, ...] | dict[int, int]:
    def one(value: object, where: str) -> int:
        return non_negative_index(
            value, lambda shown: f"Halo depth{where} must be a non-negative int (got {shown})"
        )

    if isinstance(depth, Mapping):
        out = {}
        for axis, value in depth.items():
            if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
                msg = f"Halo depth: the keys of a dict must be axis numbers (got {axis!r})"
                raise TypeError(msg)
            out[int(axis)] = one(value, f"[{axis!r}]")
        return out
    if isinstance(depth, Sequence) and not isinstance(depth, (str, bytes)):
        return tuple(one(value, f"[{i}]") for i, value in enumerate(depth))
    if isinstance(depth, np.ndarray) and depth.ndim == 1:
        return tuple(one(value, f"[{i}]") for i, value in enumerate(depth.tolist()))
    try:
        return one(depth, "")
    except TypeError:
        msg = (
            "Halo depth must be an int, a tuple with one int per axis, or a dict "
            f"{{axis: depth}} (got {depth!r})"
        )
        raise TypeError(msg) from None


def _check_boundary(boundary: object) -> str | numbers.Number:
    if isinstance(boundary, str):
        if boundary not in BOUNDARIES:
            names = ", ".join(repr(b) for b in BOUNDARIES)
            msg = f"Halo boundary must be one of {names} or a number (got {boundary!r})"
            raise ValueError(msg)
        return boundary
    if isinstance(boundary, (bool, np.bool_)) or not isinstance(boundary, numbers.Number):
        names = ", ".join(repr(b) for b in BOUNDARIES)
        msg = f"Halo boundary must be one of {names} or a number (got {boundary!r})"
        raise TypeError(msg)
    return boundary


def _depth_per_axis(
    depth: int | tuple[int, ...] | dict[int, int], ndim: int, k: int
) -> tuple[int, ...]:
    if isinstance(depth, int):
        return (depth,) * ndim
    if isinstance(depth, tuple):
        if len(depth) != ndim:
            msg = (
                f"inputs[{k}]: Halo depth {depth} has {len(depth)} entries but the input has "
                f"{ndim} axes; give one depth per axis (0 for none), or a dict {{axis: depth}}"
            )
            raise ValueError(msg)
        return depth
    out = [0] * ndim
    for axis, d in depth.items():
        a = axis + ndim if axis < 0 else axis
        if not 0 <= a < ndim:
            msg = (
                f"inputs[{k}]: Halo depth {depth} names axis {axis}, but the input has {ndim} axes"
            )
            raise ValueError(msg)
        out[a] = d
    return tuple(out)


def _constant(value: Any, dtype: np.dtype[Any], k: int) -> Any:
    """``value`` as an element of ``dtype``, if the dtype holds it exactly."""
    try:
        with np.errstate(all="ignore"):
            cast = np.array(value).astype(dtype)
            back = cast.astype(np.result_type(value, cast))
        exact = bool(np.array_equal(back, np.array(value), equal_nan=True))
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact:
        msg = (
            f"inputs[{k}]: Halo boundary={value!r} can't be held exactly by the input's "
            f"dtype {dtype}; give a value of that dtype (e.g. np.{dtype.name}(...)) or "
            "another boundary"
        )
        raise ValueError(msg)
    return cast[()]


@dataclass(frozen=True)
class HaloRole(InputRole):
    """The window ``region ± depth`` of an input (see the module docstring).

    ``axes``: the job grid's axes the chunks split (the input is sliced along those, and
    seen whole, padded, along the others); ``depth``: one per axis of the input; ``mode``:
    "none", "constant" or an ``np.pad`` mode; ``fill``: the constant.
    """

    axes: tuple[int, ...]
    depth: tuple[int, ...]
    mode: str
    fill: Any = None

    def _window(
        self, shape: tuple[int, ...], region: tuple[slice, ...]
    ) -> tuple[list[int], list[int]]:
        """First and past-the-end index of the window along each axis of the input, in
        the input's coordinates (beyond ``[0, n)`` where the window is padded)."""
        lo, hi = [], []
        axes = self.axes
        clip = self.mode == "none"
        for axis, (n, d) in enumerate(zip(shape, self.depth)):
            if axis < len(region) and axis in axes:
                a, b = region[axis].start - d, region[axis].stop + d
            else:
                a, b = -d, n + d
            if clip:
                a, b = max(a, 0), min(b, n)
            lo.append(a)
            hi.append(b)
        return lo, hi

    def view(self, array: np.ndarray[Any, Any], region: tuple[slice, ...]) -> np.ndarray[Any, Any]:
        shape = array.shape
        lo, hi = self._window(shape, region)
        if all(a >= 0 for a in lo) and all(b <= n for b, n in zip(hi, shape)):
            view = array[tuple(slice(a, b) for a, b in zip(lo, hi))]
            view.flags.writeable = False
            return view
        return _padded(array, lo, hi, self.mode, self.fill)

    def inside_window(
        self, shape: tuple[int, ...], region: tuple[slice, ...]
    ) -> tuple[slice, ...] | None:
        """The window of ``region`` as slices of an input of ``shape`` when it lies inside
        the input (``view`` is then a plain slice), or None when it must be padded."""
        lo, hi = self._window(shape, region)
        if all(a >= 0 for a in lo) and all(b <= n for b, n in zip(hi, shape)):
            return tuple(slice(a, b) for a, b in zip(lo, hi))
        return None

    def mapped_part(
        self, array: np.ndarray[Any, Any], region: tuple[slice, ...]
    ) -> np.ndarray[Any, Any]:
        lo, hi = self._window(array.shape, region)
        return array[
            tuple(slice(max(a, 0), max(min(b, n), 0)) for a, b, n in zip(lo, hi, array.shape))
        ]

    def interior(self, shape: tuple[int, ...], region: tuple[slice, ...]) -> tuple[slice, ...]:
        lo, _hi = self._window(shape, region)
        out = []
        for axis, (n, a) in enumerate(zip(shape, lo)):
            if axis < len(region) and axis in self.axes:
                start, stop = region[axis].start, region[axis].stop
            else:
                start, stop = 0, n
            out.append(slice(start - a, stop - a))
        return tuple(out)

    def check_shape(self, k: int, shape: tuple[int, ...], grid_shape: tuple[int, ...]) -> None:
        SameRegion(self.axes).check_shape(k, shape, grid_shape)


def source_index(positions: np.ndarray[Any, Any], n: int, mode: str) -> np.ndarray[Any, Any]:
    """Where ``np.pad(a, ..., mode)`` takes the element at each of ``positions`` (indices
    along an axis of length ``n``, negative or ``>= n`` beyond the edges) from in ``a``.

    Each mode is periodic beyond the edges, however far: "wrap" with period ``n``,
    "symmetric" (the edge element repeated) with ``2n``, "reflect" (not repeated) with
    ``2n - 2``; this is what ``np.pad`` gives for pad widths larger than the axis too.
    """
    if mode == "edge":
        clipped: np.ndarray[Any, Any] = np.clip(positions, 0, n - 1)
        return clipped
    if mode == "wrap":
        return positions % n
    if mode == "symmetric":
        q = positions % (2 * n)
        return np.where(q < n, q, 2 * n - 1 - q)
    if mode == "reflect":
        if n == 1:
            return np.zeros_like(positions)
        q = positions % (2 * n - 2)
        return np.where(q < n, q, 2 * n - 2 - q)
    msg = f"unknown padding mode {mode!r}"
    raise ValueError(msg)


_scratches = threading.local()
"""Per thread: the padded window made last for each input and window shape."""


def _scratch(array: np.ndarray[Any, Any], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """An array of ``shape`` for a padded window of ``array``: the one made for the previous
    chunk when nothing references it any more, else a new one.

    A new array of a few MiB is fresh memory that every chunk would fault in page by page
    (an ``iterate`` step over a padded state would pay it for the whole state at every step);
    reusing the last one costs nothing. One that a kernel kept (returned, stored, viewed) is
    left alone.
    """
    cache: dict[tuple[int, tuple[int, ...]], np.ndarray[Any, Any]] | None = getattr(
        _scratches, "arrays", None
    )
    if cache is None:
        cache = _scratches.arrays = {}
    key = (id(array), shape)
    reused = cache.get(key)
    # Free when only the cache (and getrefcount's own argument) refer to it.
    if reused is not None and reused.dtype == array.dtype and sys.getrefcount(reused) <= 2:
        reused.flags.writeable = True
        return reused
    if len(cache) >= SCRATCH_KEPT:
        cache.clear()  # windows of jobs that ended: dropped with their memory
    made = np.empty(shape, dtype=array.dtype)
    cache[key] = made
    return made


SCRATCH_KEPT = 8
"""Padded windows kept per thread (one per halo input and window shape of recent chunks)."""


def _padded(
    array: np.ndarray[Any, Any], lo: list[int], hi: list[int], mode: str, fill: Any
) -> np.ndarray[Any, Any]:
    """The window ``[lo, hi)`` of ``np.pad(array, ..., mode)``, built from the window's part
    inside the array (one copy) and its strips beyond the edges (only those are computed).

    Padding is separable: the padded element at ``(i0, i1, ...)`` is
    ``array[f0(i0), f1(i1), ...]`` with ``f`` the mode's :func:`source_index`. Strips are
    filled axis by axis: along axis ``a``, the positions beyond the edges, over the whole
    window on the axes before ``a`` and the inside part on the axes after it.
    """
    shape = array.shape
    out = _scratch(array, tuple(b - a for a, b in zip(lo, hi)))
    inside_src = [slice(max(a, 0), max(min(b, n), max(a, 0))) for a, b, n in zip(lo, hi, shape)]
    inside_dst = [slice(s.start - a, s.stop - a) for s, a in zip(inside_src, lo)]
    out[tuple(inside_dst)] = array[tuple(inside_src)]
    ndim = len(shape)
    for axis in range(ndim):
        a, b, n = lo[axis], hi[axis], shape[axis]
        strips = [(a, min(b, 0)), (max(a, n), b)]
        for p0, p1 in strips:
            if p1 <= p0:
                continue
            dst = (
                *(slice(None) for _ in range(axis)),
                slice(p0 - a, p1 - a),
                *inside_dst[axis + 1 :],
            )
            if mode == "constant":
                out[dst] = fill
                continue
            index = [
                *(source_index(np.arange(lo[j], hi[j]), shape[j], mode) for j in range(axis)),
                source_index(np.arange(p0, p1), n, mode),
                *(np.arange(s.start, s.stop) for s in inside_src[axis + 1 :]),
            ]
            out[dst] = array[np.ix_(*index)]
    out.flags.writeable = False
    return out


def padded_shape(shape: tuple[int, ...], pad: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a state stored with ``pad`` extra elements at both ends of each axis."""
    return tuple(n + 2 * p for n, p in zip(shape, pad))


BorderCopies = list[tuple[tuple[Any, ...], tuple[Any, ...]]]
"""Assignments ``padded[dst] = padded[src]`` that refresh part of a padded state's border."""


def border_copies(
    shape: tuple[int, ...], pad: tuple[int, ...], region: tuple[slice, ...], mode: str
) -> BorderCopies:
    """The copies that write the border cells of a padded state (``pad`` elements beyond
    both ends of each axis of a state of ``shape``) whose values come from ``region``, for
    :func:`refresh_border`. They depend on the geometry only, so a worker computes them once
    per chunk and replays them at every step."""
    per_axis: list[tuple[slice, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None]] = []
    for n, p, r in zip(shape, pad, region):
        inside = slice(r.start + p, r.stop + p)
        border = None
        if p:
            positions = np.concatenate([np.arange(-p, 0), np.arange(n, n + p)])
            sources = source_index(positions, n, mode)
            mine = (sources >= r.start) & (sources < r.stop)
            if mine.any():
                border = (positions[mine] + p, sources[mine] + p)
        per_axis.append((inside, border))
    copies: BorderCopies = []
    # One box per choice of "inside" or "beyond an edge" on each axis, at least one beyond.
    for choice in itertools.product((False, True), repeat=len(per_axis)):
        if not any(choice) or any(c and b is None for c, (_, b) in zip(choice, per_axis)):
            continue
        beyond_axes = [a for a, c in enumerate(choice) if c]
        dst: list[Any] = []
        src: list[Any] = []
        for axis, (inside, border) in enumerate(per_axis):
            if not choice[axis]:
                dst.append(inside)
                src.append(inside)
                continue
            assert border is not None
            # Index arrays on several axes select their outer product (as np.ix_ would);
            # both sides share one layout, so the assignment pairs cells correctly.
            rank = beyond_axes.index(axis)
            form = [1] * len(beyond_axes)
            form[rank] = -1
            dst.append(border[0].reshape(form))
            src.append(border[1].reshape(form))
        copies.append((tuple(dst), tuple(src)))
    return copies


def refresh_border(padded: np.ndarray[Any, Any], copies: BorderCopies) -> None:
    """Write the border cells of a padded state that :func:`border_copies` names for a
    region, once the region has been written.

    Every border cell is ``state[f0(i0), f1(i1), ...]`` with ``f`` the mode's
    :func:`source_index` (identity inside the state), so it has exactly one source element,
    and the chunk that owns that element writes it: chunks that partition the state fill the
    whole border, each cell once, without reading what another chunk writes.
    """
    for dst, src in copies:
        padded[dst] = padded[src]


def fill_border(padded: np.ndarray[Any, Any], pad: tuple[int, ...], value: Any) -> None:
    """Set every cell of a padded state's border to ``value`` (a constant boundary)."""
    for axis, p in enumerate(pad):
        if p:
            lead = (slice(None),) * axis
            padded[(*lead, slice(0, p))] = value
            padded[(*lead, slice(padded.shape[axis] - p, None))] = value
