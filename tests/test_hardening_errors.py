"""Clear errors: bad arguments, damaged files and a too small disk are refused before any
work, with an error that says what is wrong; failures inside a job name their chunk; and
the library and the command say nothing misleading on stderr.

"Refused before any work" is checked by calling ``submit_chunks``: the error must come from
that call itself, not later from the job's ``result()``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import faults
from helpers import mount_tmpfs, unmount
from memmap_pool import (
    JournalMismatchError,
    MemmapPool,
    NotEnoughSpaceError,
    SerializationError,
)

SHAPE = (64, 8)
CHUNKS = 8
"""With ``chunks=CHUNKS``: 8 chunks of 8 rows."""

BOUND = 60.0
"""Seconds only a hang reaches."""

MiB = 1 << 20
PAGE = 4096
"""A journal's JSON header fills its first page."""


def text_of(exc: BaseException) -> str:
    """``str(exc)``, even for an exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except Exception as inner:
        return f"<str() raised {type(inner).__name__}>"


def refused_by_submit(pool: MemmapPool, expected, *args, **kwargs) -> BaseException:
    """Call ``pool.submit_chunks(*args, **kwargs)``, which must raise ``expected`` itself;
    return the exception. A job it accepts instead is waited for, and the test fails saying
    how that job ended."""
    try:
        job = pool.submit_chunks(*args, **kwargs)
    except expected as exc:
        return exc
    try:
        job.result(timeout=BOUND)
        then = "the job then succeeded"
    except BaseException as exc:
        then = f"the job then failed with {type(exc).__name__}: {text_of(exc)[:300]}"
    pytest.fail(f"submit_chunks started the job instead of raising {expected}; {then}")


def temp_dir(tmp_path: Path) -> str:
    path = tmp_path / "temp"
    path.mkdir(exist_ok=True)
    return str(path)


KERNELS = textwrap.dedent(
    '''
    """Kernels for the command-line tests."""
    import os
    import time


    def fill(out, chunk, delay=0.0, log=None, fail_at=None):
        if log:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, f"{chunk.index}\\n".encode())
            finally:
                os.close(fd)
        if chunk.index == fail_at:
            raise ValueError("bad value")
        if delay:
            time.sleep(delay)
        out[...] = chunk.index


    def copy(out, chunk, a):
        out[...] = a
    '''
)


@pytest.fixture
def kernels(tmp_path: Path) -> Path:
    path = tmp_path / "kernels" / "hardening_kernels.py"
    path.parent.mkdir()
    path.write_text(KERNELS)
    return path


def cli(tmp_path: Path, *args: object) -> faults.Finished:
    """Run the ``memmap-pool`` command in a process of its own."""
    done = faults.run_python(
        ["-m", "memmap_pool", *args],
        env=faults.script_env(temp_dir(tmp_path)),
        timeout=BOUND,
        cwd=tmp_path,
    )
    assert not done.hung, done
    return done


# -- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, -1])
def test_max_workers_below_one_raises_process_pool_executors_message(workers):
    """max_workers below 1 raises ValueError("max_workers must be greater than 0"), as
    ProcessPoolExecutor does."""
    with pytest.raises(ValueError, match=r"^max_workers must be greater than 0$"):
        MemmapPool(workers)


@pytest.mark.timeout(60)
def test_shape_too_large_for_any_machine_is_refused_before_any_allocation(fork_pool):
    """A (2**40, 2**40) float64 output with auto chunks raises ValueError or
    NotEnoughSpaceError, not numpy's "Unable to allocate" for the job's bookkeeping."""
    exc = refused_by_submit(
        fork_pool, (ValueError, NotEnoughSpaceError), faults.counting, (2**40, 2**40), "float64"
    )
    assert "Unable to allocate" not in str(exc)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", ["out", "chunk"])
def test_kwargs_colliding_with_the_kernels_out_or_chunk_are_refused_by_submit(fork_pool, key):
    """kwargs={"out": ...} or {"chunk": ...} for a kernel whose first parameters have
    those names is a TypeError from submit_chunks itself, before any chunk runs."""
    exc = refused_by_submit(
        fork_pool, TypeError, faults.counting, SHAPE, "int64", chunks=CHUNKS, kwargs={key: 1}
    )
    assert key in str(exc)


@pytest.mark.timeout(60)
def test_kwarg_named_out_is_accepted_by_a_kernel_whose_parameters_are_named_otherwise(
    fork_pool,
):
    """A kernel fn(dst, where, out=0) takes kwargs={"out": 5}: only a real collision with
    the first two parameters is refused."""
    result = fork_pool.map_chunks(
        faults.named_unlike_out, SHAPE, "int64", chunks=CHUNKS, kwargs={"out": 5}
    )
    assert np.array_equal(result, faults.expected(SHAPE) + 5)


@pytest.mark.timeout(60)
def test_temp_dir_variable_naming_a_missing_directory_is_a_clear_error(tmp_path, monkeypatch):
    """MEMMAP_POOL_TEMP_DIR naming a missing directory is a ValueError naming the variable,
    when the pool is created or when a job is submitted."""
    monkeypatch.setenv("MEMMAP_POOL_TEMP_DIR", str(tmp_path / "missing"))
    try:
        pool = MemmapPool(2, mp_context="fork")
    except ValueError as exc:
        error: BaseException = exc
    else:
        with pool:
            error = refused_by_submit(pool, ValueError, faults.counting, SHAPE, "int64")
    assert "MEMMAP_POOL_TEMP_DIR" in str(error)


# -- damaged input files -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_truncated_npy_input_is_refused_before_the_job_starts(fork_pool, tmp_path):
    """A .npy input whose header is fine but whose data is cut short is a ValueError naming
    the file, from submit_chunks itself."""
    path = tmp_path / "short_input.npy"
    np.save(path, np.arange(4096, dtype="float64"))
    os.truncate(path, 128 + 1000)  # the header, then 1000 of the 32768 bytes of data
    exc = refused_by_submit(fork_pool, ValueError, faults.takes_arg, (4096,), inputs=[str(path)])
    assert "short_input.npy" in str(exc)


def write_npy_header(path: Path, version: tuple[int, int], header: str) -> None:
    """A .npy file with the given format version and header text, and 800 bytes of data."""
    text = header.encode("latin1")
    width = 2 if version == (1, 0) else 4
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY" + bytes(version) + len(text).to_bytes(width, "little"))
        f.write(text + bytes(800))


CORRUPT_HEADERS = {
    # The header dict is cut off in the middle of the shape.
    "v1-unterminated": ((1, 0), "{'descr': '<f8', 'fortran_order': False, 'shape': (1" + " " * 40),
    "v3-unterminated": ((3, 0), "{'descr': '<f8', 'fortran_order': False, 'shape': (1" + " " * 40),
    "v3-no-shape": ((3, 0), "{'descr': '<f8', 'fortran_order': False, }" + " " * 40 + "\n"),
    # No such format version (numpy writes 1.0, 2.0 and 3.0).
    "v9-unknown-version": (
        (9, 9),
        "{'descr': '<f8', 'fortran_order': False, 'shape': (100,), }" + " " * 40 + "\n",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CORRUPT_HEADERS))
def test_npy_input_with_a_corrupt_header_is_a_value_error(fork_pool, tmp_path, case):
    """An input whose .npy header is corrupt is a ValueError from submit_chunks."""
    path = tmp_path / "bad.npy"
    write_npy_header(path, *CORRUPT_HEADERS[case])
    refused_by_submit(fork_pool, ValueError, faults.takes_arg, (100,), inputs=[str(path)])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CORRUPT_HEADERS))
def test_cli_run_with_an_input_whose_header_is_corrupt_exits_2(tmp_path, kernels, case):
    """``memmap-pool run --input bad.npy`` with a corrupt header exits 2 (bad usage), with
    a one-line error and no traceback."""
    path = tmp_path / "bad.npy"
    write_npy_header(path, *CORRUPT_HEADERS[case])
    done = cli(
        tmp_path, "run", f"{kernels}:copy", "--shape", "100", "--input", path,
        "--out", tmp_path / "out.npy", "--workers", "1",
    )  # fmt: skip
    assert done.returncode == 2, done
    assert done.tracebacks == 0, done
    assert not (tmp_path / "out.npy").exists()


# -- damaged journals --------------------------------------------------------------------------


def unfinished_output(pool: MemmapPool, out: Path) -> None:
    """Leave ``out`` unfinished, with its journal beside it: chunk 1 of 8 fails."""
    with pytest.raises(faults.InjectedError):
        pool.map_chunks(
            faults.raise_on, SHAPE, "int64", chunks=CHUNKS, out=str(out), kwargs={"victim": 1}
        )
    assert Path(f"{out}.journal").exists()


JOURNAL_DAMAGE = {
    "a-list": lambda meta: [meta],
    "no-plan": lambda meta: {k: v for k, v in meta.items() if k != "plan"},
    "no-count": lambda meta: {
        **meta,
        "plan": {k: v for k, v in meta["plan"].items() if k != "count"},
    },
    "absurd-count": lambda meta: {**meta, "plan": {**meta["plan"], "count": 10**15}},
}


def damage_journal(out: Path, case: str) -> None:
    """Replace the JSON header of the journal beside ``out``, keeping its done-flags."""
    path = Path(f"{out}.journal")
    raw = path.read_bytes()
    meta = json.loads(raw[:PAGE].decode())
    text = json.dumps(JOURNAL_DAMAGE[case](meta)).encode()
    path.write_bytes(text + b" " * (PAGE - len(text) - 1) + b"\n" + raw[PAGE:])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunks", [CHUNKS, None], ids=["chunks=8", "chunks=auto"])
@pytest.mark.parametrize("case", sorted(JOURNAL_DAMAGE))
def test_resume_with_a_corrupt_journal_raises_journal_mismatch_error(
    fork_pool, tmp_path, case, chunks
):
    """resume=True beside a journal whose header is a list, lacks a key or holds an absurd
    chunk count raises JournalMismatchError about the journal (not AttributeError, KeyError
    or MemoryError)."""
    out = tmp_path / "result.npy"
    unfinished_output(fork_pool, out)
    damage_journal(out, case)
    with pytest.raises(JournalMismatchError, match="journal"):
        fork_pool.map_chunks(
            faults.counting, SHAPE, "int64", chunks=chunks, out=str(out), resume=True
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(JOURNAL_DAMAGE))
def test_cli_info_reports_a_corrupt_journal_without_a_traceback(fork_pool, tmp_path, case):
    """``memmap-pool info`` on an output with a corrupt journal says the journal is
    unreadable and exits 0 or 2, without a traceback."""
    out = tmp_path / "result.npy"
    unfinished_output(fork_pool, out)
    damage_journal(out, case)
    done = cli(tmp_path, "info", out)
    assert done.returncode in (0, 2), done
    assert done.tracebacks == 0, done
    assert "journal" in done.stdout + done.stderr, done


# -- failures inside a job ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_kernel_exception_whose_str_raises_still_names_the_chunk(fork_pool):
    """A kernel exception whose __str__ raises still reaches the caller with its chunk
    named, in the message or a note."""
    try:
        fork_pool.map_chunks(
            faults.raise_unprintable, SHAPE, "int64", chunks=CHUNKS, kwargs={"victim": 1}
        )
    except Exception as exc:
        error = exc
    else:
        pytest.fail("map_chunks returned although chunk 1 raised")
    texts = [text_of(error), *map(str, getattr(error, "__notes__", ()))]
    assert any("chunk" in t for t in texts), f"{type(error).__name__}: {texts}"


@pytest.mark.timeout(60)
def test_chunk_result_that_cannot_be_unpickled_raises_serialization_error(fork_pool):
    """A chunk's return value that pickles in the worker but fails to unpickle in the
    parent makes chunk_results() raise SerializationError."""
    job = fork_pool.submit_chunks(
        faults.returns_unloadable, SHAPE, "int64", chunks=CHUNKS, kwargs={"victim": 2}
    )
    with pytest.raises(SerializationError):
        job.chunk_results(timeout=BOUND)


# -- room on disk ------------------------------------------------------------------------------


@pytest.fixture
def tmpfs_8m():
    """An 8 MiB tmpfs, unmounted after the test."""
    where = mount_tmpfs("8m")
    try:
        yield where
    finally:
        unmount(where)


@pytest.mark.timeout(60)
def test_space_check_counts_the_jobs_spec_and_status_files(tmpfs_8m):
    """A 6 MiB output with 3 MiB of args in an 8 MiB temp dir is refused by submit_chunks
    with NotEnoughSpaceError (the spec file holds the args), not failed mid-job as if
    another program had taken the space."""
    blob = bytes(3 * MiB)
    with MemmapPool(2, mp_context="fork", temp_dir=tmpfs_8m) as pool:
        exc = refused_by_submit(
            pool, NotEnoughSpaceError, faults.takes_arg, (768, 1024), "int64", args=(blob,)
        )
    assert "another program" not in str(exc)


# -- what the library and the command print ----------------------------------------------------

RETRY_SCRIPT = """
import json, sys

