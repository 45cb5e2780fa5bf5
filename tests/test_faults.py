"""Faults inside the workers: deaths, crashes, exceptions, pickling failures and hangs.

Each test injects one fault with a kernel from ``faults.py`` and checks what the caller sees
(the error type, what its message names), that finished work is kept (chunks are counted
through a log each kernel appends to), and that the pool still runs the next job.
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import psutil
import pytest

import faults
from helpers import BOUND, wait_until
from memmap_pool import (
    ChunkTimeoutError,
    KernelError,
    MemmapPool,
    MemmapPoolError,
    SerializationError,
    WorkerCrashedError,
)

SHAPE = (64, 1024)
"""16 chunks of 4 rows (32 KiB each) with ``chunks=4``."""

CHUNKS = 4
COUNT = SHAPE[0] // CHUNKS


def check_usable(pool: MemmapPool) -> None:
    """The pool runs a new job and gets it right."""
    result = pool.map_chunks(faults.counting, SHAPE, "int64", chunks=CHUNKS)
    assert np.array_equal(result, faults.expected(SHAPE))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, bound: float = BOUND) -> bool:
    return wait_until(lambda: gone(pid), bound)


@pytest.fixture
def forkserver_pool():
    """Two workers started from a forkserver (the default start method from Python 3.14)."""
    with MemmapPool(2, mp_context="forkserver") as p:
        yield p


# -- worker deaths ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pool_name", ["fork_pool", "forkserver_pool"])
def test_worker_killed_once_mid_job_is_retried_and_finished_chunks_are_kept(
    pool_name, request, tmp_path
):
    """A worker SIGKILLed once mid-job: the job completes, right, and no chunk that had
    finished runs again."""
    pool = request.getfixturevalue(pool_name)
    log = str(tmp_path / "log")
    job = pool.submit_chunks(
        faults.sigkill_once,
        SHAPE,
        "int64",
        chunks=CHUNKS,
        kwargs={"marker": str(tmp_path / "marker"), "victim": 9, "log": log},
    )
    result = job.result(timeout=BOUND)
    assert np.array_equal(result, faults.expected(SHAPE))
    finished = faults.read_log(log)
    assert sorted(finished) == list(range(COUNT))  # every chunk finished exactly once
    started = faults.read_log(log, "start")
    assert started.count(9) == 2  # the victim ran twice: killed, then retried
    assert job.stats.retries == 1


@pytest.mark.timeout(60)
def test_worker_that_always_dies_raises_worker_crashed_error_naming_chunk_and_signal(
    fork_pool, tmp_path
):
    """A chunk whose worker is SIGKILLed on every attempt gives WorkerCrashedError naming the
    chunk, SIGKILL(-9) and the out-of-memory killer; the pool stays usable."""
    log = str(tmp_path / "log")
    t0 = time.monotonic()
    with pytest.raises(WorkerCrashedError) as info:
        fork_pool.map_chunks(
            faults.sigkill_always, SHAPE, "int64", chunks=CHUNKS, kwargs={"victim": 5, "log": log}
        )
    assert time.monotonic() - t0 < BOUND
    err = info.value
    assert isinstance(err, BrokenProcessPool)
    assert isinstance(err, MemmapPoolError)
    message = str(err)
    assert "chunk 5 (region [20:24, 0:1024]) of 16" in message
    assert "SIGKILL(-9)" in message
    assert "out-of-memory" in message
    assert "retries=2" in message
    assert "SIGTERM" not in message  # the other workers, stopped by us, are not blamed
    assert err.chunks == (5,)
    assert -9 in err.exitcodes
    assert faults.read_log(log, "start").count(5) == 3  # the first run and two retries
    check_usable(fork_pool)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pool_name", ["fork_pool", "forkserver_pool"])
def test_segfault_in_native_code_is_reported_as_sigsegv(pool_name, request):
    """A segfault in a kernel gives WorkerCrashedError with SIGSEGV(-11) and its likely
    cause; the pool stays usable."""
    pool = request.getfixturevalue(pool_name)
    with pytest.raises(WorkerCrashedError) as info:
        pool.map_chunks(
            faults.segfault, SHAPE, "int64", chunks=CHUNKS, kwargs={"victim": 3}, retries=0
        )
    message = str(info.value)
    assert "SIGSEGV(-11)" in message
    assert "native code" in message
    assert "chunk 3 " in message
    assert "SIGKILL" not in message
    assert info.value.exitcodes == (-11,)
    check_usable(pool)


@pytest.mark.timeout(60)
def test_os_exit_in_kernel_is_reported_with_its_exit_code(fork_pool):
    """``os._exit(3)`` in a kernel gives WorkerCrashedError with "exit code 3"."""
    with pytest.raises(WorkerCrashedError) as info:
        fork_pool.map_chunks(
            faults.exit_now,
            SHAPE,
            "int64",
            chunks=CHUNKS,
            kwargs={"victim": 7, "code": 3},
            retries=1,
        )
    message = str(info.value)
    assert "exit code 3" in message
    assert "chunk 7 " in message
    assert "2 times (retries=1)" in message
    check_usable(fork_pool)


@pytest.mark.timeout(60)
def test_retries_zero_fails_on_the_first_worker_death(fork_pool, tmp_path):
    """With retries=0 the first death of a worker fails the job; the chunk ran once."""
    log = str(tmp_path / "log")
    with pytest.raises(WorkerCrashedError, match=r"1 time \(retries=0\)"):
        fork_pool.map_chunks(
            faults.sigkill_once,
            SHAPE,
            "int64",
            chunks=CHUNKS,
            retries=0,
            kwargs={"marker": str(tmp_path / "m"), "victim": 2, "log": log},
        )
    assert faults.read_log(log, "start").count(2) == 1


@pytest.mark.timeout(60)
def test_a_crash_in_one_job_does_not_charge_another_jobs_chunks(fork_pool, tmp_path):
    """Chunks of another job that were running on the workers replaced after a crash are
    re-run without using up their retries: a job with retries=0 still completes."""
    log_b = str(tmp_path / "b")
    job_b = fork_pool.submit_chunks(
        faults.counting,
        SHAPE,
        "int64",
        chunks=CHUNKS,
        retries=0,
        kwargs={"log": log_b, "delay": 0.1},
    )
    # Job A crashes only once job B has chunks running, so the replaced workers hold some.
    deadline = time.monotonic() + BOUND
    while not faults.read_log(log_b, "start") and time.monotonic() < deadline:
        time.sleep(0.01)
    job_a = fork_pool.submit_chunks(
        faults.sigkill_always, (8, 8), "int64", chunks=1, kwargs={"victim": 0}, retries=1
    )
    with pytest.raises(WorkerCrashedError):
        job_a.result(timeout=BOUND)
    result = job_b.result(timeout=BOUND)
    assert np.array_equal(result, faults.expected(SHAPE))
    assert sorted(set(faults.read_log(log_b))) == list(range(COUNT))


# -- kernel exceptions -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_kernel_exception_fails_fast_with_its_type_traceback_and_chunk(fork_pool, tmp_path):
    """A kernel exception is not retried: it is re-raised with its own type, the worker's
    traceback as __cause__ and a note naming the chunk, and chunks not started are
    dropped."""
    log = str(tmp_path / "log")
    shape, count = (40, 1024), 40
    with pytest.raises(faults.InjectedError) as info:
        fork_pool.map_chunks(
            faults.raise_on,
            shape,
            "int64",
            chunks=1,
            kwargs={"victim": 0, "log": log, "delay": 0.2},
        )
    err = info.value
    assert str(err) == "injected failure in chunk 0"
    assert any("chunk 0 (region [0:1, 0:1024]) of 40" in note for note in err.__notes__)
    cause = str(err.__cause__)
    assert "raise_on" in cause
    assert "InjectedError: injected failure in chunk 0" in cause
    started = faults.read_log(log, "start")
    assert started.count(0) == 1  # not retried
    # The failing worker raised the job's cancel flag at once: besides chunk 0, only chunks
    # the other worker had started (one or two batches of one chunk) ran; 36+ were dropped.
    assert len(set(started)) <= 4 < count
    check_usable(fork_pool)


@pytest.mark.timeout(60)
def test_kernel_exception_beside_a_hung_chunk_raises_and_stops_the_hung_worker(tmp_path):
    """When a chunk fails while another chunk of the job hangs (no timeout set),
    map_chunks still raises promptly: the hung worker is killed, and by the time the error
    arrives the job's temporary files are gone."""
    pidfile = str(tmp_path / "hung.pid")
    base = tmp_path / "pool-tmp"
    base.mkdir()
    with MemmapPool(2, mp_context="fork", temp_dir=base) as pool:
        t0 = time.monotonic()
        with pytest.raises(faults.InjectedError):
            pool.map_chunks(
                faults.raise_while_another_hangs,
                SHAPE,
                "int64",
                chunks=CHUNKS,
                kwargs={"pidfile": pidfile},
            )
        assert time.monotonic() - t0 < BOUND  # the hang lasts 600 s
        assert [
            [f for f in d.iterdir() if f.name != ".memmap-pool"] for d in base.glob("memmap-pool-*")
        ] == [[]]
        with open(pidfile) as f:
            assert wait_gone(int(f.read()))
        check_usable(pool)


