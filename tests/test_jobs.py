"""Jobs: several at once in one pool, fairness, cancel, progress, chunk results, statistics,
progress bars, and the concurrent.futures helpers on jobs."""

from __future__ import annotations

import concurrent.futures as cf
import glob
import logging
import os
import threading
import time

import numpy as np
import pytest

from memmap_pool import Job, MemmapPool, Progress

WAIT = 60.0
"""Seconds any wait in these tests may take; only a deadlock reaches it."""


def wait_until(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


def append_line(path: str, text: str) -> None:
    """One O_APPEND write per line: lines of several workers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


# -- kernels -----------------------------------------------------------------------------------


def index_fill(out, chunk, offset=0, delay=0.0, log=None, tag=""):
    """Fill the chunk with its row numbers plus ``offset``; optionally log and sleep."""
    if log is not None:
        append_line(log, f"{tag}{chunk.index}")
    if delay:
        time.sleep(delay)
    rows = np.arange(chunk.slices[0].start, chunk.slices[0].stop) + offset
    out[...] = rows.reshape((-1,) + (1,) * (out.ndim - 1))


def gated_fill(out, chunk, log, gate, free):
    """Log the chunk's start; chunks from ``free`` on then wait for the file ``gate``."""
    append_line(log, str(chunk.index))
    if chunk.index >= free:
        deadline = time.monotonic() + WAIT
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.005)
    out[...] = chunk.index


def partial_sum(out, chunk):
    """Fill with ones and return the chunk's index and sum: a reduction's partial value."""
    out[...] = 1
    return chunk.index, int(out.sum())


def odd_chunks_return(out, chunk):
    out[...] = 0
    return chunk.index if chunk.index % 2 else None


def add_inputs(out, chunk, a, b):
    out[...] = a + b


def fail_on_chunk(out, chunk, bad):
    if chunk.index == bad:
        msg = f"chunk {chunk.index} is bad"
        raise ValueError(msg)
    out[...] = chunk.index


def expected_rows(shape, dtype, offset=0):
    rows = np.arange(shape[0]) + offset
    return np.broadcast_to(rows.reshape((-1,) + (1,) * (len(shape) - 1)), shape).astype(dtype)


def job_files(temp_dir) -> list[str]:
    return glob.glob(os.path.join(str(temp_dir), "memmap-pool-*", "*"))


# -- several jobs ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_two_jobs_in_one_pool_run_at_once_with_correct_results(fork_pool, tmp_path):
    """Two jobs submitted together both run, interleaved on the workers, and both are right."""
    log = str(tmp_path / "log")
    a_in = np.arange(40 * 7, dtype=np.float64).reshape(40, 7)
    b_in = np.ones((40, 7))
    job_a = fork_pool.submit_chunks(
        index_fill, (40, 7), "int32", chunks=1, kwargs={"log": log, "tag": "a", "delay": 0.01}
    )
    job_b = fork_pool.submit_chunks(add_inputs, (40, 7), "float64", chunks=1, inputs=[a_in, b_in])
    job_c = fork_pool.submit_chunks(
        index_fill, (30, 3), "int64", chunks=1, kwargs={"log": log, "tag": "c", "offset": 5}
    )
    _, not_done = cf.wait([job_a, job_b, job_c], timeout=WAIT)
    assert not not_done
    np.testing.assert_array_equal(job_a.result(), expected_rows((40, 7), "int32"))
    np.testing.assert_array_equal(job_b.result(), a_in + b_in)
    np.testing.assert_array_equal(job_c.result(), expected_rows((30, 3), "int64", 5))
    order = read_lines(log)
    assert sorted(order) == sorted([f"a{i}" for i in range(40)] + [f"c{i}" for i in range(30)])
    # The jobs shared the workers: a chunk of c ran before the last chunk of a.
    first_c = min(i for i, t in enumerate(order) if t.startswith("c"))
    last_a = max(i for i, t in enumerate(order) if t.startswith("a"))
    assert first_c < last_a


