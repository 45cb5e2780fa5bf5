"""Many workers update one large array in place, with no lock, and every update counts.

The parent creates one ``.npy`` file holding 100 million float32 zeros (400 MB). Each round,
``map_chunks(..., out=array)`` splits it into disjoint chunks and the workers all run
``out += 1`` on their own chunk at the same time: a read-modify-write of shared memory
without any lock. It is correct because no two chunks overlap (and chunk boundaries fall on
memory pages, so no two workers even share a page). After N rounds every element must be
exactly N: a lost or doubled update anywhere would show.

Run it with::

    python examples/many_workers_inplace.py                  # 100 million values
    python examples/many_workers_inplace.py --size 1000000 --workers 4 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from memmap_pool import MemmapPool


def add_one(out, chunk):
    """Runs in a worker, concurrently with the others: a read-modify-write, no lock."""
    out += 1
    return os.getpid()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        type=int,
        default=100_000_000,
        help="float32 values in the array (default 100 million)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: one per CPU)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of out += 1 (default 3)")
    parser.add_argument(
        "--dir", default=None, help="directory for the array's file (default: the system temp dir)"
    )
    options = parser.parse_args()
    if options.size < 1 or options.workers < 1 or options.rounds < 1:
        parser.error("--size, --workers and --rounds must be positive")

    with tempfile.TemporaryDirectory(dir=options.dir) as directory:
        path = os.path.join(directory, "counts.npy")
        array = np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(options.size,))
        mib = array.nbytes / 2**20
        print(f"array: {options.size:,} float32 values ({mib:,.1f} MiB) in {path}")

        pids: set[int] = set()
        with MemmapPool(options.workers) as pool:
            for round_number in range(1, options.rounds + 1):
                start = time.perf_counter()
                job = pool.submit_chunks(add_one, array.shape, out=array)
                pids.update(job.chunk_results())
                seconds = time.perf_counter() - start
                print(
                    f"round {round_number}: {job.progress.total} chunks on "
                    f"{options.workers} workers, {seconds:.3f} s, "
                    f"{2 * array.nbytes / seconds / 1e9:.2f} GB/s read+written"
                )

        low, high = float(array.min()), float(array.max())
        print(
            f"{len(pids)} worker processes took part; every value is between "
            f"{low:g} and {high:g}, expected exactly {options.rounds}"
        )
        ok = low == high == options.rounds
        del array, job
    print(
        "OK: no update was lost or doubled, without any lock"
        if ok
        else "FAILED: some updates were lost or doubled"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