@pytest.mark.timeout(60)
def test_unpicklable_kernel_exception_arrives_as_kernel_error(fork_pool):
    """An exception that can't be sent back is replaced by KernelError carrying its type,
    message and traceback."""

    def kernel(out, chunk):
        if chunk.index == 1:
            err = RuntimeError("holds a lock")
            err.lock = faults.threading.Lock()
            raise err
        faults.fill(out, chunk)

    with pytest.raises(KernelError) as info:
        fork_pool.map_chunks(kernel, SHAPE, "int64", chunks=CHUNKS)
    message = str(info.value)
    assert "RuntimeError: holds a lock" in message
    assert "chunk 1 " in message
    assert "holds a lock" in str(info.value.__cause__)
    check_usable(fork_pool)


@pytest.mark.timeout(60)
def test_sys_exit_in_a_kernel_is_an_error_not_an_exit_of_the_parent(fork_pool):
    """sys.exit() in a kernel fails the job with KernelError naming SystemExit and the
    chunk; the parent goes on and the pool stays usable."""
    with pytest.raises(KernelError) as info:
        fork_pool.map_chunks(faults.exits, SHAPE, "int64", chunks=CHUNKS, kwargs={"victim": 4})
    assert "SystemExit" in str(info.value)
    assert "chunk 4 " in str(info.value)
    check_usable(fork_pool)


