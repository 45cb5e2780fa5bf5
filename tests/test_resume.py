"""Resumable ``.npy`` outputs: the journal beside the output, and ``resume=True``.

The main case runs the job in a real parent process and kills it with SIGKILL mid-job; the
test then resumes the job and counts, through the kernel's log, which chunks ran again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import faults
from helpers import BOUND
from memmap_pool import JournalMismatchError, MemmapPool, MemmapPoolError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PAGE = 4096  # the journal's header; one byte per chunk follows

SHAPE = (120, 1024)
CHUNKS = 2
COUNT = SHAPE[0] // CHUNKS

PARENT = textwrap.dedent(
    """
    import json, os, sys
    import faults
    from memmap_pool import MemmapPool

    out, log, base = sys.argv[1:4]
    with MemmapPool(2, mp_context="fork", temp_dir=base) as pool:
        print(json.dumps({"pid": os.getpid()}), flush=True)
        pool.map_chunks(faults.counting, %r, "int64", chunks=%d, out=out,
                        kwargs={"log": log, "delay": 0.1})
    print(json.dumps({"finished": True}), flush=True)
    """
) % (SHAPE, CHUNKS)


def journal_flags(path: str) -> np.ndarray:
    """The done-flags in the journal of the output ``path``, read straight from the file."""
    with open(path + ".journal", "rb") as f:
        f.seek(PAGE)
        return np.frombuffer(f.read(), dtype=np.uint8).copy()


def read_files(*paths: str) -> dict[str, bytes]:
    found = {}
    for path in paths:
        with open(path, "rb") as f:
            found[path] = f.read()
    return found


def run_counting(pool: MemmapPool, out: str, log: str, **kwargs):
    return pool.map_chunks(
        faults.counting, SHAPE, "int64", chunks=CHUNKS, out=out, kwargs={"log": log}, **kwargs
    )


@pytest.mark.timeout(90)
def test_parent_killed_mid_job_then_resume_recomputes_only_the_missing_chunks(tmp_path):
    """SIGKILL the parent once some chunks are journaled; resume=True then runs exactly the
    chunks the journal lacks, and the output equals an uninterrupted run's."""
    out = str(tmp_path / "result.npy")
    first_log = str(tmp_path / "first")
    base = tmp_path / "pool-tmp"
    base.mkdir()
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([TESTS_DIR, *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), out, first_log, str(base)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        pid = json.loads(proc.stdout.readline())["pid"]
        deadline = time.monotonic() + BOUND
        while True:  # until a few chunks are in the journal on disk
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no chunk was journaled"
            if os.path.exists(out + ".journal") and journal_flags(out).sum() >= 4:
                break
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=BOUND)
    assert proc.returncode == -signal.SIGKILL

    journaled = set(np.flatnonzero(journal_flags(out)).tolist())
    finished_before = set(faults.read_log(first_log))
    assert 4 <= len(journaled) < COUNT
    # A chunk is journaled only once it is done (in the file, flushed).
    assert journaled <= finished_before

    second_log = str(tmp_path / "second")
    with MemmapPool(2, mp_context="fork", temp_dir=base) as pool:
        result = run_counting(pool, out, second_log, resume=True)
        rerun = faults.read_log(second_log)
        assert sorted(rerun) == sorted(set(range(COUNT)) - journaled)
        assert np.array_equal(result, faults.expected(SHAPE))
        del result
        reference = run_counting(pool, str(tmp_path / "reference.npy"), None)
        assert np.array_equal(np.load(out), np.asarray(reference))
        del reference
    assert not os.path.exists(out + ".journal")
    # The dead parent's temporary files went when the new pool started in that dir.
    assert list(base.iterdir()) == []