@pytest.mark.timeout(60)
def test_small_job_finishes_before_a_big_one_submitted_earlier(fork_pool):
    """A two-chunk job submitted after a long job gets workers at once and finishes first."""
    big = fork_pool.submit_chunks(
        index_fill, (120, 4), "int32", chunks=1, kwargs={"delay": 0.03}, name="big"
    )
    small = fork_pool.submit_chunks(index_fill, (2, 4), "int32", chunks=1, name="small")
    completed = cf.as_completed([big, small], timeout=WAIT)
    first = next(completed)
    assert first is small
    progress = big.progress
    assert not big.done()
    assert progress.done < progress.total == 120
    assert next(completed) is big
    np.testing.assert_array_equal(big.result(), expected_rows((120, 4), "int32"))
    np.testing.assert_array_equal(small.result(), expected_rows((2, 4), "int32"))


@pytest.mark.timeout(60)
def test_as_completed_yields_every_job_once_with_its_result(fork_pool):
    """concurrent.futures.as_completed works on jobs: each is yielded once, finished."""
    shapes = {(64, 3): 16, (5, 5): 1, (200,): 50, (33, 2): 4}
    jobs = {
        fork_pool.submit_chunks(index_fill, shape, "int64", chunks=rows, kwargs={"offset": k}): (
            shape,
            k,
        )
        for k, (shape, rows) in enumerate(shapes.items())
    }
    seen = []
    for job in cf.as_completed(jobs, timeout=WAIT):
        assert isinstance(job, Job)
        assert job.done()
        shape, k = jobs[job]
        np.testing.assert_array_equal(job.result(), expected_rows(shape, "int64", k))
        seen.append(job)
    assert len(seen) == len(set(seen)) == len(jobs)


# -- cancel ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cancel_of_a_running_job_drops_chunks_not_started(tmp_path):
    """cancel() stops a running job: the two chunks being computed finish, no other chunk
    starts, result() raises CancelledError, wait() sees it, files go, the pool still works."""
    temp_dir = tmp_path / "temp"
    temp_dir.mkdir()
    log, gate = str(tmp_path / "log"), str(tmp_path / "gate")
    with MemmapPool(2, mp_context="fork", temp_dir=temp_dir) as pool:
        job = pool.submit_chunks(
            gated_fill, (50, 8), "int32", chunks=1, kwargs={"log": log, "gate": gate, "free": 2}
        )
        waited: list[set[cf.Future]] = []
        waiter = threading.Thread(
            target=lambda: waited.append(cf.wait([job], timeout=WAIT).done), daemon=True
        )
        waiter.start()
        # Chunks 0 and 1 finish; then both workers hold a chunk that waits for the gate.
        wait_until(lambda: len(read_lines(log)) >= 4, "both workers to block in a chunk")
        assert job.running()
        assert job.cancel() is True
        assert job.cancelled()
        assert job.done()
        waiter.join(WAIT)
        assert waited == [{job}]
        with pytest.raises(cf.CancelledError):
            job.result(timeout=WAIT)
        open(gate, "w").close()  # let the two running chunks finish
        wait_until(lambda: not job_files(temp_dir), "the cancelled job's files to go")
        started = read_lines(log)
        assert sorted(map(int, started)) == [0, 1, 2, 3]
        assert job.progress.done <= 4
        assert job.cancel() is True  # cancelling again is harmless
        after = pool.map_chunks(index_fill, (10, 2), "int16", chunks=3)
        np.testing.assert_array_equal(after, expected_rows((10, 2), "int16"))


