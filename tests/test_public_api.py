"""The public surface: exported names, the exception hierarchy, and MemmapPool behaving as a
concurrent.futures executor."""

from __future__ import annotations

import concurrent.futures
import errno
import operator
import pickle
from concurrent.futures.process import BrokenProcessPool

import pytest

import memmap_pool
from memmap_pool import errors

EXPECTED_ALL = {
    "Chunk",
    "ChunkTimeoutError",
    "Halo",
    "Job",
    "JobStats",
    "JournalMismatchError",
    "Kernel",
    "KernelError",
    "MemmapPool",
    "MemmapPoolError",
    "NotEnoughSpaceError",
    "Output",
    "OutputBusyError",
    "PrivateDirError",
    "Progress",
    "SerializationError",
    "SharedDirError",
    "WorkerCrashedError",
    "WorkerStartupError",
    "__version__",
    "errors",
    "kernel",
}

ERROR_BUILTINS = {
    "WorkerCrashedError": BrokenProcessPool,
    "WorkerStartupError": BrokenProcessPool,
    "ChunkTimeoutError": TimeoutError,
    "NotEnoughSpaceError": OSError,
    "OutputBusyError": BlockingIOError,
    "PrivateDirError": PermissionError,
    "JournalMismatchError": ValueError,
    "SerializationError": pickle.PicklingError,
    "SharedDirError": OSError,
    "KernelError": RuntimeError,
}


def test_all_lists_exactly_the_public_names_and_each_is_importable():
    """memmap_pool.__all__ is the agreed surface, and every name in it exists."""
    assert set(memmap_pool.__all__) == EXPECTED_ALL
    assert len(memmap_pool.__all__) == len(EXPECTED_ALL)
    for name in memmap_pool.__all__:
        assert getattr(memmap_pool, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from memmap_pool import *", namespace)
    assert EXPECTED_ALL - {"__version__"} <= set(namespace)


def test_version_is_a_dotted_string():
    """__version__ is a release string such as 0.1.0."""
    parts = memmap_pool.__version__.split(".")
    assert len(parts) >= 2
    assert all(p.isdigit() for p in parts[:2])


def test_errors_module_exports_every_error():
    """memmap_pool.errors.__all__ names the root and every subclass, the same objects as the
    package exports."""
    assert set(errors.__all__) == set(ERROR_BUILTINS) | {"MemmapPoolError"}
    for name in errors.__all__:
        assert getattr(errors, name) is getattr(memmap_pool, name)


@pytest.mark.parametrize(("name", "builtin"), sorted(ERROR_BUILTINS.items()))
def test_each_error_subclasses_the_root_and_its_builtin(name, builtin):
    """Every error is a MemmapPoolError and also the builtin it really is, and documented."""
    cls = getattr(errors, name)
    assert issubclass(cls, errors.MemmapPoolError)
    assert issubclass(cls, builtin)
    assert cls.__doc__
    assert len(cls.__doc__.strip()) > 40


def test_specific_builtin_relationships():
    """The relationships callers rely on in except clauses."""
    assert issubclass(errors.WorkerCrashedError, concurrent.futures.process.BrokenProcessPool)
    assert issubclass(errors.ChunkTimeoutError, TimeoutError)
    assert issubclass(errors.NotEnoughSpaceError, OSError)
    assert issubclass(errors.JournalMismatchError, ValueError)
    assert issubclass(errors.MemmapPoolError, Exception)
    assert not issubclass(errors.MemmapPoolError, (OSError, ValueError, TimeoutError))


ERROR_SAMPLES = [
    pytest.param(
        errors.WorkerCrashedError("chunk 3 died", (3, 4), (-9,)),
        {"chunks": (3, 4), "exitcodes": (-9,)},
        id="WorkerCrashedError",
    ),
    pytest.param(
        errors.ChunkTimeoutError("chunk 5 too slow", 5, 2.5),
        {"chunk": 5, "timeout": 2.5},
        id="ChunkTimeoutError",
    ),
    pytest.param(
        errors.NotEnoughSpaceError("no room in /dev/shm", "/dev/shm"),
        {"path": "/dev/shm", "errno": errno.ENOSPC},
        id="NotEnoughSpaceError",
    ),
    pytest.param(errors.JournalMismatchError("other plan"), {}, id="JournalMismatchError"),
    pytest.param(errors.SerializationError("cannot pickle"), {}, id="SerializationError"),
    pytest.param(errors.SharedDirError("worker w1 cannot write /shared"), {}, id="SharedDirError"),
    pytest.param(errors.KernelError("the kernel raised X"), {}, id="KernelError"),
    pytest.param(errors.MemmapPoolError("root"), {}, id="MemmapPoolError"),
]


@pytest.mark.parametrize(("error", "attributes"), ERROR_SAMPLES)
def test_errors_survive_a_pickle_round_trip(error, attributes):
    """Errors cross process boundaries intact: type, message and attributes."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    for name, value in attributes.items():
        assert getattr(copy, name) == value


def test_not_enough_space_error_reads_as_its_message():
    """str() of NotEnoughSpaceError is the message, without the errno prefix of OSError."""
    err = errors.NotEnoughSpaceError("not enough space in /x for a 8.0 MiB output", "/x")
    assert str(err) == "not enough space in /x for a 8.0 MiB output"
    assert err.errno == errno.ENOSPC


def test_pool_and_job_are_concurrent_futures_types():
    """MemmapPool is an Executor and Job a Future, so the standard tools accept them."""
    assert issubclass(memmap_pool.MemmapPool, concurrent.futures.Executor)
    assert issubclass(memmap_pool.Job, concurrent.futures.Future)


def test_pool_submit_map_and_shutdown_behave_like_process_pool_executor(fork_pool):
    """submit and map run plain functions in the workers; after shutdown, submit refuses."""
    assert fork_pool.submit(operator.pow, 2, 10).result(timeout=60) == 1024
    assert list(fork_pool.map(operator.mul, range(5), range(5), timeout=60)) == [0, 1, 4, 9, 16]
    assert list(fork_pool.map(abs, [-3, -2, -1], chunksize=2)) == [3, 2, 1]
    future = fork_pool.submit(operator.truediv, 1, 0)
    with pytest.raises(ZeroDivisionError):
        future.result(timeout=60)
    fork_pool.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        fork_pool.submit(abs, -1)
    with pytest.raises(RuntimeError, match="shutdown"):
        fork_pool.map_chunks(lambda out, chunk: None, (4,))


def test_jobs_work_with_concurrent_futures_wait(fork_pool):
    """Jobs from submit_chunks can be waited on with concurrent.futures.wait."""
    jobs = [
        fork_pool.submit_chunks(lambda out, chunk, k=k: out.fill(k), (20,), chunks=5)
        for k in range(3)
    ]
    done, not_done = concurrent.futures.wait(jobs, timeout=60)
    assert not not_done
    assert [float(job.result()[0]) for job in jobs] == [0.0, 1.0, 2.0]
    assert len(done) == 3