# -- pickling --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_unpicklable_argument_is_refused_before_any_work(fork_pool, tmp_path):
    """An argument that can't be pickled raises SerializationError before any chunk runs."""
    log = str(tmp_path / "log")
    with pytest.raises(SerializationError, match="cannot send the kernel") as info:
        fork_pool.map_chunks(
            faults.takes_arg, SHAPE, "int64", chunks=CHUNKS, args=(faults.Unpicklable(),)
        )
    assert "lock" in str(info.value)
    with pytest.raises(SerializationError):
        fork_pool.map_chunks(
            faults.counting,
            SHAPE,
            "int64",
            chunks=CHUNKS,
            kwargs={"log": log, "bad": faults.Unpicklable()},
        )
    assert not os.path.exists(log)
    check_usable(fork_pool)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pool_name", ["fork_pool", "forkserver_pool"])
def test_argument_that_fails_to_unpickle_in_the_worker_raises_serialization_error(
    pool_name, request
):
    """An argument whose unpickling raises in the worker gives SerializationError with the
    worker's error, and breaks nothing."""
    pool = request.getfixturevalue(pool_name)
    with pytest.raises(SerializationError, match="could not load the job") as info:
        pool.map_chunks(
            faults.takes_arg, SHAPE, "int64", chunks=CHUNKS, args=(faults.FailsToUnpickle(),)
        )
    assert "cannot be rebuilt in a worker" in str(info.value)
    assert "cannot be rebuilt in a worker" in str(info.value.__cause__)
    check_usable(pool)


