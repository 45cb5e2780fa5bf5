"""MemmapPool on a Dask distributed cluster: a real LocalCluster of two worker processes (one
thread each), files in a shared directory.

The cluster is started once for the module (it is the slow part). Being module-scoped, it
is set up before each test's leftover guard takes its snapshot, so its two worker processes
are not counted as leaks; it checks itself that they are gone when it closes. Tests that
kill workers get a cluster of their own, closed before the guard looks, because Dask's
nanny replaces a killed worker with a new process.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import pytest

from memmap_pool import MemmapPool, SharedDirError, WorkerCrashedError

CLOSE_WAIT = 30.0
"""Seconds a closed cluster's worker processes get to exit; only a leak takes longer."""

JOB_WAIT = 60.0
"""Bound on waiting for a job's result; only a hang reaches it."""


@dataclass
class Cluster:
    """A running LocalCluster and a client connected to it."""

    cluster: Any
    client: Any

    @property
    def address(self) -> str:
        return str(self.cluster.scheduler_address)

    def worker_pids(self) -> set[int]:
        return {int(n.pid) for n in self.cluster.workers.values() if n.pid}


@contextlib.contextmanager
def _local_cluster(n_workers: int = 2, threads: int = 1, **config: Any) -> Iterator[Cluster]:
    distributed = pytest.importorskip(
        "distributed", reason='the Dask tests need distributed: pip install "memmap-pool[dask]"'
    )
    import dask

    with dask.config.set(config):
        cluster = distributed.LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=None,
            # Even without a dashboard the scheduler serves HTTP, on port 8787 by default: a
            # second cluster (or anyone's on this machine) would find it taken, and Dask leaks
            # the socket of the failed attempt. Any free port will do.
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        )
    client = distributed.Client(cluster, set_as_default=False)
    handle = Cluster(cluster, client)
    try:
        client.wait_for_workers(n_workers, timeout=JOB_WAIT)
        yield handle
    finally:
        pids = handle.worker_pids()
        client.close()
        cluster.close()
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
        _, alive = psutil.wait_procs(procs, timeout=CLOSE_WAIT)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        assert not alive, f"Dask worker processes outlived their cluster: {alive}"


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Cluster]:
    """One two-worker LocalCluster for the module."""
    with _local_cluster() as c:
        yield c


@pytest.fixture
def shared(tmp_path: Any) -> Iterator[str]:
    """The shared directory; checked empty of the pool's private dirs after the test."""
    path = tmp_path / "shared"
    path.mkdir()
    yield str(path)
    left = glob.glob(os.path.join(path, "memmap-pool-*")) + glob.glob(
        os.path.join(path, ".memmap-pool-probe-*")
    )
    assert not left, f"files left in shared_dir: {left}"


@pytest.fixture
def dask_pool(dask_cluster: Cluster, shared: str) -> Iterator[MemmapPool]:
    """A pool on the module's cluster, through the test's Client."""
    with MemmapPool.from_dask(dask_cluster.client, shared_dir=shared) as pool:
        yield pool


# -- kernels (module level: the workers import this module to unpickle them) -------------------


def global_index(out: np.ndarray, chunk: Any) -> None:
    """Each element gets its flat C-order index in the whole array."""
    grids = np.indices(out.shape)
    coords = tuple(g + s.start for g, s in zip(grids, chunk.slices))
    idx = np.ravel_multi_index(coords, chunk.shape) if chunk.shape else 0
    if out.dtype.names:
        out["a"] = idx
        out["b"] = idx * 0.5
    else:
        out[...] = idx


def reference(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    dtype = np.dtype(dtype)
    if dtype.names:
        ref = np.empty(shape, dtype)
        ref["a"] = idx
        ref["b"] = idx * 0.5
        return ref
    return idx.astype(dtype)


def add_inputs_and_list_files(out, chunk, a, b, c, *, shared_dir):
    """Sum three inputs and report which files the pool has in shared_dir right now."""
    out[...] = a + b + c
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(shared_dir, "*", "*")))