import faults
from memmap_pool import MemmapPool

if __name__ == "__main__":
    with MemmapPool(2, mp_context="fork") as pool:
        job = pool.submit_chunks(faults.exit_once, (64, 8), "int64", chunks=8,
                                 kwargs={"marker": sys.argv[1]}, retries=2)
        result = job.result(timeout=60)
        report = {"retries": job.stats.retries,
                  "correct": bool((result == faults.expected((64, 8))).all())}
    print("REPORT " + json.dumps(report), flush=True)
"""


@pytest.mark.timeout(90)
def test_retried_worker_death_prints_nothing_when_logging_is_not_configured(tmp_path):
    """A script that never configures logging prints nothing about a worker that died and
    was retried: the library's logger has a handler that drops its records."""
    script = tmp_path / "retry.py"
    script.write_text(textwrap.dedent(RETRY_SCRIPT))
    done = faults.run_python(
        [script, tmp_path / "marker"], env=faults.script_env(temp_dir(tmp_path)), timeout=BOUND
    )
    assert not done.hung, done
    assert done.returncode == 0, done
    assert done.reports() == [{"retries": 1, "correct": True}], done
    for text in ("retrying", "replaced the workers", "worker died"):
        assert text not in done.stderr, done


@pytest.mark.timeout(90)
def test_cli_ctrl_c_does_not_report_the_workers_it_killed_itself(tmp_path, kernels):
    """Ctrl-C during ``memmap-pool run`` exits 130 without logging that a worker died or
    that the workers were replaced: the pool killed them itself."""
    log = tmp_path / "log"
    proc = faults.start_python(
        [
            "-m", "memmap_pool", "run", f"{kernels}:fill", "--shape", "64,8", "--chunks", "4",
            "--workers", "2", "--kwarg", "delay=600", "--kwarg", f"log={log}",
            "--out", tmp_path / "out.npy",
        ],
        env=faults.script_env(temp_dir(tmp_path)),
        cwd=tmp_path,
        # As on a terminal: a shell starts background jobs with SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + BOUND
        while len(log.read_text().split() if log.exists() else []) < 2:
            assert proc.poll() is None, "the command ended before its chunks ran"
            assert time.monotonic() < deadline, "the chunks did not start"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole process group
    finally:
        done = faults.finish_python(proc, BOUND)
    assert not done.hung, done
    assert done.returncode == 130, done
    for text in ("worker died", "replaced the workers"):
        assert text not in done.stderr, done


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mismatch", ["shape", "chunks"])
def test_cli_resume_mismatch_names_the_command_line_remedy(tmp_path, kernels, mismatch):
    """``run --resume`` into an output of another shape, or with other chunks than its
    journal's, exits 2 with a message that names --resume, not the API's resume=False."""
    out = tmp_path / "out.npy"
    first = ["run", f"{kernels}:fill", "--out", out, "--workers", "2", "--shape", "40,6"]
    if mismatch == "shape":
        assert cli(tmp_path, *first).returncode == 0
        again = ["--shape", "50,6"]
    else:
        assert cli(tmp_path, *first, "--chunks", "4", "--kwarg", "fail_at=3").returncode == 1
        assert (tmp_path / "out.npy.journal").exists()
        again = ["--shape", "40,6", "--chunks", "5"]
    done = cli(tmp_path, "run", f"{kernels}:fill", "--out", out, "--workers", "2", *again,
               "--resume")  # fmt: skip
    assert done.returncode == 2, done
    assert "resume=False" not in done.stderr, done
    assert "--resume" in done.stderr, done


@pytest.mark.timeout(90)
def test_cli_resume_of_a_finished_output_does_not_print_zero_throughput(tmp_path, kernels):
    """``run --resume`` of an output that is already complete does not print "0 GB/s"."""
    args = ["run", f"{kernels}:fill", "--out", tmp_path / "out.npy", "--workers", "2",
            "--shape", "40,6"]  # fmt: skip
    assert cli(tmp_path, *args).returncode == 0
    done = cli(tmp_path, *args, "--resume")
    assert done.returncode == 0, done
    assert not re.search(r"(?<![\d.])0 GB/s", done.stdout), done.stdout
