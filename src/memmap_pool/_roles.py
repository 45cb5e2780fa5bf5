"""Roles: how a chunk's region of the job maps to what the kernel sees of an array.

A job is a kernel over a chunk grid plus arrays. Each input has a role, a small frozen
record that travels in the job's spec and turns the chunk's region (one slice per axis of
the grid) into a view of the mapped array. A new access pattern is a new role, not a branch
in the pool, the dispatcher or the worker's loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_ALL = slice(None)


class InputRole:
    """How a kernel sees one input; see the module docstring."""

    def view(self, array: np.ndarray[Any, Any], region: tuple[slice, ...]) -> np.ndarray[Any, Any]:
        """The read-only view of ``array`` the kernel gets for the chunk ``region``."""
        raise NotImplementedError

    def mapped_part(
        self, array: np.ndarray[Any, Any], region: tuple[slice, ...]
    ) -> np.ndarray[Any, Any]:
        """The part of ``array`` (the mapped file) the view shows; for a view that is a
        copy (a padded window) its source. Its pages are released after large chunks."""
        return self.view(array, region)

    def interior(self, shape: tuple[int, ...], region: tuple[slice, ...]) -> tuple[slice, ...]:
        """Slices, one per axis of the view of an input of ``shape``, that locate the
        chunk's own region inside the view (``chunk.interior(k)``)."""
        raise NotImplementedError

    def check_shape(self, k: int, shape: tuple[int, ...], grid_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` if an input of ``shape`` can't play this role (``k``: its
        position in ``inputs``, for the message)."""
        raise NotImplementedError


@dataclass(frozen=True)
class SameRegion(InputRole):
    """The chunk's own region of the input, on the axes the chunks split.

    Along ``axes`` (axes of the job's grid) the input must have the grid's length and is
    sliced like the output; its other axes are seen whole, so an input may have fewer or
    more axes than the output (a per-row weight vector, a stack of images with a trailing
    channel axis).
    """

    axes: tuple[int, ...]

    def view(self, array: np.ndarray[Any, Any], region: tuple[slice, ...]) -> np.ndarray[Any, Any]:
        k = min(array.ndim, len(region))
        axes = self.axes
        return array[tuple(region[a] if a in axes else _ALL for a in range(k))]

    def interior(self, shape: tuple[int, ...], region: tuple[slice, ...]) -> tuple[slice, ...]:
        # The view is the region itself: slices covering all of it.
        k = len(region)
        axes = self.axes
        return tuple(
            slice(0, region[a].stop - region[a].start if a < k and a in axes else n)
            for a, n in enumerate(shape)
        )

    def check_shape(self, k: int, shape: tuple[int, ...], grid_shape: tuple[int, ...]) -> None:
        for axis in self.axes:
            if len(shape) <= axis or shape[axis] != grid_shape[axis]:
                msg = (
                    f"inputs[{k}] has shape {shape}, which does not match the output shape "
                    f"{grid_shape} on axis {axis}: inputs must match the output on the axes "
                    f"the chunks split ({', '.join(map(str, self.axes))})"
                )
                raise ValueError(msg)
