"""Edge cases found in review: files that must not be trusted, fail-fast timing, shutdown
variants, and what idle workers keep mapped."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import faults
from helpers import BOUND, wait_until
from memmap_pool import JournalMismatchError, MemmapPool
from memmap_pool._privatedir import remove_leftovers


def fill_and_pid(out, chunk):
    out[...] = chunk.index
    return os.getpid()


def slow_fill(out, chunk, delay=0.05):
    time.sleep(delay)
    out[...] = chunk.index


# -- files that must not be trusted -------------------------------------------------------------


def test_an_input_that_is_the_npy_output_itself_is_refused(fork_pool, tmp_path):
    """out= a .npy path re-creates that file: reading it as an input too is refused up front,
    and the file is left as it was."""
    path = tmp_path / "x.npy"
    np.save(path, np.arange(10.0))
    before = path.read_bytes()
    for given in (str(path), np.load(path, mmap_mode="r")):
        with pytest.raises(ValueError, match=r"inputs\[0\] is the file out="):
            fork_pool.map_chunks(faults.fill, (10,), inputs=(given,), out=str(path))
    assert path.read_bytes() == before


def test_resume_refuses_an_output_memmap_pool_did_not_write(fork_pool, tmp_path):
    """A .npy made elsewhere (no journal) is not taken for a finished job."""
    out = tmp_path / "r.npy"
    np.save(out, np.full((20, 3), -1, dtype="int64"))
    with pytest.raises(JournalMismatchError, match="not written by memmap-pool"):
        fork_pool.map_chunks(faults.fill, (20, 3), "int64", chunks=5, out=str(out), resume=True)
    assert (np.load(out) == -1).all()


def test_resume_refuses_an_output_rewritten_after_its_job_failed(fork_pool, tmp_path):
    """After a failed job, the output re-created by np.save (same name, same shape) is refused:
    the journal's done chunks are not in it."""
    out = str(tmp_path / "r.npy")
    with pytest.raises(faults.InjectedError):
        fork_pool.map_chunks(
            faults.raise_on, (40, 3), "int64", chunks=2, out=out, kwargs={"victim": 15}
        )
    assert os.path.exists(out + ".journal")
    np.save(out, np.full((40, 3), -1, dtype="int64"))
    with pytest.raises(JournalMismatchError):
        fork_pool.map_chunks(faults.fill, (40, 3), "int64", chunks=2, out=out, resume=True)


def test_resume_refuses_a_truncated_output(fork_pool, tmp_path):
    """An output cut short (a full disk, a copy that stopped) is refused, not half trusted."""
    out = str(tmp_path / "r.npy")
    with pytest.raises(faults.InjectedError):
        fork_pool.map_chunks(
            faults.raise_on, (64, 512), "int64", chunks=8, out=out, kwargs={"victim": 6}
        )
    os.truncate(out, os.path.getsize(out) // 2)
    with pytest.raises(JournalMismatchError, match="truncated"):
        fork_pool.map_chunks(faults.fill, (64, 512), "int64", chunks=8, out=out, resume=True)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_zero_size_shape_with_whole_axis_blocks_returns_empty(fork_pool, shape):
    """A zero-length axis with chunks None for a whole axis gives an empty array, no error."""
    got = fork_pool.map_chunks(faults.fill, shape, "int64", chunks=(1, None))
    assert got.shape == shape
    assert got.size == 0


# -- failing fast, shutdown --------------------------------------------------------------------


def test_a_kernel_error_stops_the_workers_own_queued_batch(tmp_path):
    """The worker whose kernel raised starts no other chunk of the job, not even the batch
    already queued to it."""
    log = str(tmp_path / "log")
    with MemmapPool(1, mp_context="fork") as pool, pytest.raises(faults.InjectedError):
        pool.map_chunks(
            faults.raise_on, (8, 4), "int64", chunks=1, kwargs={"victim": 0, "log": log}
        )
    assert faults.read_log(log, "start") == [0]


def test_shutdown_without_wait_lets_a_running_job_finish(tmp_path):
    """shutdown(wait=False) returns at once; the running job still completes, as with
    ProcessPoolExecutor, and the pool's files go once it has."""
    pool = MemmapPool(2, mp_context="fork", temp_dir=str(tmp_path))
    job = pool.submit_chunks(slow_fill, (40,), "int64", chunks=2)
    pool.shutdown(wait=False)
    got = job.result(timeout=BOUND)
    assert np.array_equal(got, np.arange(40) // 2)
    del got
    assert wait_until(lambda: os.listdir(tmp_path) == [])
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit_chunks(slow_fill, (4,), "int64")


def test_a_timeout_on_an_executor_the_pool_does_not_own_is_refused():
    """Killing a timed-out worker would break a user's executor for good: refused up front."""
    with (
        concurrent.futures.ProcessPoolExecutor(1) as executor,
        MemmapPool(executor=executor) as pool,
    ):
        with pytest.raises(ValueError, match="executor the pool doesn't own"):
            pool.map_chunks(faults.fill, (4,), "int64", timeout=5)
        with pytest.raises(ValueError, match="executor the pool doesn't own"):
            MemmapPool(executor=executor, timeout=5)
        got = pool.map_chunks(faults.fill, (4,), "int64")  # still usable
        assert got.shape == (4,)
        del got


# -- what workers and leftovers keep ------------------------------------------------------------


def _mapped_by(pid: int, path: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any(path in line for line in f)


def test_idle_workers_unmap_the_output_of_a_job_that_ended(fork_pool):
    """A dropped temporary result is unlinked, and idle workers let go of their mappings of
    it soon after, so its memory in /dev/shm is freed without another job."""
    job = fork_pool.submit_chunks(fill_and_pid, (512, 1024), "int64", chunks=64)
    got = job.result(timeout=BOUND)
    path = got.filename
    pids = set(job.chunk_results())
    assert any(_mapped_by(pid, path) for pid in pids)  # the workers did map it
    del got, job
    deadline = time.monotonic() + BOUND
    while any(_mapped_by(pid, path) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_mapped_by(pid, path) for pid in pids)
    assert not os.path.exists(path)


HOLD_A_PRIVATE_DIR = """
import os, sys, time
from memmap_pool._privatedir import PrivateDir
pdir = PrivateDir(sys.argv[1])
os.close(pdir.create("out.bin"))
print(pdir.path, flush=True)
time.sleep(60)
"""


def test_leftovers_of_a_zombie_owner_are_removed(tmp_path):
    """An owner killed but not yet reaped (a zombie) counts as dead: its files are removed."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_PRIVATE_DIR, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        leftover = tmp_path / os.path.basename(child.stdout.readline().strip())
        assert remove_leftovers(str(tmp_path)) == []  # its owner holds it
        child.kill()
        deadline = time.monotonic() + BOUND
        while time.monotonic() < deadline:  # wait for it to become a zombie, unreaped
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.01)
        assert remove_leftovers(str(tmp_path)) == [str(leftover)]
        assert not leftover.exists()
    finally:
        child.kill()
        child.wait(BOUND)
        child.stdout.close()
