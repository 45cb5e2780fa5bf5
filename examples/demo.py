"""The demo through the Python API: what ``memmap-pool demo`` does, in a few lines.

A Mandelbrot image is computed on every core straight into a ``.npy`` file: each worker writes
its own bands of rows, and what the workers receive is batches of chunk indices (the kernel
travels once per job, in the job's spec file). A second job reads that ``.npy`` by reference as
its input and colours it into RGB pixels, which are written as a PNG.
``submit_chunks`` returns a ``Job`` (a ``concurrent.futures.Future``) with the job's statistics.

Run it with::

    python examples/demo.py [--size 2048] [--out memmap-pool-demo] [--workers N]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from memmap_pool import MemmapPool
from memmap_pool.demo import colourise, mandelbrot, write_png  # the demo's kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="pixels per side")
    parser.add_argument("--out", default="memmap-pool-demo", help="directory for the files")
    parser.add_argument("--workers", type=int, default=None, help="worker processes")
    args = parser.parse_args()
    size = args.size
    os.makedirs(args.out, exist_ok=True)
    npy = os.path.join(args.out, "mandelbrot.npy")
    png = os.path.join(args.out, "mandelbrot.png")

    with MemmapPool(args.workers) as pool:
        rows = max(1, size // (pool.max_workers * 16))  # bands of rows, 16 per worker
        # mandelbrot is a @kernel that carries its dtype (float32).
        job = pool.submit_chunks(mandelbrot, (size, size), chunks=rows, out=npy)
        escape = job.result()  # a read-only memmap of the .npy
        stats = job.stats
        print(
            f"{size}x{size} pixels in {stats.chunks} chunks on {stats.workers} workers: "
            f"{stats.wall_time:.2f} s, {size * size / stats.wall_time / 1e6:.1f} Mpixel/s, "
            f"{stats.throughput / 1e9:.3f} GB/s, the workers {stats.utilisation:.0%} busy"
        )
        # The .npy is the next job's input: the workers map it, nothing is copied.
        rgb = pool.map_chunks(colourise, (size, size, 3), "uint8", chunks=rows, inputs=[npy])
        write_png(png, rgb)
        inside = int(np.count_nonzero(escape == escape.max()))
    print(f"escape times: {npy} ({escape.shape[0]}x{escape.shape[1]} float32)")
    print(f"image:        {png} ({os.path.getsize(png):,} bytes)")
    print(f"OK: {inside:,} of {size * size:,} pixels are in the Mandelbrot set")


if __name__ == "__main__":  # required: spawn and forkserver workers import this module
    main()
