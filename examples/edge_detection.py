"""Edge detection on a generated image: a blur, then gradients, each chunk reading its
neighbourhood in place from the shared input file.

Three jobs, all on the pool's workers:

1. ``map_chunks`` renders a test image (discs and stripes with noise) into a ``.npy``;
2. ``map_blocks`` blurs it with ``scipy.ndimage.gaussian_filter`` (sigma 2): each block comes
   with a halo of 8 pixels (numpy's "symmetric" boundary, which is scipy's "reflect"), and
   the library trims the halo from what the function returns;
3. ``map_chunks`` with a ``Halo`` input and two outputs computes the Sobel gradient's
   magnitude and direction at once.

The magnitude is written as a PNG. ``--check`` compares both filters with scipy run on the
whole image in this process: they are equal bit for bit.

Run it with::

    python examples/edge_detection.py [--size 4096] [--png edges.png] [--check]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
from scipy.ndimage import gaussian_filter, sobel

from memmap_pool import Halo, MemmapPool, Output
from memmap_pool.demo import write_png

SIGMA = 2.0
DEPTH = 8  # scipy's radius for sigma 2: int(4.0 * sigma + 0.5)


def render(out, chunk, size):
    """Runs in a worker: rows of the test image, from their global coordinates."""
    rows, cols = chunk.slices
    y = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] / size
    x = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] / size
    image = 0.3 * (np.sin(40 * x) > 0)  # vertical stripes
    for cy, cx, r in ((0.3, 0.3, 0.2), (0.65, 0.6, 0.25), (0.25, 0.8, 0.1)):
        image = np.where((y - cy) ** 2 + (x - cx) ** 2 < r * r, 1.0 - image, image)
    noise = np.random.default_rng([7, rows.start]).standard_normal(image.shape)
    out[...] = image + 0.05 * noise.astype(np.float32)


def blur(block):
    """A whole-block filter: map_blocks trims the halo from its result."""
    return gaussian_filter(block, SIGMA, mode="reflect")


def gradient(outs, chunk, smooth):
    """Runs in a worker: Sobel gradients of the chunk's view, trimmed to its region."""
    magnitude, direction = outs
    inner = chunk.interior(0)
    gy = sobel(smooth, axis=0, mode="nearest")[inner]
    gx = sobel(smooth, axis=1, mode="nearest")[inner]
    np.hypot(gx, gy, out=magnitude)
    np.arctan2(gy, gx, out=direction)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="pixels per side")
    parser.add_argument("--png", default="edges.png", help="where to write the picture")
    parser.add_argument("--check", action="store_true", help="compare with scipy on the whole")
    args = parser.parse_args()
    size = args.size

    with tempfile.TemporaryDirectory() as work, MemmapPool() as pool:
        image_path = os.path.join(work, "image.npy")
        pool.map_chunks(render, (size, size), "float32", args=(size,), out=image_path)
        smooth = pool.map_blocks(blur, image_path, depth=DEPTH, boundary="symmetric")
        magnitude, direction = pool.map_chunks(
            gradient,
            (size, size),
            outputs=[Output("float32"), Output("float32")],
            inputs=[Halo(smooth, depth=1, boundary="edge")],
        )
        print(f"blurred and differentiated a {size}x{size} float32 image")

        scaled = np.clip(magnitude / np.percentile(magnitude, 99.5), 0.0, 1.0)
        grey = (255 * scaled).astype(np.uint8)
        write_png(args.png, np.repeat(grey[:, :, None], 3, axis=2))
        print(f"wrote {args.png}")

        if args.check:
            image = np.load(image_path)
            expected = gaussian_filter(image, SIGMA, mode="reflect")
            assert np.array_equal(smooth, expected), "the blur differs from scipy's"
            gy = sobel(expected, axis=0, mode="nearest")
            gx = sobel(expected, axis=1, mode="nearest")
            assert np.array_equal(magnitude, np.hypot(gx, gy)), "the gradient differs"
            assert np.array_equal(direction, np.arctan2(gy, gx)), "the direction differs"
            print("OK: equal to scipy on the whole image, bit for bit")
        del smooth, magnitude, direction


if __name__ == "__main__":
    main()
