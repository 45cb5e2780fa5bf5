"""A reduction over a huge array with no extra pass: each chunk returns its partial result.

The kernel fills its chunk of a large array of normal samples and, while the chunk is still in
cache, returns small partial results: count, sum, sum of squares, histogram counts. The parent
combines them from ``job.chunk_results()``, one value per chunk in chunk order, into the mean,
standard deviation and histogram of the whole array, without reading the array again.

Returned values are pickled and sent to the parent: keep them small (numbers, a histogram),
never arrays the size of a chunk.

Run it with::

    python examples/reduction.py [--size 100000000] [--check]
"""

from __future__ import annotations

import argparse

import numpy as np

from memmap_pool import MemmapPool

EDGES = np.linspace(-5.0, 5.0, 41)  # 40 bins of the histogram


def normal_samples(out, chunk, seed=2024):
    """Runs in a worker: fill this chunk with samples and return its partial statistics."""
    # Values keyed by the seed and each element's position in the whole array: the array is
    # the same whichever worker computes which chunk, however the array is chunked and
    # however many workers there are.
    out[:] = chunk.random(seed).standard_normal(dtype=np.float32)
    x = out.astype(np.float64)  # accumulate in float64
    counts, _ = np.histogram(out, bins=EDGES)
    return x.size, float(x.sum()), float(np.dot(x, x)), counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000_000, help="number of samples")
    parser.add_argument(
        "--check", action="store_true", help="compare with a second, serial pass over the array"
    )
    args = parser.parse_args()

    with MemmapPool() as pool:
        job = pool.submit_chunks(normal_samples, (args.size,), "float32")
        samples = job.result()  # the array itself, in a temporary memory-mapped file
        parts = job.chunk_results()
        count = sum(p[0] for p in parts)
        total = sum(p[1] for p in parts)
        squares = sum(p[2] for p in parts)
        histogram = np.sum([p[3] for p in parts], axis=0)
        mean = total / count
        std = np.sqrt(squares / count - mean * mean)
        print(
            f"{count:,} samples ({samples.nbytes / 2**20:.0f} MiB) in {len(parts)} chunks, "
            f"{job.stats.wall_time:.2f} s: mean {mean:+.5f}, std {std:.5f}"
        )
        print(
            f"histogram: {int(histogram.sum()):,} samples in [{EDGES[0]:g}, {EDGES[-1]:g}), "
            f"{int(histogram[18:22].sum()):,} in [-0.5, 0.5)"
        )
        if args.check:
            same = (
                count == samples.size
                and np.isclose(mean, samples.mean(dtype=np.float64), rtol=0, atol=1e-9)
                and (np.histogram(samples, bins=EDGES)[0] == histogram).all()
            )
            if not same:
                raise SystemExit("the chunk results disagree with a full pass over the array")
            print("OK: the chunk results agree with a full pass over the array")
        del samples  # the temporary file goes with the last reference to it


if __name__ == "__main__":  # required: spawn and forkserver workers import this module
    main()
