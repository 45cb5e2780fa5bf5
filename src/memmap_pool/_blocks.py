"""``map_blocks``: functions that return their block instead of writing into ``out``.

The pool runs :class:`BlockKernel` as an ordinary chunk kernel. In the worker it calls the
user's function on the chunk's blocks and writes what comes back into the chunk's region of
the shared output, trimming the halo when the result has the padded block's shape. The
result never travels to the parent.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._chunks import Chunk, describe_region
from ._halo import Halo
from ._npy import read_npy


class BlockKernel:
    """Call ``fn(*blocks, *args, **kwargs)`` (with ``chunk=`` when ``fn`` takes it) and write
    its result into ``out``; see the module docstring."""

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        pass_chunk: bool,
    ) -> None:
        self.fn = fn
        self.name = name
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.pass_chunk = pass_chunk

    def __call__(self, out: np.ndarray[Any, Any], chunk: Chunk, *blocks: Any) -> None:
        kwargs = {**self.kwargs, "chunk": chunk} if self.pass_chunk else self.kwargs
        result = self.fn(*blocks, *self.args, **kwargs)
        where = f"chunk {chunk.index} {describe_region(chunk.slices)}"
        if result is None:
            msg = (
                f"map_blocks: {self.name} returned None for {where}; it must return the "
                "block's result as an array (to write into the output in place, use "
                "map_chunks)"
            )
            raise ValueError(msg)
        value = np.asarray(result)
        padded = blocks[0].shape
        if value.shape == padded:
            value = value[chunk.interior(0)]  # the halo is trimmed
        elif value.shape != out.shape:
            msg = (
                f"map_blocks: {self.name} returned an array of shape {value.shape} for "
                f"{where}; it must have the shape of the block it was given, {padded} (the "
                f"halo is then trimmed), or of the chunk's region, {out.shape}"
            )
            raise ValueError(msg)
        try:
            np.copyto(out, value, casting="same_kind")
        except TypeError:
            msg = (
                f"map_blocks: {self.name} returned {value.dtype} values for {where}, which "
                f"can't be stored in the {out.dtype} output without changing their kind; "
                f"pass dtype={value.dtype.name!r} to map_blocks"
            )
            raise TypeError(msg) from None


def takes_chunk(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` has a parameter named ``chunk`` that can be passed by keyword."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get("chunk")
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def block_inputs(arrays: Sequence[Any], depth: Any, boundary: Any) -> list[Any]:
    """The job's inputs: each array seen with ``depth`` and ``boundary``, unless it is a
    :class:`Halo` of its own.

    Raises:
        TypeError, ValueError: a bad ``depth`` or ``boundary`` (as ``Halo`` raises them).
    """
    template = Halo(None, depth, boundary)  # checks them once, whether used or not
    plain = template.depth == 0 and template.boundary == "none"
    return [
        x if isinstance(x, Halo) or plain else Halo(x, template.depth, template.boundary)
        for x in arrays
    ]


def first_array_layout(array: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype of the first array of ``map_blocks``: the output's defaults.

    Raises:
        TypeError: it is not an array or a ``.npy`` path.
        FileNotFoundError, ValueError: the path names no readable ``.npy`` file.
    """
    if isinstance(array, Halo):
        array = array.array
    if isinstance(array, np.ndarray):
        return tuple(array.shape), array.dtype
    if isinstance(array, (str, os.PathLike)):
        path = os.fspath(array)
        if not os.path.exists(path):
            msg = f"map_blocks: no such file: {path!r}"
            raise FileNotFoundError(msg)
        info = read_npy(path, "arrays[0]")
        return info.shape, info.dtype
    msg = (
        "map_blocks: the arrays must be numpy arrays, np.memmaps, .npy paths or Halo(...) "
        f"(got {type(array).__name__} first)"
    )
    raise TypeError(msg)
