"""The demo job: a Mandelbrot image computed on every core into a ``.npy``, then written as a
PNG.

Two chunked jobs run on one pool: the first computes a smooth escape time per pixel into a
persistent ``.npy`` (float32); the second reads it back as an input, by reference, and turns
it into RGB pixels in a temporary array. The PNG writer streams those pixels through zlib a
block of rows at a time, so no step holds the whole image in the parent's memory.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._chunks import Chunk
from ._kernel import kernel

log = logging.getLogger("memmap_pool")

MAX_ITER = 200
"""Iterations before a point counts as inside the set. Enough for a detailed boundary at the
default zoom; the time per pixel grows with it only near the boundary."""

CENTER = (-0.745, 0.0)
WIDTH = 3.0
"""The view: the whole set, slightly off centre so the seahorse valley is in the middle."""

BAILOUT = 256.0
"""Escape radius squared. Larger than the textbook 4 so that the smooth (fractional)
iteration count is accurate and the colours show no bands."""

PNG_ROWS_PER_BLOCK = 256
"""Rows of pixels compressed at a time: bounds the parent's memory while writing the PNG."""

PNG_COMPRESSION = 6


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


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def _png_idat(rgb: np.ndarray[Any, Any], level: int) -> Iterator[bytes]:
    height, wide, _ = rgb.shape
    compressor = zlib.compressobj(level)
    for top in range(0, height, PNG_ROWS_PER_BLOCK):
        block = rgb[top : top + PNG_ROWS_PER_BLOCK]
        rows = np.zeros((block.shape[0], 1 + wide * 3), dtype=np.uint8)  # filter byte 0
        rows[:, 1:] = block.reshape(block.shape[0], wide * 3)
        data = compressor.compress(rows.tobytes())
        if data:
            yield _png_chunk(b"IDAT", data)
    yield _png_chunk(b"IDAT", compressor.flush())


def write_png(path: str | os.PathLike[str], rgb: np.ndarray[Any, Any], level: int = 6) -> None:
    """Write ``rgb`` (rows x columns x 3, uint8) as an 8-bit RGB PNG, with zlib alone.

    Args:
        path: the file to write.
        rgb: the pixels; any array, including a memmap (read a block of rows at a time).
        level: zlib compression level, 0 to 9.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        msg = f"write_png needs a rows x columns x 3 uint8 array (got {rgb.shape} {rgb.dtype})"
        raise ValueError(msg)
    height, wide, _ = rgb.shape
    # IHDR: width, height, bit depth 8, colour type 2 (RGB), deflate, adaptive filters,
    # no interlace.
    ihdr = struct.pack(">IIBBBBB", wide, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_png_chunk(b"IHDR", ihdr))
        for piece in _png_idat(rgb, level):
            f.write(piece)
        f.write(_png_chunk(b"IEND", b""))


@dataclass(frozen=True)
class DemoResult:
    """What the demo made and how fast.

    Attributes:
        npy: path of the escape times (float32 ``.npy``).
        png: path of the image.
        shape: pixels, (rows, columns).
        workers: workers of the pool.
        chunks: chunks of the Mandelbrot job.
        compute_seconds: wall time of the Mandelbrot job.
        colour_seconds: wall time of the colouring job.
        png_seconds: time to compress and write the PNG.
        bytes_written: bytes of the ``.npy`` data.
    """

    npy: str
    png: str
    shape: tuple[int, int]
    workers: int
    chunks: int
    compute_seconds: float
    colour_seconds: float
    png_seconds: float
    bytes_written: int

    @property
    def mpixels_per_second(self) -> float:
        """Millions of pixels computed per second by the Mandelbrot job."""
        pixels = self.shape[0] * self.shape[1]
        return pixels / self.compute_seconds / 1e6 if self.compute_seconds > 0 else 0.0

    @property
    def gb_per_second(self) -> float:
        """Gigabytes (1e9 bytes) of output written per second by the Mandelbrot job."""
        return self.bytes_written / self.compute_seconds / 1e9 if self.compute_seconds else 0.0


def run_demo(
    size: int,
    out_dir: str | os.PathLike[str],
    workers: int | None = None,
    max_iter: int = MAX_ITER,
    progress: bool | str = False,
) -> DemoResult:
    """Compute a ``size`` x ``size`` Mandelbrot image into ``out_dir``.

    Writes ``mandelbrot.npy`` (the escape times) and ``mandelbrot.png`` there.

    Args:
        size: pixels per side.
        out_dir: directory for the two files (created if missing).
        workers: workers of the pool (default: every usable CPU).
        max_iter: iterations before a point counts as inside the set.
        progress: a progress bar per job (see ``map_chunks``).

    Returns:
        Where the files are and how long each step took.
    """
    from ._pool import MemmapPool

    if size < 1:
        msg = f"size must be a positive number of pixels (got {size})"
        raise ValueError(msg)
    os.makedirs(out_dir, exist_ok=True)
    npy = os.path.join(os.fspath(out_dir), "mandelbrot.npy")
    png = os.path.join(os.fspath(out_dir), "mandelbrot.png")
    shape = (size, size)
    with MemmapPool(workers) as pool:
        # Rows of pixels: a chunk is a contiguous band of the file, and the colouring job
        # can read the same band of the escape times as its input.
        rows = max(1, min(size, -(-size // (pool.max_workers * 16))))
        job = pool.submit_chunks(
            mandelbrot,
            shape,
            chunks=rows,
            out=npy,
            kwargs={"max_iter": max_iter},
            progress=progress,
            name="mandelbrot",
        )
        escape = pool._wait_interruptibly(job)
        stats = job.stats
        t0 = time.perf_counter()
        rgb = pool.map_chunks(
            colourise,
            (size, size, 3),
            "uint8",
            chunks=rows,
            inputs=[npy],
            kwargs={"max_iter": max_iter},
            progress=progress,
            name="colour",
        )
        colour_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_png(png, rgb, PNG_COMPRESSION)
        png_seconds = time.perf_counter() - t0
        del rgb, escape
        result = DemoResult(
            npy=npy,
            png=png,
            shape=shape,
            workers=pool.max_workers,
            chunks=stats.chunks,
            compute_seconds=stats.wall_time,
            colour_seconds=colour_seconds,
            png_seconds=png_seconds,
            bytes_written=stats.bytes_written,
        )
    log.info("demo: %s", result)
    return result