@pytest.mark.timeout(60)
def test_resume_after_a_failed_job_runs_only_the_chunks_that_did_not_finish(fork_pool, tmp_path):
    """A job that failed on a kernel exception keeps its journal; the resumed job runs only
    the chunks that were not done, and gets the right output."""
    out = str(tmp_path / "r.npy")
    log = str(tmp_path / "log")
    with pytest.raises(faults.InjectedError):
        fork_pool.map_chunks(
            faults.raise_on,
            SHAPE,
            "int64",
            chunks=CHUNKS,
            out=out,
            kwargs={"victim": 40, "log": log},
        )
    assert os.path.exists(out + ".journal")
    done_first = set(np.flatnonzero(journal_flags(out)).tolist())
    assert 40 not in done_first
    assert done_first <= set(faults.read_log(log))

    log2 = str(tmp_path / "log2")
    result = run_counting(fork_pool, out, log2, resume=True)
    assert sorted(faults.read_log(log2)) == sorted(set(range(COUNT)) - done_first)
    assert np.array_equal(result, faults.expected(SHAPE))
    assert not os.path.exists(out + ".journal")


def test_journal_holds_the_chunks_done_before_a_kernel_error_when_it_is_raised(tmp_path):
    """When a job's future reports a kernel's error, the journal on disk already has every
    chunk the job finished, so a resume started at once recomputes none of them."""
    out = str(tmp_path / "r.npy")
    log = str(tmp_path / "log")
    with MemmapPool(1, mp_context="fork") as pool:
        # One worker runs the chunks in order: 0..39 finish before chunk 40 raises.
        job = pool.submit_chunks(
            faults.raise_on,
            SHAPE,
            "int64",
            chunks=CHUNKS,
            out=out,
            kwargs={"victim": 40, "log": log},
        )
        assert isinstance(job.exception(timeout=BOUND), faults.InjectedError)
        done = set(np.flatnonzero(journal_flags(out)).tolist())  # read at once
    assert set(range(40)) <= done
    assert 40 not in done


@pytest.mark.timeout(60)
def test_resume_with_auto_chunks_on_a_pool_of_another_size_keeps_the_journals_plan(
    fork_pool, tmp_path
):
    """A job resumed on a pool of another size follows its journal's chunking and runs only
    the missing chunks; "auto" itself does not depend on the pool's size either."""
    out = str(tmp_path / "r.npy")
    shape = (512, 1024)  # 4 MiB: 16 auto chunks of 256 KiB, whatever the pool
    with pytest.raises(faults.InjectedError):
        fork_pool.map_chunks(faults.raise_on, shape, "int64", out=out, kwargs={"victim": 10})
    flags = journal_flags(out)
    assert len(flags) == 16
    done_first = set(np.flatnonzero(flags).tolist())
    log = str(tmp_path / "log")
    with MemmapPool(1, mp_context="fork") as small:
        result = small.map_chunks(
            faults.counting, shape, "int64", out=out, resume=True, kwargs={"log": log}
        )
        assert sorted(faults.read_log(log)) == sorted(set(range(16)) - done_first)
        assert np.array_equal(result, faults.expected(shape))
        del result
    # Without resume, a pool of one worker plans the same chunks afresh.
    with MemmapPool(1, mp_context="fork") as small, pytest.raises(faults.InjectedError):
        small.map_chunks(faults.raise_on, shape, "int64", out=out, kwargs={"victim": 0})
    assert len(journal_flags(out)) == 16


@pytest.mark.timeout(60)
def test_completed_job_leaves_no_journal_and_resuming_it_runs_nothing(fork_pool, tmp_path):
    """A job that completes removes its journal; resume=True on its output runs no chunk."""
    out = str(tmp_path / "done.npy")
    log = str(tmp_path / "log")
    run_counting(fork_pool, out, log)
    assert sorted(faults.read_log(log)) == list(range(COUNT))
    assert not os.path.exists(out + ".journal")
    again = str(tmp_path / "again")
    result = run_counting(fork_pool, out, again, resume=True)
    assert faults.read_log(again) == []
    assert np.array_equal(result, faults.expected(SHAPE))


