"""Data loss and wrong results: jobs sharing an output, subarray dtypes, a forked child's
exit, interrupted or failed file creation, and workers outliving a parent killed while
their kernel holds the GIL.

Whatever the library decides in each case (refuse, queue, raise), it must never hand back
values that are not the job's own, lose an update, or remove a file that is still in use.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import faults
from memmap_pool import MemmapPool

BOUND = 60.0
"""Seconds only a hang reaches."""

SHAPE = (64, 512)
CHUNKS = 8
"""With ``chunks=CHUNKS``: 8 chunks of 32 KiB."""


def temp_dir(tmp_path: Path) -> str:
    path = tmp_path / "temp"
    path.mkdir(exist_ok=True)
    return str(path)


def outcome(job) -> np.ndarray | BaseException:
    """A copy of the job's result, or the exception it raised."""
    try:
        return np.array(job.result(timeout=BOUND))
    except Exception as exc:
        return exc


# -- two jobs on one output --------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_two_jobs_on_the_same_npy_path_never_return_each_others_values(fork_pool, tmp_path):
    """A second job given the .npy path of a running job is refused or waits its turn: no
    job returns an array holding values it did not write."""
    out = str(tmp_path / "x.npy")
    first = fork_pool.submit_chunks(
        faults.fill_value, SHAPE, "int64", chunks=CHUNKS, out=out, args=(1, 0.05)
    )
    deadline = time.monotonic() + BOUND
    while first.progress.done < 1:  # the first job's workers have the file open
        assert time.monotonic() < deadline, "the first job did not start"
        time.sleep(0.005)
    try:
        second = fork_pool.submit_chunks(
            faults.fill_value, SHAPE, "int64", chunks=CHUNKS, out=out, args=(2, 0.05)
        )
    except Exception:
        second = None  # refused: a clear outcome
    results = {"first": (1, outcome(first))}
    if second is not None:
        results["second"] = (2, outcome(second))
    for name, (value, result) in results.items():
        if isinstance(result, BaseException):
            continue  # an error is a clear outcome too
        found = sorted(np.unique(result).tolist())
        assert found == [value], f"the {name} job returned values {found}, not only {value}"


@pytest.mark.timeout(90)
def test_two_in_place_updates_of_the_same_memmap_lose_no_update(fork_pool, tmp_path):
    """Two jobs adding 1 in place to the same np.memmap at once: the second is refused, or
    both apply; every element ends up incremented once per job that succeeded."""
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype="int64", shape=SHAPE)
    jobs = []
    for _ in range(2):
        try:
            jobs.append(
                fork_pool.submit_chunks(
                    faults.increment,
                    SHAPE,
                    chunks=SHAPE[0],  # one chunk: each job's runs on a worker of its own
                    out=mm,
                    kwargs={"delay": 0.5},
                    retries=0,
                )
            )
        except Exception:
            pass  # refused
    assert jobs, "the first job was refused"
    succeeded = sum(not isinstance(outcome(job), BaseException) for job in jobs)
    values, counts = np.unique(np.asarray(mm), return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist()))
    assert found == {succeeded: mm.size}, (
        f"{succeeded} job(s) succeeded, but the values are {found} (value: count)"
    )
    del mm


# -- subarray dtypes ---------------------------------------------------------------------------

SUBARRAY = np.dtype(("f8", (3,)))
ROWS = np.repeat(np.arange(4, dtype="f8")[:, None], 3, axis=1)
"""What :func:`faults.row_index` computes for shape (4,) of SUBARRAY with ``chunks=1``."""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["temporary", "npy"])
def test_subarray_dtype_gives_a_float64_array_with_the_subarray_axes(fork_pool, tmp_path, where):
    """map_chunks((4,), dtype(("f8", (3,)))) returns a float64 array of shape (4, 3), and a
    .npy output's header says <f8 and (4, 3), not |V24."""
    out = None if where == "temporary" else str(tmp_path / "x.npy")
    result = fork_pool.map_chunks(faults.row_index, (4,), SUBARRAY, chunks=1, out=out)
    assert (result.dtype, result.shape) == (np.dtype("f8"), (4, 3))
    assert np.array_equal(result, ROWS)
    del result
    if out is not None:
        with open(out, "rb") as f:
            version = np.lib.format.read_magic(f)
            assert version == (1, 0)
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        assert (dtype.str, shape) == ("<f8", (4, 3))


@pytest.mark.timeout(60)
def test_resume_of_an_unfinished_subarray_dtype_output_is_accepted(fork_pool, tmp_path):
    """resume=True on the pool's own unfinished .npy of a subarray-dtype job runs the
    missing chunks and returns the whole float64 (4, 3) array."""
    out = str(tmp_path / "x.npy")
    with pytest.raises(faults.InjectedError):
        fork_pool.map_chunks(
            faults.row_index, (4,), SUBARRAY, chunks=1, out=out, kwargs={"fail_on": 1}
        )
    assert os.path.exists(out + ".journal")
    result = fork_pool.map_chunks(faults.row_index, (4,), SUBARRAY, chunks=1, out=out, resume=True)
    assert (result.dtype, result.shape) == (np.dtype("f8"), (4, 3))
    assert np.array_equal(result, ROWS)
    del result


# -- a forked child's exit ---------------------------------------------------------------------

