"""Run CPython's executor tests against MemmapPool under one start method.

usage: run.py --start-method {fork,forkserver,spawn} --results FILE [--future-tests] [-k ID]

with $MEMMAP_POOL_CPYTHON_SUITE naming CPython's test_concurrent_futures.py (see
fetch_suite.sh). tests/test_cpython_executor.py runs this and reads FILE.
"""

import sys

if __name__ == "__main__":  # spawn and forkserver workers import this file too
    import cpython_executor_suite

    sys.exit(cpython_executor_suite.main(sys.argv[1:]))