def kill_worker_once(out, chunk, marker, victim):
    """Chunk ``victim`` SIGKILLs its worker process the first time it runs."""
    if chunk.index == victim:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    out[...] = chunk.index


def always_kill_worker(out, chunk, attempts, victim):
    """Chunk ``victim`` records the attempt and SIGKILLs its worker, every time."""
    if chunk.index == victim:
        with open(attempts, "a") as f:
            f.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)
    out[...] = chunk.index


def fail_on_chunk(out, chunk, bad):
    if chunk.index == bad:
        raise ValueError(f"bad value in chunk {chunk.index}")
    out[...] = 1


# -- results -----------------------------------------------------------------------------------

CASES = [
    pytest.param((1000,), "uint8", "C", "auto", id="1d-uint8-auto"),
    pytest.param((257, 33), "int64", "F", 10, id="2d-int64-F-ragged"),
    pytest.param((12, 7, 5), "float32", "C", (5, 3, None), id="3d-float32-C-blocks"),
    pytest.param((9, 8, 7), "complex128", "F", (4, None, 3), id="3d-complex128-F-blocks"),
    pytest.param((50, 3), [("a", "i4"), ("b", "f8")], "C", 7, id="2d-structured"),
    pytest.param((3, 40), "float64", "C", (1, 8), id="more-chunks-than-rows"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("shape", "dtype", "order", "chunks"), CASES)
def test_results_on_dask_equal_serial_reference(dask_pool, shape, dtype, order, chunks):
    """Shapes, orders, dtypes and chunkings give the serial reference on a Dask cluster."""
    result = dask_pool.map_chunks(global_index, shape, dtype, chunks=chunks, order=order)
    assert result.shape == shape
    assert result.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(result, reference(shape, dtype))
    expected_flag = "F_CONTIGUOUS" if order == "F" and len(shape) > 1 else "C_CONTIGUOUS"
    assert result.flags[expected_flag]


@pytest.mark.timeout(60)
def test_lambda_and_closure_kernels_with_args_and_kwargs_run_on_dask(dask_pool):
    """A lambda and a closure, with args and kwargs, reach the Dask workers and run."""
    offset = 1000

    def closure(out, chunk, scale, *, shift):
        rows = np.arange(chunk.slices[0].start, chunk.slices[0].stop)
        out[...] = (rows * scale + shift + offset)[:, None]

    got = dask_pool.map_chunks(closure, (100, 4), "int64", chunks=9, args=(3,), kwargs={"shift": 5})
    np.testing.assert_array_equal(got, np.repeat((np.arange(100) * 3 + 1005)[:, None], 4, 1))

    got = dask_pool.map_chunks(
        lambda out, chunk, k: out.fill(k * chunk.index), (40,), "int32", chunks=6, args=(2,)
    )
    np.testing.assert_array_equal(got, 2 * (np.arange(40) // 6))


@pytest.mark.timeout(60)
def test_kernel_exception_on_dask_keeps_its_type_and_names_the_chunk(dask_pool):
    """A kernel's exception on a Dask worker is re-raised as is, naming the chunk."""
    with pytest.raises(ValueError, match="bad value in chunk 3") as info:
        dask_pool.map_chunks(fail_on_chunk, (60,), "int8", chunks=10, args=(3,))
    assert any("chunk 3" in note for note in getattr(info.value, "__notes__", []))
    # The pool is still usable.
    assert dask_pool.map_chunks(fail_on_chunk, (20,), "int8", chunks=5, args=(-1,)).sum() == 20


# -- files -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_file_inputs_are_passed_by_reference_and_arrays_dumped_once(dask_pool, shared, tmp_path):
    """A .npy and a memmap input are not copied; an in-memory input is dumped once."""
    data = tmp_path / "data"
    data.mkdir()
    shape = (300, 20)
    a = np.arange(6000, dtype="float64").reshape(shape)
    np.save(data / "a.npy", a)
    b = np.memmap(data / "b.bin", dtype="float64", mode="w+", shape=shape)
    b[...] = 2.0
    b.flush()
    c = np.full(shape, 0.25)

    job = dask_pool.submit_chunks(
        add_inputs_and_list_files,
        shape,
        "float64",
        chunks=30,
        inputs=(str(data / "a.npy"), b, c),
        kwargs={"shared_dir": shared},
    )
    result = job.result(timeout=JOB_WAIT)
    np.testing.assert_array_equal(result, a + 2.0 + 0.25)

    seen = {name for names in job.chunk_results() for name in names}
    assert job.progress.done == 10
    dumped = {n for n in seen if re.fullmatch(r"in\d+-[0-9a-f]+\.bin", n)}
    assert len(dumped) == 1, seen
    assert dumped.pop().startswith("in2-"), seen  # the in-memory array, inputs[2]
    assert sorted(os.listdir(data)) == ["a.npy", "b.bin"]


@pytest.mark.timeout(60)
def test_npy_output_and_in_place_update_of_a_memmap_on_the_shared_dir(dask_pool, shared):
    """out=.npy is written on the shared dir; an existing memmap there is updated in place."""
    path = os.path.join(shared, "result.npy")
    result = dask_pool.map_chunks(global_index, (64, 100), "int32", chunks=8, out=path)
    np.testing.assert_array_equal(np.load(path), reference((64, 100), "int32"))
    assert not glob.glob(path + ".*"), "the journal of a finished job must be removed"
    del result

    mm = np.load(path, mmap_mode="r+")
    got = dask_pool.map_chunks(
        lambda out, chunk: out.__imul__(-2), mm.shape, mm.dtype, chunks=16, out=mm
    )
    assert got is mm
    np.testing.assert_array_equal(mm, -2 * reference((64, 100), "int32"))
    del mm, got
    np.testing.assert_array_equal(np.load(path), -2 * reference((64, 100), "int32"))


def halo_kernel(outs: Any, chunk: Any, img: np.ndarray) -> bool:
    """A 5x5 correlation of a halo input into one output, its square into another; returns
    whether the view of an interior chunk is the worker's mapping of the shared file."""
    from scipy.ndimage import correlate

    smooth, square = outs
    weights = np.arange(25, dtype="float64").reshape(5, 5)
    smooth[...] = correlate(img, weights, mode="mirror")[chunk.interior(0)]
    square[...] = img[chunk.interior(0)] ** 2
    base = img
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return not isinstance(base, np.ndarray)  # a mapping, not a padded copy


@pytest.mark.timeout(90)
def test_halo_inputs_several_outputs_and_map_blocks_on_dask(dask_pool, shared, tmp_path):
    """Halo views are read from the shared file on the cluster's workers too; a kernel with
    two outputs and a block function give the same results as on the whole array."""
    from scipy.ndimage import correlate, gaussian_filter

    from memmap_pool import Halo, Output

    img = np.random.default_rng(5).random((90, 64))
    path = tmp_path / "img.npy"
    np.save(path, img)
    job = dask_pool.submit_chunks(
        halo_kernel,
        img.shape,
        outputs=[Output("float64"), Output("float64", out=os.path.join(shared, "sq.npy"))],
        inputs=[Halo(str(path), 2, "reflect")],
        chunks=(30, 16),
    )
    smooth, square = job.result(timeout=JOB_WAIT)
    weights = np.arange(25, dtype="float64").reshape(5, 5)
    assert np.array_equal(smooth, correlate(img, weights, mode="mirror"))
    assert np.array_equal(square, img**2)
    # A 3x4 grid: only chunks 5 and 6 have windows inside the array, read in place; the
    # others are padded at an edge.
    assert job.chunk_results() == [k in (5, 6) for k in range(12)]

    clipped = dask_pool.submit_chunks(
        halo_kernel,
        img.shape,
        outputs=[Output("float64"), Output("float64")],
        inputs=[Halo(str(path), 2, "none")],
        chunks=(30, 16),
    )
    clipped.result(timeout=JOB_WAIT)
    assert clipped.chunk_results() == [True] * 12  # "none": nothing is ever copied

    blurred = dask_pool.map_blocks(
        lambda b: gaussian_filter(b, 1.5, mode="reflect"),
        str(path),
        depth=6,
        boundary="symmetric",
        chunks=(20, 64),
    )
    assert np.array_equal(blurred, gaussian_filter(img, 1.5, mode="reflect"))


def _heat_step(out: np.ndarray, chunk: Any, u: np.ndarray) -> None:
    lap = -4 * u[1:-1, 1:-1] + u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:]
    out[:] = u[chunk.interior(0)] + 0.1 * lap


@pytest.mark.timeout(90)
def test_reductions_and_time_stepping_on_dask(dask_pool, shared, tmp_path):
    """reduce_chunks folds the cluster's partials in chunk order (the same bits as a local
    pool); iterate steps a state on the shared dir, each step read by other workers."""
    x = np.random.default_rng(8).standard_normal(400_000)
    path = os.path.join(shared, "x.npy")
    np.save(path, x)
    total = dask_pool.reduce_chunks(lambda c, v: v.sum(), [path], np.add, chunks=30_000)
    with MemmapPool(2, mp_context="fork") as local:
        expected = local.reduce_chunks(lambda c, v: v.sum(), [path], np.add, chunks=30_000)
    assert np.float64(total).tobytes() == np.float64(expected).tobytes()

    def noise(out: np.ndarray, chunk: Any) -> None:
        out[...] = chunk.random(3).standard_normal()

    remote = dask_pool.map_chunks(noise, (50, 300), chunks=(7, 300))
    with MemmapPool(1, mp_context="fork") as local:
        here = local.map_chunks(noise, (50, 300), chunks=(50, 64))
    assert np.array_equal(remote, here)  # chunk.random: the same on the cluster

    u0 = np.random.default_rng(9).random((60, 40))
    final = dask_pool.iterate(
        _heat_step, u0, 7, depth=1, boundary="edge", out=os.path.join(shared, "u.npy"),
        chunks=(15, 40),
    )  # fmt: skip
    u = u0.copy()
    for _ in range(7):
        p = np.pad(u, 1, mode="edge")
        u = p[1:-1, 1:-1] + 0.1 * (
            -4 * p[1:-1, 1:-1] + p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
        )
    assert np.array_equal(final, u)


# -- the shared directory ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_shared_dir_missing_on_the_workers_is_refused_naming_worker_and_path(
    dask_cluster, tmp_path, monkeypatch
):
    """A shared_dir that the workers don't have is refused, naming each worker and the path.

    ``/proc/self/cwd`` is the current directory of whichever process opens it: with the
    parent and the workers in different directories, the same path names a directory that
    exists for the parent only, as a directory local to the parent's node would.
    """
    parent_dir, worker_dir = tmp_path / "parent", tmp_path / "workers"
    (parent_dir / "shared").mkdir(parents=True)
    worker_dir.mkdir()
    client = dask_cluster.client
    before = client.run(os.getcwd)
    monkeypatch.chdir(parent_dir)
    client.run(os.chdir, str(worker_dir))
    try:
        with pytest.raises(SharedDirError) as info:
            MemmapPool.from_dask(client, shared_dir="/proc/self/cwd/shared")
        message = str(info.value)
        assert "/proc/self/cwd/shared" in message
        for address in client.nthreads():
            assert address in message
        assert "FileNotFoundError" in message

        # Same path on every node but not one shared directory: also refused.
        (worker_dir / "shared").mkdir()
        with pytest.raises(SharedDirError, match="not on a shared filesystem"):
            MemmapPool.from_dask(client, shared_dir="/proc/self/cwd/shared")
        assert os.listdir(parent_dir / "shared") == []
        assert os.listdir(worker_dir / "shared") == []
    finally:
        for address, cwd in before.items():
            client.run(os.chdir, cwd, workers=[address])
    assert client.status == "running", "a Client passed in must not be closed by a refusal"


@pytest.mark.timeout(60)
def test_shared_dir_the_parent_cannot_write_is_refused(dask_cluster, tmp_path):
    """A shared_dir that is a file is refused with a SharedDirError naming the path."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(SharedDirError, match=re.escape(str(not_a_dir))):
        MemmapPool.from_dask(dask_cluster.client, shared_dir=not_a_dir)


# -- options, addresses, imports ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_timeouts_are_refused_on_dask_with_the_reason(dask_cluster, shared):
    """timeout= can't be enforced on remote workers: refused, not silently ignored."""
    with pytest.raises(ValueError, match="can't be enforced"):
        MemmapPool.from_dask(dask_cluster.client, shared_dir=shared, timeout=5)
    with (
        MemmapPool.from_dask(dask_cluster.client, shared_dir=shared) as pool,
        pytest.raises(ValueError, match="timeout=1 can't be enforced"),
    ):
        pool.map_chunks(global_index, (10,), timeout=1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("given", ["address", "cluster object"])
def test_scheduler_address_gets_a_client_of_its_own_closed_with_the_pool(
    dask_cluster, shared, given
):
    """From an address or a cluster the pool makes its own client, closes it, and leaves the
    user's client open."""
    target = dask_cluster.address if given == "address" else dask_cluster.cluster
    with MemmapPool.from_dask(target, shared_dir=shared) as pool:
        assert pool.max_workers == 2
        own = pool._backend.client
        assert own is not dask_cluster.client
        got = pool.map_chunks(global_index, (99, 3), "int16", chunks=11)
        np.testing.assert_array_equal(got, reference((99, 3), "int16"))
        del got
    assert own.status == "closed"
    assert dask_cluster.client.status == "running"


@pytest.mark.timeout(60)
def test_from_dask_refuses_what_is_not_a_client_cluster_or_address(dask_cluster, shared):
    """A wrong type, a closed client or an address where no scheduler listens is refused with
    a message saying what is expected."""
    import dask
    import distributed

    with pytest.raises(TypeError, match=r"distributed\.Client, a Dask cluster object"):
        MemmapPool.from_dask(8786, shared_dir=shared)
    closed = distributed.Client(dask_cluster.cluster, set_as_default=False)
    closed.close()
    with pytest.raises(ValueError, match=r"client passed to MemmapPool\.from_dask is closed"):
        MemmapPool.from_dask(closed, shared_dir=shared)
    with socket.socket() as s:  # a port nothing listens on once it is closed
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(
            ConnectionError, match=f"cannot connect to the Dask scheduler at '{address}'"
        ),
    ):
        MemmapPool.from_dask(address, shared_dir=shared)


@pytest.mark.timeout(60)
def test_executor_api_runs_plain_calls_on_the_cluster(dask_pool, dask_cluster):
    """pool.submit and pool.map run ordinary functions on the Dask workers, each call once."""
    assert dask_pool.submit(pow, 3, 4).result(timeout=JOB_WAIT) == 81
    assert list(dask_pool.map(abs, [-1, -2, 3], timeout=JOB_WAIT)) == [1, 2, 3]
    # Identical calls are separate tasks (pure=False): both run, on the cluster's workers.
    pids = {dask_pool.submit(os.getpid).result(timeout=JOB_WAIT) for _ in range(4)}
    assert pids <= dask_cluster.worker_pids()


def test_from_dask_without_distributed_says_how_to_install_it(monkeypatch, tmp_path):
    """Without distributed, from_dask raises ImportError naming the extra to install."""
    monkeypatch.setitem(sys.modules, "distributed", None)
    monkeypatch.delitem(sys.modules, "memmap_pool.backends.dask", raising=False)
    with pytest.raises(ImportError, match=re.escape('pip install "memmap-pool[dask]"')):
        MemmapPool.from_dask("tcp://127.0.0.1:1", shared_dir=tmp_path)


# -- worker loss -------------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "allowed_failures",
    [
        pytest.param(0, id="pool-retries"),  # Dask reports the loss at once: the pool retries
        pytest.param(3, id="dask-reschedules"),  # Dask's default: it re-runs the task itself
    ],
)
def test_worker_killed_mid_job_is_survived_with_a_correct_result(
    allowed_failures, shared, tmp_path
):
    """A worker SIGKILLed in the middle of a job: the job completes, and its values are right."""
    marker = str(tmp_path / "killed")
    with _local_cluster(**{"distributed.scheduler.allowed-failures": allowed_failures}) as c:
        pids_before = c.worker_pids()
        with MemmapPool.from_dask(c.client, shared_dir=shared) as pool:
            job = pool.submit_chunks(
                kill_worker_once, (400, 64), "int32", chunks=10, args=(marker, 17)
            )
            result = job.result(timeout=JOB_WAIT)
            np.testing.assert_array_equal(result[:, 0], np.arange(400) // 10)
            assert os.path.exists(marker), "the victim chunk never ran"
            if allowed_failures == 0:
                assert job.stats.retries >= 1  # the killed batch was sent again by the pool
            else:
                assert job.stats.retries == 0  # Dask re-ran it without reporting a failure
            del result
        c.client.wait_for_workers(2, timeout=JOB_WAIT)
        assert c.worker_pids() != pids_before, "the nanny should have replaced the killed worker"


@pytest.mark.timeout(90)
def test_worker_always_killed_raises_worker_crashed_error_after_the_retries(shared, tmp_path):
    """A chunk that kills every worker running it fails the job after exactly retries + 1 tries.

    The error is the library's WorkerCrashedError, caused by Dask's KilledWorker, and the pool
    remains usable. (The job has that one chunk: a chunk queued behind it on the same worker
    would be charged for the loss too, as the pool can't tell which task was running.)
    """
    attempts = tmp_path / "attempts"
    with (
        _local_cluster(**{"distributed.scheduler.allowed-failures": 0}) as c,
        MemmapPool.from_dask(c.client, shared_dir=shared, retries=1) as pool,
    ):
        with pytest.raises(WorkerCrashedError) as info:
            pool.map_chunks(always_kill_worker, (10,), "int64", chunks=10, args=(str(attempts), 0))
        err = info.value
        from distributed import KilledWorker

        assert err.chunks == (0,)
        assert "chunk 0 (region [0:10]) of 1, 2 times (retries=1)" in str(err)
        assert "KilledWorker" in str(err)
        assert isinstance(err.__cause__, KilledWorker)
        assert len(attempts.read_text().split()) == 2
        # Dask restarted the workers; the pool goes on.
        c.client.wait_for_workers(1, timeout=JOB_WAIT)
        got = pool.map_chunks(global_index, (50,), "int64", chunks=10)
        np.testing.assert_array_equal(got, np.arange(50))
        del got


@pytest.mark.timeout(90)
def test_only_the_chunk_that_kills_its_worker_is_named_when_batched_with_others(shared, tmp_path):
    """A deadly chunk inside a batch of many: the batch's chunks are retried one by one, so the
    error names that chunk alone and the others are not charged twice."""
    attempts = tmp_path / "attempts"
    victim = 40  # late enough to fall in a batch of several chunks (batches grow after 4)
    with (
        _local_cluster(**{"distributed.scheduler.allowed-failures": 0}) as c,
        MemmapPool.from_dask(c.client, shared_dir=shared, retries=1) as pool,
    ):
        with pytest.raises(WorkerCrashedError) as info:
            pool.map_chunks(
                always_kill_worker, (600,), "int64", chunks=10, args=(str(attempts), victim)
            )
        assert info.value.chunks == (victim,)
        assert f"chunk {victim} (region [400:410])" in str(info.value)
        assert len(attempts.read_text().split()) == 2  # the first run and one retry


@pytest.mark.timeout(90)
def test_workers_with_several_threads_run_concurrent_jobs_correctly(shared):
    """One Dask worker with three threads runs batches of three jobs at once, all correct."""
    with (
        _local_cluster(n_workers=1, threads=3) as c,
        MemmapPool.from_dask(c.client, shared_dir=shared) as pool,
    ):
        assert pool.max_workers == 3
        shapes = [(301, 17), (64, 9, 5), (1000,)]
        jobs = [
            pool.submit_chunks(global_index, shape, "int64", chunks=(4, *shape[1:]))
            for shape in shapes
        ]
        for job, shape in zip(jobs, shapes):
            np.testing.assert_array_equal(job.result(timeout=JOB_WAIT), reference(shape, "int64"))
        del jobs


@pytest.mark.timeout(60)
def test_chunks_sharing_memory_pages_are_reported_on_a_cluster(dask_pool, caplog):
    """Chunks that share a page are fine on one host but not across hosts: a warning says so."""
    with caplog.at_level("WARNING", logger="memmap_pool"):
        dask_pool.map_chunks(global_index, (64, 100), "int32", chunks=8)  # 3200-byte chunks
    assert any("share memory pages" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="memmap_pool"):
        dask_pool.map_chunks(global_index, (64, 1024), "int32", chunks=8)  # 32 KiB chunks
        dask_pool.map_chunks(global_index, (1 << 20,), "uint8")  # "auto": page-aligned
    assert not [r.getMessage() for r in caplog.records]


INTERRUPTED_JOB = """
import os
import sys
import time

from memmap_pool import MemmapPool


def slow(out, chunk, marker):
    if chunk.index == 4:
        open(marker, "w").close()
    time.sleep(0.05)
    out[...] = 1


if __name__ == "__main__":
    with MemmapPool.from_dask(sys.argv[1], shared_dir=sys.argv[2]) as pool:
        pool.map_chunks(slow, (2000,), "int8", chunks=1, args=(sys.argv[3],))
"""


@pytest.mark.timeout(90)
def test_ctrl_c_stops_a_dask_job_and_removes_its_files(dask_cluster, shared, tmp_path):
    """SIGINT to a parent running a job on Dask: it stops early and leaves no files."""
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent(INTERRUPTED_JOB))
    marker = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, str(script), dask_cluster.address, shared, str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + JOB_WAIT
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "the job never started"
        proc.send_signal(signal.SIGINT)
        # The whole job takes ~50 s of kernel time; stopping takes a few seconds.
        _, stderr = proc.communicate(timeout=JOB_WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in stderr, stderr
    assert os.listdir(shared) == []


# -- command line ------------------------------------------------------------------------------

CLI_KERNEL = """
import os

import numpy as np


def rows_and_pids(out, chunk):
    rows = np.arange(chunk.slices[0].start, chunk.slices[0].stop)
    out[:, 0] = rows
    out[:, 1] = os.getpid()
"""


@pytest.mark.skipif(
    importlib.util.find_spec("memmap_pool.cli") is None,
    reason="the memmap-pool command (src/memmap_pool/cli.py) is missing",
)
@pytest.mark.timeout(90)
def test_command_line_with_scheduler_runs_the_job_on_the_cluster(dask_cluster, shared, tmp_path):
    """`memmap-pool run ... --scheduler ADDR --shared-dir DIR` computes the .npy on the workers."""
    module = tmp_path / "cli_kernel.py"
    module.write_text(textwrap.dedent(CLI_KERNEL))
    out = os.path.join(shared, "cli.npy")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memmap_pool",
            "run",
            f"{module}:rows_and_pids",
            "--shape",
            "96,2",
            "--dtype",
            "int64",
            "--chunks",
            "8",
            "--out",
            out,
            "--scheduler",
            dask_cluster.address,
            "--shared-dir",
            shared,
        ],
        capture_output=True,
        text=True,
        timeout=JOB_WAIT,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "the command prints a one-line summary"
    result = np.load(out)
    np.testing.assert_array_equal(result[:, 0], np.arange(96))
    assert set(result[:, 1].tolist()) <= dask_cluster.worker_pids()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("option", ["max_workers", "mp_context", "worker_threads"])
def test_from_dask_refuses_options_of_local_worker_processes(dask_cluster, shared, option):
    """from_dask refuses, with a ValueError naming it, an option that only shapes the pool's
    own worker processes, rather than ignoring it."""
    value = {"max_workers": 2, "mp_context": "spawn", "worker_threads": 1}[option]
    with pytest.raises(ValueError, match=option):
        MemmapPool.from_dask(dask_cluster.client, shared_dir=shared, **{option: value})
    assert dask_cluster.client.status == "running"  # the caller's client is left open
