"""The demo's kernels: a smooth Mandelbrot escape time per pixel, and its colouring."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._chunks import Chunk
from .._kernel import kernel

MAX_ITER = 200
"""Iterations before a point counts as inside the set. Enough for a detailed boundary at the
default zoom; the time per pixel grows with it only near the boundary."""

CENTER = (-0.745, 0.0)
WIDTH = 3.0
"""The view: the whole set, slightly off centre so the seahorse valley is in the middle."""

BAILOUT = 256.0
"""Escape radius squared. Larger than the textbook 4 so that the smooth (fractional)
iteration count is accurate and the colours show no bands."""


@kernel(dtype="float32")
def mandelbrot(
    out: np.ndarray[Any, Any],
    chunk: Chunk,
    max_iter: int = MAX_ITER,
    center: tuple[float, float] = CENTER,
    width: float = WIDTH,
) -> None:
    """Smooth escape time of each pixel of ``chunk``'s region; ``max_iter`` inside the set.

    The image has ``chunk.shape`` pixels (rows, columns) and spans ``width`` along the real
    axis around ``center``; pixels are square.
    """
    height, wide = chunk.shape
    rows, cols = chunk.slices[0], chunk.slices[1]
    step = width / wide
    # Row 0 is the top of the image: imaginary parts decrease down the rows.
    im = center[1] - (np.arange(rows.start, rows.stop) + 0.5 - height / 2) * step
    re = center[0] + (np.arange(cols.start, cols.stop) + 0.5 - wide / 2) * step
    c = (re[None, :] + 1j * im[:, None]).ravel()
    escape = np.full(c.shape, max_iter, dtype=np.float32)

    # Points of the main cardioid and of the period-2 bulb never escape: skip them, which
    # removes most of the work inside the set.
    x, y = c.real, c.imag
    q = (x - 0.25) ** 2 + y * y
    inside = (q * (q + x - 0.25) <= 0.25 * y * y) | ((x + 1) ** 2 + y * y <= 1 / 16)
    idx = np.flatnonzero(~inside)
    c = c[idx]
    z = np.zeros_like(c)
    for n in range(max_iter):
        z = z * z + c
        mag2 = z.real * z.real + z.imag * z.imag
        gone = mag2 > BAILOUT
        if gone.any():
            # The fractional part interpolates between iterations: log2(log|z|) grows by
            # one per iteration once |z| is large.
            escape[idx[gone]] = np.maximum(n + 1 - np.log2(0.5 * np.log(mag2[gone])), 0.0)
            keep = ~gone
            idx, z, c = idx[keep], z[keep], c[keep]
            if not idx.size:
                break
    out[...] = escape.reshape(out.shape)


# A palette of control points on a cycle (position, RGB): deep blue, sky, white, gold, black.
_PALETTE_AT = np.array([0.0, 0.16, 0.42, 0.6425, 0.8575, 1.0])
_PALETTE_RGB = np.array(
    [[0, 7, 100], [32, 107, 203], [237, 255, 255], [255, 170, 0], [0, 2, 0], [0, 7, 100]],
    dtype=np.float64,
)


def colourise(
    out: np.ndarray[Any, Any],
    chunk: Chunk,
    escape: np.ndarray[Any, Any],
    max_iter: int = MAX_ITER,
) -> None:
    """RGB pixels (``out``: rows x columns x 3, uint8) of the escape times ``escape``."""
    cols = chunk.slices[1]
    e = np.asarray(escape[:, cols], dtype=np.float64)
    # A logarithmic scale spreads the many low escape times near the edge of the view and
    # the few high ones near the set over the same palette cycle.
    t = np.log1p(e) / np.log1p(max_iter) * 3.0 % 1.0
    for k in range(3):
        out[..., k] = np.interp(t, _PALETTE_AT, _PALETTE_RGB[:, k])
    out[e >= max_iter] = 0  # the set itself is black
