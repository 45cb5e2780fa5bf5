"""A Monte Carlo estimate with reproducible random numbers: the area of a disc, and pi.

Each chunk of a (samples, 2) grid draws its points with ``chunk.random(seed)``, whose values
depend only on the seed and on each element's position in the whole grid, and returns how many
fall inside the unit disc; ``reduce_chunks`` adds the counts, with no array ever made. The
estimate is the same number on every run, whatever the chunking, the number of workers or the
machine: the script checks it by running again with other chunks.

Run it with::

    python examples/monte_carlo.py [--samples 200000000] [--seed 2024]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from memmap_pool import MemmapPool


def inside_disc(chunk, seed):
    """Runs in a worker: points of this chunk that fall inside the unit disc."""
    points = chunk.random(seed).random()  # this chunk's rows of the (samples, 2) grid
    return int(np.count_nonzero(np.einsum("ij,ij->i", points, points) < 1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000_000, help="random points")
    parser.add_argument("--seed", type=int, default=2024, help="the random seed")
    args = parser.parse_args()
    n = args.samples
    with MemmapPool() as pool:
        job = pool.submit_reduce(inside_disc, [], np.add, shape=(n, 2), args=(args.seed,))
        hits = job.result()
        estimate = 4 * hits / n
        error = 4 * math.sqrt(hits / n * (1 - hits / n) / n)  # one standard error
        print(
            f"pi ~ {estimate:.6f} +- {error:.6f} from {n:,} points in {job.stats.chunks} chunks, "
            f"{job.stats.wall_time:.2f} s (pi - estimate = {math.pi - estimate:+.6f})"
        )
        again = pool.reduce_chunks(
            inside_disc, [], np.add, shape=(n, 2), args=(args.seed,), chunks=(max(n // 7, 1), 2)
        )
        if again != hits:
            raise SystemExit(f"another chunking counted {again}, not {hits}")
        print(f"OK: {hits:,} points inside with other chunks too: the same random numbers")


if __name__ == "__main__":  # required: spawn and forkserver workers import this module
    main()
