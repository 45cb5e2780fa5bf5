"""Parent creates an array, child processes update it in place, the parent sees the change.

This is the pattern memmap-pool grew from. The parent makes a ``.npy`` file with
``np.lib.format.open_memmap`` and fills it. ``submit_chunks(..., out=array)`` has the worker
processes update that same file: each worker receives chunk indices, maps the file and
multiplies its chunks' rows in place (``out *= 10``). The array is neither pickled nor
copied. When the job is done, the parent's own array already shows the new values, and so does
the file on disk. The job runs with ``retries=0``: a chunk re-run after its worker died in the
middle of it would be multiplied twice.

Run it with::

    python examples/parent_child_update.py
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from memmap_pool import MemmapPool


def times_ten(out, chunk):
    """Runs in a worker: multiply this chunk's rows in place and report who did it."""
    out *= 10
    rows = chunk.slices[0]
    return os.getpid(), rows.start, rows.stop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="rows of the array (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "shared.npy")

        # 1. The parent creates the array in a file and writes its first values.
        array = np.lib.format.open_memmap(path, mode="w+", dtype="float64", shape=(options.rows, 4))
        array[...] = np.arange(array.size).reshape(array.shape)
        before = np.array(array)
        print(f"parent (pid {os.getpid()}) created {path} with:")
        print(before)

        # 2. The children update it in place, two rows each.
        with MemmapPool(options.workers) as pool:
            job = pool.submit_chunks(times_ten, array.shape, out=array, chunks=2, retries=0)
            for pid, start, stop in job.chunk_results():
                print(f"child (pid {pid}) multiplied rows {start}:{stop} by 10")
            result = job.result()

        # 3. The parent sees the change in its own array, and in the file.
        print("parent now sees:")
        print(array)
        on_disk = np.load(path)
        ok = (
            result is array
            and np.array_equal(array, before * 10)
            and np.array_equal(on_disk, before * 10)
        )
        del array, result, on_disk
    print("OK: the parent sees every child's update" if ok else "FAILED: the update is missing")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