@pytest.mark.timeout(60)
def test_unpicklable_return_value_raises_serialization_error_naming_the_chunk(fork_pool):
    """A kernel returning a value that can't be pickled gives SerializationError naming the
    chunk and the value's type."""
    with pytest.raises(SerializationError) as info:
        fork_pool.map_chunks(
            faults.returns_unpicklable, SHAPE, "int64", chunks=CHUNKS, kwargs={"victim": 6}
        )
    message = str(info.value)
    assert "returned by the kernel (lock)" in message
    assert "chunk 6 " in message
    check_usable(fork_pool)


# -- timeouts --------------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool_name", ["fork_pool", "forkserver_pool"])
def test_hung_chunk_raises_chunk_timeout_error_and_its_worker_is_replaced(
    pool_name, request, tmp_path
):
    """A chunk running past ``timeout`` raises ChunkTimeoutError (a TimeoutError) naming it,
    long before the hang would end; its worker is killed and new workers run the next
    job."""
    pool = request.getfixturevalue(pool_name)
    log = str(tmp_path / "log")
    t0 = time.monotonic()
    with pytest.raises(ChunkTimeoutError) as info:
        pool.map_chunks(
            faults.hang,
            SHAPE,
            "int64",
            chunks=CHUNKS,
            timeout=1.0,
            kwargs={"victim": 2, "log": log},
        )
    assert time.monotonic() - t0 < BOUND  # the hang lasts 600 s
    err = info.value
    assert isinstance(err, TimeoutError)
    assert err.chunk == 2
    assert err.timeout == 1.0
    assert "chunk 2 (region [8:12, 0:1024]) of 16" in str(err)
    assert "timeout of 1 s" in str(err)
    match = re.search(r"worker \(pid (\d+)\) was killed and replaced", str(err))
    assert match, str(err)
    hung = int(match.group(1))
    assert wait_gone(hung)
    check_usable(pool)
    assert hung not in {pool.submit(os.getpid).result(timeout=BOUND) for _ in range(4)}


@pytest.mark.timeout(60)
def test_timeout_and_retries_given_to_the_pool_are_defaults_map_chunks_overrides(tmp_path):
    """``timeout`` and ``retries`` of the MemmapPool constructor apply to every job, and
    map_chunks' own values win for one job."""
    with MemmapPool(2, mp_context="fork", timeout=0.5, retries=0) as pool:
        with pytest.raises(ChunkTimeoutError):
            pool.map_chunks(
                faults.hang, (8, 8), "int64", chunks=1, kwargs={"victim": 1, "seconds": 3.0}
            )
        result = pool.map_chunks(
            faults.hang,
            (8, 8),
            "int64",
            chunks=1,
            timeout=None,
            kwargs={"victim": 1, "seconds": 1.0},
        )
        assert np.array_equal(result, faults.expected((8, 8)))

        with pytest.raises(WorkerCrashedError, match=r"retries=0"):
            pool.map_chunks(
                faults.sigkill_once,
                (8, 8),
                "int64",
                chunks=1,
                kwargs={"marker": str(tmp_path / "a"), "victim": 3},
            )
        result = pool.map_chunks(
            faults.sigkill_once,
            (8, 8),
            "int64",
            chunks=1,
            retries=1,
            kwargs={"marker": str(tmp_path / "b"), "victim": 3},
        )
        assert np.array_equal(result, faults.expected((8, 8)))


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_bad_retries_are_refused_by_the_pool_and_by_map_chunks(fork_pool, bad):
    """``retries`` must be a non-negative int, in the constructor and in map_chunks."""
    with pytest.raises(ValueError, match="retries must be a non-negative int"):
        MemmapPool(1, retries=bad)
    with pytest.raises(ValueError, match="retries must be a non-negative int"):
        fork_pool.map_chunks(faults.counting, SHAPE, "int64", retries=bad)


@pytest.mark.parametrize("bad", [0, -2.0, "1", True, float("nan")])
def test_bad_timeouts_are_refused_by_the_pool_and_by_map_chunks(fork_pool, bad):
    """``timeout`` must be a positive number of seconds or None."""
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        MemmapPool(1, timeout=bad)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        fork_pool.map_chunks(faults.counting, SHAPE, "int64", timeout=bad)
