"""Many workers update one large array in place, with no lock, and every update counts.

The parent creates one ``.npy`` file holding 100 million float32 zeros (400 MB). Each round,
``submit_chunks(..., out=array)`` splits it into disjoint chunks and the workers all run
``out += 1`` on their own chunk at the same time: a read-modify-write of shared memory
without any lock. It is correct because no two chunks overlap. (Their sizes are whole 4 KiB
pages, but ``np.lib.format.open_memmap`` puts the data after a 128-byte header, so two
neighbouring chunks share the page their boundary falls in. On one host that is harmless: all
processes share one page cache and each writes only its own bytes.) After N rounds every
element must be exactly N: a lost or doubled update anywhere would show.

The rounds run with ``retries=0``: a chunk re-run after its worker died in the middle of it
would be incremented twice, so such a death fails the round instead (see "Retried chunks run
again from the start" in docs/failures.md).

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
                # retries=0: ``out += 1`` must not run twice on a chunk (see the docstring).
                job = pool.submit_chunks(add_one, array.shape, out=array, retries=0)
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