FORK_SCRIPT = """
import json, os, sys

import faults
from memmap_pool import MemmapPool

pool = MemmapPool(2, mp_context="fork")
result = pool.map_chunks(faults.counting, (64, 64), "int64")
child = os.fork()
if child == 0:
    sys.exit(0)  # the child leaves through the interpreter's exit, with its atexit hooks
_, status = os.waitpid(child, 0)
report = {"child_status": status, "result_file_exists": os.path.exists(result.filename)}
try:
    again = pool.map_chunks(faults.counting, (64, 64), "int64")
    report["next_job"] = bool((again == faults.expected((64, 64))).all())
except Exception as exc:
    report["next_job"] = f"{type(exc).__name__}: {exc}"
report["result_intact"] = bool((result == faults.expected((64, 64))).all())
print("REPORT " + json.dumps(report), flush=True)
pool.shutdown()
"""


@pytest.mark.timeout(90)
def test_forked_child_exiting_keeps_the_parents_result_file_and_jobs(tmp_path):
    """A child forked from a process holding a pool and a temporary result, leaving through
    sys.exit(0), neither unlinks the parent's result file nor breaks the parent's pool."""
    script = tmp_path / "fork_child.py"
    script.write_text(textwrap.dedent(FORK_SCRIPT))
    done = faults.run_python([script], env=faults.script_env(temp_dir(tmp_path)), timeout=BOUND)
    assert not done.hung, done
    (report,) = done.reports()
    assert report["child_status"] == 0, done
    assert report["result_file_exists"], f"the child removed the parent's result: {report}"
    assert report["next_job"] is True, report
    assert report["result_intact"], report


# -- files of a job that never started ---------------------------------------------------------


@pytest.mark.timeout(90)
def test_ctrl_c_while_an_input_is_written_removes_the_partial_file(tmp_path):
    """KeyboardInterrupt while the pool writes an in-memory input to its temp dir removes
    that file before the exception leaves map_chunks, with the pool still open."""
    assert threading.current_thread() is threading.main_thread()
    base = tmp_path / "pool-tmp"
    base.mkdir()
    big = np.ones((256, 1 << 17))  # 256 MiB: writing it takes a good fraction of a second
    dumps = str(base / "memmap-pool-*" / "in*")
    armed = threading.Event()

    def interrupt(signum, frame):
        if armed.is_set():
            armed.clear()
            raise KeyboardInterrupt

    def watch() -> None:
        deadline = time.monotonic() + BOUND
        while armed.is_set() and time.monotonic() < deadline:
            if glob.glob(dumps):  # the input is being written: press Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.0005)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        with MemmapPool(2, mp_context="fork", temp_dir=base) as pool:
            # On a busy machine the watcher may see the file too late: the write is tried
            # again until one attempt is interrupted (each attempt must leave nothing).
            for _attempt in range(5):
                armed.set()
                watcher = threading.Thread(target=watch)
                watcher.start()
                try:
                    pool.map_chunks(faults.takes_arg, big.shape, "float64", inputs=[big])
                except KeyboardInterrupt:
                    interrupted = True
                else:
                    interrupted = False
                finally:
                    armed.clear()
                    watcher.join()
                left = glob.glob(dumps)
                assert left == [], f"the input file stayed: {left}"
                if interrupted:
                    break
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted, "every job finished before its input file was seen"


@pytest.mark.timeout(60)
def test_failed_npy_creation_leaves_no_temporary_file(fork_pool, tmp_path):
    """out= naming an existing directory "x.npy" fails and leaves no x.npy.*.tmp (nor a
    journal) behind."""
    (tmp_path / "x.npy").mkdir()
    with pytest.raises(OSError):  # noqa: PT011 - which OSError is the library's choice
        fork_pool.map_chunks(faults.counting, SHAPE, "int64", out=str(tmp_path / "x.npy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


# -- a parent killed while a kernel holds the GIL ----------------------------------------------

GIL_SCRIPT = """
import json, os, sys

import psutil

import faults
from memmap_pool import MemmapPool

HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")

if __name__ == "__main__":
    method, pidfile = sys.argv[1:3]
    pool = MemmapPool(2, mp_context=method)
    pool.map_chunks(faults.counting, (64, 8), "int64", chunks=8)  # the workers are up
    me = psutil.Process()
    helpers = {p.pid for p in me.children() if any(h in " ".join(p.cmdline()) for h in HELPERS)}
    workers = [p.pid for p in me.children(recursive=True) if p.pid not in helpers]
    print("REPORT " + json.dumps(workers), flush=True)
    pool.map_chunks(faults.hold_gil, (1,), "int64", args=(pidfile, 30))
"""


@pytest.mark.timeout(90)
def test_workers_exit_soon_after_the_parent_is_killed_while_a_kernel_holds_the_gil(
    tmp_path, start_method
):
    """The parent SIGKILLed while a kernel blocks in C with the GIL held: every worker of
    its pool is gone within a few seconds, not once the native call returns."""
    script = tmp_path / "gil.py"
    script.write_text(textwrap.dedent(GIL_SCRIPT))
    pidfile = tmp_path / "kernel.pid"
    proc = faults.start_python(
        [script, start_method, pidfile], env=faults.script_env(temp_dir(tmp_path))
    )
    try:
        workers = json.loads(proc.stdout.readline().removeprefix("REPORT "))
        deadline = time.monotonic() + BOUND
        while not pidfile.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the kernel did not start"
            time.sleep(0.01)
        holder = int(pidfile.read_text())
        time.sleep(0.5)  # the kernel is in its native call
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(BOUND)
        deadline = time.monotonic() + 5.0
        while (alive := [p for p in {holder, *workers} if running(p)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
    finally:
        faults.kill_session(proc.pid)  # a worker still in its native call holds the pipes
        faults.finish_python(proc, BOUND)
    assert workers, "the parent reported no workers"
    assert alive == [], f"workers {alive} outlived their killed parent by 5 s"


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