@pytest.mark.timeout(60)
def test_cancel_before_the_job_starts_runs_nothing(fork_pool, tmp_path):
    """A job cancelled as soon as it is submitted runs no chunk, or at most its first ones."""
    log = str(tmp_path / "log")
    job = fork_pool.submit_chunks(
        index_fill, (400, 2), "int32", chunks=1, kwargs={"log": log, "delay": 0.02}
    )
    assert job.cancel()
    with pytest.raises(cf.CancelledError):
        job.result(timeout=WAIT)
    with pytest.raises(cf.CancelledError):
        job.chunk_results(timeout=WAIT)
    fork_pool.map_chunks(index_fill, (4, 2), "int32")  # the pool still works
    assert len(read_lines(log)) < 400


def test_a_finished_job_cannot_be_cancelled(fork_pool):
    """cancel() of a finished job returns False and leaves its result."""
    job = fork_pool.submit_chunks(index_fill, (8, 2), "int32", chunks=2)
    result = job.result(timeout=WAIT)
    assert job.cancel() is False
    assert not job.cancelled()
    np.testing.assert_array_equal(result, expected_rows((8, 2), "int32"))


# -- progress ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_progress_rises_monotonically_to_the_total(fork_pool):
    """job.progress and progress callbacks only go up, and end at (total, total)."""
    calls: list[Progress] = []
    job = fork_pool.submit_chunks(index_fill, (60, 5), "int32", chunks=1, kwargs={"delay": 0.005})
    job.add_progress_callback(calls.append)
    polled = []
    while not job.done():
        polled.append(job.progress.done)
        time.sleep(0.005)
    job.result(timeout=WAIT)
    assert job.progress == Progress(60, 60)
    assert job.progress.fraction == 1.0
    assert calls, "no progress callback was called"
    dones = [p.done for p in calls]
    assert dones == sorted(dones)
    assert all(p.total == 60 and 0 <= p.done <= 60 for p in calls)
    assert dones[-1] == 60
    assert polled == sorted(polled)
    assert all(0 <= d <= 60 for d in polled)


def test_progress_callback_on_a_finished_job_is_called_at_once(fork_pool):
    """A callback added after the job ended gets the final progress right away."""
    job = fork_pool.submit_chunks(index_fill, (9, 2), "int32", chunks=3)
    job.result(timeout=WAIT)
    calls: list[Progress] = []
    job.add_progress_callback(calls.append)
    assert calls == [Progress(3, 3)]


