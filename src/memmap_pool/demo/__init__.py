"""The demo job: a Mandelbrot image computed on every core into a ``.npy``, then written as a
PNG (``memmap-pool demo``).

Two chunked jobs run on one pool: the first computes a smooth escape time per pixel into a
persistent ``.npy`` (float32); the second reads it back as an input, by reference, and turns
it into RGB pixels in a temporary array. The PNG writer streams those pixels through zlib a
block of rows at a time, so no step holds the whole image in the parent's memory.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from ._mandelbrot import MAX_ITER, colourise, mandelbrot
from ._png import PNG_COMPRESSION, write_png

log = logging.getLogger("memmap_pool")

__all__ = ["MAX_ITER", "DemoResult", "colourise", "mandelbrot", "run_demo", "write_png"]


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
    from .._pool import MemmapPool

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
        escape = job.wait()
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
