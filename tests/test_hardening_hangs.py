"""Hangs: workers that die at start-up, shutdowns that never end, futures that never finish.

A pool whose workers can't start must fail its jobs with a clear error rather than replace
its workers forever, and the executor API behaves as ``ProcessPoolExecutor``'s, which is the
reference for ``submit``, ``map`` and ``shutdown``.

What can hang runs in a script of its own (in a session of its own, killed as a whole when
the test ends), and every wait is bounded.
"""

from __future__ import annotations

import gc
import os
import textwrap
import time
from concurrent.futures import wait
from concurrent.futures.process import BrokenProcessPool

import pytest

import faults
from memmap_pool import MemmapPool

BOUND = 20.0
"""Seconds a call may take in the scripts below; a working pool needs a few at most."""

SCRIPT_TIMEOUT = 60.0
"""Seconds a script may run; only a hang reaches it."""

MAX_TRACEBACKS = 20
"""Tracebacks a script may print: a few per worker that failed to start, not one per
replacement of the workers."""


def write_script(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def temp_dir(tmp_path) -> str:
    path = tmp_path / "temp"
    path.mkdir(exist_ok=True)
    return str(path)


# -- workers that die at start-up --------------------------------------------------------------

INITIALIZER_SCRIPT = """
import json, os, sys, threading
from concurrent.futures.process import BrokenProcessPool

import faults
from memmap_pool import MemmapPool

BOUND = float(sys.argv[3])


def attempt(call):
    box = {}

    def run():
        try:
            call()
            box["outcome"] = "returned"
        except BaseException as exc:
            box.update(outcome="raised", type=type(exc).__name__,
                       broken=isinstance(exc, BrokenProcessPool), message=str(exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND)
    return box or {"outcome": "hung"}


def main():
    method, how = sys.argv[1:3]
    init = faults.initializer_raises if how == "raises" else faults.initializer_exits
    pool = MemmapPool(2, mp_context=method, initializer=init)
    steps = {
        "map_chunks": lambda: pool.map_chunks(faults.counting, (64, 8), "int64", chunks=8),
        "submit": lambda: pool.submit(abs, -1).result(timeout=BOUND),
        "map_chunks_again": lambda: pool.map_chunks(faults.counting, (8,), "int64"),
        "shutdown": pool.shutdown,
    }
    report = {}
    for name, call in steps.items():
        report[name] = attempt(call)
        if report[name]["outcome"] == "hung":
            break
    print("REPORT " + json.dumps(report), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["raises", "exits"])
def test_worker_start_up_failure_fails_jobs_with_a_clear_error(tmp_path, start_method, how):
    """An initializer that raises or calls os._exit(3) makes map_chunks and later
    submissions raise BrokenProcessPool naming the initializer, without replacing the
    workers over and over."""
    script = write_script(tmp_path, "initializer.py", INITIALIZER_SCRIPT)
    done = faults.run_python(
        [script, start_method, how, BOUND],
        env=faults.script_env(temp_dir(tmp_path)),
        timeout=SCRIPT_TIMEOUT,
    )
    assert not done.hung, done
    (report,) = done.reports()
    for step in ("map_chunks", "submit", "map_chunks_again"):
        outcome = report.get(step)
        assert outcome is not None, f"{step} never ran: {report}; {done!r}"
        assert outcome["outcome"] == "raised", f"{step}: {outcome}; {done!r}"
        assert outcome["broken"], f"{step} did not raise BrokenProcessPool: {outcome}"
        assert "initializer" in outcome["message"].lower(), f"{step}: {outcome}"
    assert report["shutdown"]["outcome"] == "returned", report
    assert done.tracebacks < MAX_TRACEBACKS, done


NO_MAIN_GUARD_SCRIPT = """
import json
from concurrent.futures.process import BrokenProcessPool

import faults
from memmap_pool import MemmapPool


def describe(exc):
    return {"outcome": "raised", "type": type(exc).__name__,
            "broken": isinstance(exc, BrokenProcessPool), "message": str(exc)}


pool = MemmapPool(2, mp_context="spawn")
report = {}
try:
    pool.map_chunks(faults.counting, (64, 8), "int64", chunks=8)
    report["map_chunks"] = {"outcome": "returned"}
except BaseException as exc:
    if __name__ != "__main__":
        raise  # in a worker importing this script: fail there, as a user's script would
    report["map_chunks"] = describe(exc)
if __name__ == "__main__":
    try:
        pool.submit(abs, -1).result(timeout=20)
        report["submit"] = {"outcome": "returned"}
    except BaseException as exc:
        report["submit"] = describe(exc)
    print("REPORT " + json.dumps(report), flush=True)
    pool.shutdown()
"""


@pytest.mark.timeout(120)
def test_spawn_script_without_main_guard_fails_with_a_clear_error(tmp_path):
    """A spawn script that uses a pool at module level, without ``if __name__ ==
    "__main__":``, gets BrokenProcessPool naming the missing main guard from map_chunks and
    later submissions, instead of workers replaced forever."""
    script = write_script(tmp_path, "no_main_guard.py", NO_MAIN_GUARD_SCRIPT)
    done = faults.run_python(
        [script], env=faults.script_env(temp_dir(tmp_path)), timeout=SCRIPT_TIMEOUT
    )
    assert not done.hung, done
    (report,) = done.reports()
    for step in ("map_chunks", "submit"):
        outcome = report[step]
        assert outcome["outcome"] == "raised", f"{step}: {outcome}; {done!r}"
        assert outcome["broken"], f"{step} did not raise BrokenProcessPool: {outcome}"
        assert "__main__" in outcome["message"] or "main guard" in outcome["message"], outcome
    assert done.tracebacks < MAX_TRACEBACKS, done


UNPICKLABLE_SUBMIT_SCRIPT = """
import threading

from memmap_pool import MemmapPool

if __name__ == "__main__":
    pool = MemmapPool(2)
    pool.submit(id, threading.Lock())
    pool.shutdown(wait=False)
"""


@pytest.mark.timeout(300)
def test_shutdown_without_wait_after_an_unpicklable_submit_does_not_hang_at_exit(tmp_path):
    """A script that submits an unpicklable argument and calls shutdown(wait=False) exits,
    every one of 20 times."""
    script = write_script(tmp_path, "unpicklable_submit.py", UNPICKLABLE_SUBMIT_SCRIPT)
    env = faults.script_env(temp_dir(tmp_path))
    for run in range(20):
        done = faults.run_python([script], env=env, timeout=10.0)
        assert not done.hung, f"run {run + 1} of 20 did not exit: {done!r}"


# -- executor semantics (ProcessPoolExecutor is the reference) ---------------------------------


@pytest.mark.timeout(60)
def test_shutdown_without_wait_runs_every_submitted_future():
    """shutdown(wait=False) returns at once and every future submitted before it still
    runs to completion."""
    pool = MemmapPool(2, mp_context="fork")
    try:
        futures = [pool.submit(time.sleep, 0.1) for _ in range(10)]
    finally:
        pool.shutdown(wait=False)
    _, not_done = wait(futures, timeout=BOUND)
    assert not not_done, f"{len(not_done)} of 10 futures never finished"
    assert [f.cancelled() for f in futures] == [False] * 10
    assert [f.result() for f in futures] == [None] * 10


@pytest.mark.timeout(60)
def test_dropping_the_last_reference_to_a_pool_lets_its_futures_finish():
    """A pool garbage-collected with futures pending still runs them to completion."""
    pool = MemmapPool(2, mp_context="fork")
    futures = [pool.submit(time.sleep, 0.1) for _ in range(10)]
    del pool
    gc.collect()
    _, not_done = wait(futures, timeout=BOUND)
    assert not not_done, f"{len(not_done)} of 10 futures never finished"
    assert [f.cancelled() for f in futures] == [False] * 10
    assert [f.result() for f in futures] == [None] * 10


LAMBDA_SCRIPT = """
import json

from memmap_pool import MemmapPool

if __name__ == "__main__":

    def triple(x):  # exists only in this process's __main__, not in a spawned worker's
        return 3 * x

    calls = {
        "submit lambda": lambda: pool.submit(lambda x: x + 1, 1).result(timeout=20),
        "map lambda": lambda: list(pool.map(lambda x: 2 * x, [1, 2, 3], timeout=20)),
        "submit function of __main__": lambda: pool.submit(triple, 2).result(timeout=20),
        "map function of __main__": lambda: list(pool.map(triple, [1, 2], timeout=20)),
    }
    results = {}
    with MemmapPool(2, mp_context="spawn") as pool:
        for name, call in calls.items():
            try:
                results[name] = call()
            except Exception as exc:
                results[name] = f"{type(exc).__name__}: {exc}"
    print("REPORT " + json.dumps(results), flush=True)
"""


@pytest.mark.timeout(120)
def test_submit_and_map_accept_lambdas_and_functions_of_a_spawn_scripts_main(tmp_path):
    """Under spawn, submit and map run lambdas and functions defined under the main guard
    of the script (sent by value, as the chunk kernels are)."""
    script = write_script(tmp_path, "lambdas.py", LAMBDA_SCRIPT)
    done = faults.run_python(
        [script], env=faults.script_env(temp_dir(tmp_path)), timeout=SCRIPT_TIMEOUT
    )
    assert not done.hung, done
    (results,) = done.reports()
    assert results == {
        "submit lambda": 2,
        "map lambda": [2, 4, 6],
        "submit function of __main__": 6,
        "map function of __main__": [3, 6],
    }, done


@pytest.mark.timeout(90)
def test_worker_dying_in_a_plain_submit_breaks_that_future_only(pool):
    """A function that calls os._exit in a worker fails its future with BrokenProcessPool,
    and a later submit either works or raises BrokenProcessPool, within a bounded time."""
    future = pool.submit(os._exit, 3)
    with pytest.raises(BrokenProcessPool):
        future.result(timeout=BOUND)
    try:
        later = pool.submit(abs, -1).result(timeout=BOUND)
    except BrokenProcessPool:
        return
    assert later == 1