@pytest.mark.timeout(60)
def test_a_failing_progress_callback_is_logged_and_the_job_completes(fork_pool, caplog):
    """An exception in a progress callback is logged; the job still finishes correctly."""

    def broken(p):
        raise RuntimeError("callback bug")

    caplog.set_level(logging.ERROR, logger="memmap_pool")
    job = fork_pool.submit_chunks(index_fill, (20, 2), "int32", chunks=2)
    job.add_progress_callback(broken)
    np.testing.assert_array_equal(job.result(timeout=WAIT), expected_rows((20, 2), "int32"))
    # The callback may have missed every update if the job finished before it was added.
    if any(r.exc_info for r in caplog.records):
        assert any("callback bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    job2 = fork_pool.submit_chunks(index_fill, (20, 2), "int32", chunks=2, kwargs={"delay": 0.01})
    job2.add_progress_callback(broken)
    job2.result(timeout=WAIT)
    assert any(r.exc_info and "callback bug" in str(r.exc_info[1]) for r in caplog.records)


@pytest.mark.timeout(60)
def test_progress_of_a_resumed_job_starts_at_the_chunks_already_done(fork_pool, tmp_path):
    """Resuming counts the journal's chunks as done from the start, and in the statistics."""
    out = str(tmp_path / "out.npy")
    # A pool of its own: closing it waits for the failed job's last chunks to be journaled.
    with MemmapPool(2, mp_context="fork") as first, pytest.raises(ValueError, match="6 is bad"):
        first.map_chunks(fail_on_chunk, (12, 4), "int32", chunks=1, out=out, kwargs={"bad": 6})
    from memmap_pool._resume import Journal, journal_path

    done_before = Journal.load(journal_path(out)).done_count
    assert 0 < done_before < 12
    calls: list[Progress] = []
    job = fork_pool.submit_chunks(
        fail_on_chunk, (12, 4), "int32", chunks=1, out=out, resume=True, kwargs={"bad": -1}
    )
    assert job.progress.done >= done_before
    job.add_progress_callback(calls.append)
    result = job.result(timeout=WAIT)
    np.testing.assert_array_equal(result[:, 0], np.arange(12))
    assert all(p.done >= done_before for p in calls)
    stats = job.stats
    assert stats.chunks_resumed == done_before
    assert stats.chunks_done == 12
    assert stats.bytes_resumed == done_before * 4 * 4
    assert stats.bytes_written == result.nbytes
    assert job.chunk_results().count(None) == 12  # the kernel returns nothing


# -- chunk results and statistics --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_chunk_results_come_back_in_chunk_order(fork_pool):
    """chunk_results() lists each chunk's returned value by chunk index, None for none."""
    job = fork_pool.submit_chunks(partial_sum, (1000, 3), "int8", chunks=7)
    results = job.chunk_results(timeout=WAIT)
    count = -(-1000 // 7)
    assert [index for index, _ in results] == list(range(count))
    assert sum(total for _, total in results) == 3000
    assert results[-1] == (count - 1, (1000 - 7 * (count - 1)) * 3)
    odd = fork_pool.submit_chunks(odd_chunks_return, (9, 2), "int8", chunks=1)
    assert odd.chunk_results(timeout=WAIT) == [None, 1, None, 3, None, 5, None, 7, None]


@pytest.mark.timeout(60)
def test_job_stats_are_consistent(fork_pool):
    """stats: chunk counts, bytes written equal to the output size, ordered chunk times,
    utilisation between 0 and 1."""
    job = fork_pool.submit_chunks(
        index_fill, (48, 1000), "float64", chunks=4, kwargs={"delay": 0.002}
    )
    result = job.result(timeout=WAIT)
    stats = job.stats
    assert stats.chunks == stats.chunks_done == 12
    assert stats.chunks_resumed == 0
    assert stats.bytes_written == result.nbytes == 48 * 1000 * 8
    assert 0 < stats.chunk_time_min <= stats.chunk_time_median <= stats.chunk_time_max
    assert stats.busy_time >= stats.chunk_time_max
    assert stats.wall_time > 0
    assert 0.0 <= stats.utilisation <= 1.0
    assert stats.workers == 2
    assert stats.retries == 0
    assert stats.throughput > 0
    assert job.stats == stats  # final once the job is done


# -- progress bars -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_progress_bar_advances_to_the_total_when_forced(fork_pool, capsys):
    """progress="always" draws a tqdm bar on stderr that ends at total/total."""
    pytest.importorskip("tqdm", reason="progress bars need the tqdm extra")
    fork_pool.map_chunks(index_fill, (24, 2), "int32", chunks=2, progress="always", name="bar-test")
    err = capsys.readouterr().err
    assert "bar-test" in err
    assert "12/12" in err


@pytest.mark.timeout(60)
def test_progress_bar_is_quiet_when_stderr_is_not_a_terminal(fork_pool, capsys):
    """progress=True shows nothing when stderr is not a terminal (a log file, a pipe)."""
    pytest.importorskip("tqdm", reason="progress bars need the tqdm extra")
    result = fork_pool.map_chunks(index_fill, (24, 2), "int32", chunks=2, progress=True)
    np.testing.assert_array_equal(result, expected_rows((24, 2), "int32"))
    assert capsys.readouterr().err == ""


def test_bad_progress_value_is_refused(fork_pool):
    """progress= takes True, False or "always"; anything else is a ValueError up front."""
    with pytest.raises(ValueError, match="progress must be"):
        fork_pool.submit_chunks(index_fill, (4, 2), "int32", progress="sometimes")
