"""The ``@kernel`` decorator: a chunk kernel with defaults for ``map_chunks``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, overload

import numpy as np

from ._chunks import Chunk, normalize_dtype, normalize_order


class Kernel:
    """A chunk kernel: ``fn(out, chunk, *inputs, *args, **kwargs)`` plus the defaults that
    ``map_chunks`` uses when a call does not give them.

    Calling it runs the function directly, so it can be unit-tested on an ordinary array
    without a pool; ``chunk`` may be left out, and then describes the whole array::

        @kernel(dtype="float32")
        def ramp(out, chunk):
            out[:] = np.arange(chunk.slices[0].start, chunk.slices[0].stop)[:, None]

        test = np.empty((4, 3), "float32")
        ramp(test)                     # chunk covers the whole array
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        dtype: Any = None,
        chunks: Any = None,
        order: str | None = None,
    ) -> None:
        if not callable(fn):
            msg = f"@kernel decorates a function (got {fn!r})"
            raise TypeError(msg)
        self.fn = fn
        self.dtype = None if dtype is None else normalize_dtype(dtype)
        self.chunks = chunks
        self.order = None if order is None else normalize_order(order)
        functools.update_wrapper(self, fn)

    def __call__(
        self, out: np.ndarray[Any, Any], chunk: Chunk | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        if chunk is None:
            chunk = Chunk.covering(out)
        return self.fn(out, chunk, *args, **kwargs)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"<kernel {name} dtype={self.dtype} chunks={self.chunks!r}>"


@overload
def kernel(fn: Callable[..., Any], /) -> Kernel: ...


@overload
def kernel(
    *, dtype: Any = None, chunks: Any = None, order: str | None = None
) -> Callable[[Callable[..., Any]], Kernel]: ...


def kernel(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    dtype: Any = None,
    chunks: Any = None,
    order: str | None = None,
) -> Kernel | Callable[[Callable[..., Any]], Kernel]:
    """Mark a function as a chunk kernel, optionally with defaults for ``map_chunks``.

    Usable bare (``@kernel``) or with defaults (``@kernel(dtype="float32", chunks=256)``).
    A call to ``map_chunks`` that gives ``dtype``, ``chunks`` or ``order`` overrides them.

    Args:
        fn: the function, when used bare.
        dtype: the output dtype to use when the call gives none.
        chunks: the chunking to use when the call gives none ("auto", int or tuple).
        order: the output layout to use when the call gives none ("C" or "F").
    """
    if fn is not None:
        return Kernel(fn, dtype=dtype, chunks=chunks, order=order)

    def decorate(f: Callable[..., Any]) -> Kernel:
        return Kernel(f, dtype=dtype, chunks=chunks, order=order)

    return decorate
