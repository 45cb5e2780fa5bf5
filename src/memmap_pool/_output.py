"""``Output``: one of several arrays a kernel writes (``outputs=[Output(...), ...]``)."""

from __future__ import annotations

from typing import Any

from ._chunks import normalize_dtype


class Output:
    """One output of a job that makes several: its dtype, shape and where it goes.

    The kernel receives a tuple of writable views, one per output in the order given, as its
    first argument, and ``map_chunks`` returns a tuple of arrays in the same order.

    Args:
        dtype: the output's dtype (a subarray dtype such as ``"3f4"`` adds its axes as
            trailing axes, as numpy does).
        shape: the output's shape: the call's ``shape`` (the default), optionally followed
            by trailing axes (a per-pixel RGB output beside a mask). Chunks split only the
            call's axes; the trailing axes are seen whole.
        out: what ``out=`` means for a single output: None for a temporary array, a
            ``.npy`` path for a persistent one (``resume=True`` needs every output to be
            one), or a writable ``np.memmap`` updated in place.
        order: "C" or "F"; default: the call's ``order``.

    Raises:
        ValueError: (when the job is submitted, before any work) a shape that does not
            start with the call's shape, or an ``out`` that does not fit, as for ``out=``.
        TypeError: a bad dtype, or ``outputs=`` given together with ``dtype=``/``out=``.

    Example:
        >>> mean, var = pool.map_chunks(stats, img.shape, outputs=[  # doctest: +SKIP
        ...     Output("float32"), Output("float32", out="var.npy")])
    """

    __slots__ = ("dtype", "order", "out", "shape")

    def __init__(self, dtype: Any, *, shape: Any = None, out: Any = None, order: Any = None):
        self.dtype = normalize_dtype(dtype)
        self.shape = shape
        self.out = out
        self.order = order

    def __repr__(self) -> str:
        parts = [repr(self.dtype)]
        for key in ("shape", "out", "order"):
            value = getattr(self, key)
            if value is not None:
                shown = (
                    type(value).__name__ if key == "out" and not isinstance(value, str) else value
                )
                parts.append(f"{key}={shown!r}")
        return f"Output({', '.join(parts)})"