@pytest.mark.timeout(60)
def test_without_resume_an_existing_output_and_journal_are_replaced(fork_pool, tmp_path):
    """Without resume=True, the output is written afresh: every chunk runs, whatever an
    older journal says."""
    out = str(tmp_path / "r.npy")
    with pytest.raises(faults.InjectedError):
        fork_pool.map_chunks(
            faults.raise_on, SHAPE, "int64", chunks=CHUNKS, out=out, kwargs={"victim": 30}
        )
    assert journal_flags(out).sum() > 0
    log = str(tmp_path / "log")
    result = run_counting(fork_pool, out, log)
    assert sorted(faults.read_log(log)) == list(range(COUNT))
    assert np.array_equal(result, faults.expected(SHAPE))
    assert not os.path.exists(out + ".journal")

    np.save(out, np.full(SHAPE, -1, dtype="int64"))
    log = str(tmp_path / "log3")
    result = run_counting(fork_pool, out, log)
    assert sorted(faults.read_log(log)) == list(range(COUNT))
    assert np.array_equal(np.load(out), faults.expected(SHAPE))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("change", "kwargs"),
    [
        ("shape", {"shape": (SHAPE[0] + 2, SHAPE[1])}),
        ("dtype", {"dtype": "int32"}),
        ("order", {"order": "F"}),
        ("chunks", {"chunks": CHUNKS * 2}),
    ],
)
def test_resume_refuses_a_journal_written_for_another_plan(fork_pool, tmp_path, change, kwargs):
    """resume=True with another shape, dtype, order or chunking than the journal's raises
    JournalMismatchError before any work, and overwrites nothing."""
    out = str(tmp_path / "r.npy")
    with pytest.raises(faults.InjectedError):
        fork_pool.map_chunks(
            faults.raise_on, SHAPE, "int64", chunks=CHUNKS, out=out, kwargs={"victim": 30}
        )
    before = read_files(out, out + ".journal")
    log = str(tmp_path / "log")
    call = {"shape": SHAPE, "dtype": "int64", "chunks": CHUNKS, **kwargs}
    with pytest.raises(JournalMismatchError) as info:
        fork_pool.map_chunks(
            faults.counting,
            call["shape"],
            call["dtype"],
            chunks=call["chunks"],
            order=kwargs.get("order", "C"),
            out=out,
            resume=True,
            kwargs={"log": log},
        )
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, MemmapPoolError)
    assert "resume=False" in str(err)
    assert out in str(err)
    assert not os.path.exists(log)  # nothing ran
    assert read_files(*before) == before


@pytest.mark.timeout(60)
def test_resume_refuses_a_file_that_is_not_a_journal(fork_pool, tmp_path):
    """A damaged journal is refused with JournalMismatchError rather than trusted."""
    out = str(tmp_path / "r.npy")
    run_counting(fork_pool, out, None)  # an output of ours, then a damaged journal
    with open(out + ".journal", "wb") as f:
        f.write(b"not a journal")
    with pytest.raises(JournalMismatchError, match="not a memmap-pool journal"):
        run_counting(fork_pool, out, None, resume=True)


def test_a_journal_replaced_by_a_newer_job_is_neither_written_nor_removed(tmp_path):
    """A job whose output was taken over by a newer job (same path, journal replaced) no
    longer writes its flags into the journal, nor removes it when it ends."""
    from memmap_pool._resume import Journal

    path = str(tmp_path / "r.npy.journal")
    plan = {"shape": [8], "itemsize": 8, "order": "C", "block": [1], "count": 8}
    synced = Journal.create(path, plan)
    synced.mark([0])
    synced.sync()  # holds the file open from here on
    unsynced = Journal.load(path)  # opens it only when it first has flags to write
    new = Journal.create(path, plan)
    for old in (synced, unsynced):
        old.mark([1, 2])
        old.sync()
        old.remove()
    assert os.path.exists(path)
    assert Journal.load(path).done.tolist() == [0] * 8
    new.mark([5])
    new.sync()
    assert Journal.load(path).done.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    new.remove()
    assert not os.path.exists(path)


def test_resume_needs_a_npy_output(fork_pool):
    """resume=True without a .npy ``out`` is a ValueError naming what it needs."""
    with pytest.raises(ValueError, match=r"resume=True needs out= to be a \.npy path"):
        fork_pool.map_chunks(faults.counting, SHAPE, "int64", resume=True)
