"""``backend="threads"``: the same jobs run by threads of this process give the same results
as worker processes; temporary outputs live in memory; what threads can't do is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from memmap_pool import Halo, MemmapPool, Output
from memmap_pool import _memory as memory

IMG = np.random.default_rng(12).random((150, 90)).astype("float32")


def fill(out, chunk):
    rows = chunk.slices[0]
    out[...] = np.arange(rows.start, rows.stop).reshape((-1,) + (1,) * (out.ndim - 1))


def blur(out, chunk, img):
    out[...] = gaussian_filter(img, 2, mode="reflect")[chunk.interior(0)]


def stats(outs, chunk, img, weights):
    mean, scaled = outs
    mean[...] = img[chunk.interior(0)].mean(axis=1)[:, None] * np.ones(mean.shape[1])
    scaled[...] = img[chunk.interior(0)][..., None] * weights[chunk.interior(1)][..., None]


def laplace_step(out, chunk, u):
    c = chunk.interior(0)
    lap = -4 * u[1:-1, 1:-1] + u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:]
    out[...] = u[c] + 0.2 * lap


def noise(out, chunk):
    out[...] = chunk.random(31).standard_normal()


JOBS = {
    "fill": lambda p, d: p.map_chunks(fill, (300, 40), "int32", chunks=7),
    "halo": lambda p, d: p.map_chunks(
        blur, IMG.shape, IMG.dtype, inputs=[Halo(IMG, 8, "symmetric")], chunks=(40, 50)
    ),
    "npy input": lambda p, d: p.map_chunks(
        blur, IMG.shape, IMG.dtype, inputs=[Halo(str(d / "img.npy"), 8, "symmetric")]
    ),
    "map_blocks": lambda p, d: p.map_blocks(
        lambda b: gaussian_filter(b, 2, mode="reflect"), IMG, depth=8, boundary="symmetric"
    ),
    "several outputs": lambda p, d: p.map_chunks(
        stats,
        IMG.shape,
        outputs=[Output("f8"), Output("f4", shape=(*IMG.shape, 1))],
        inputs=[IMG, np.full(IMG.shape, 2.0)],
        chunks=16,
    ),
    "reduce": lambda p, d: p.reduce_chunks(
        lambda c, x: x.sum(dtype="f8"), [IMG], np.add, chunks=11
    ),
    "iterate": lambda p, d: p.iterate(laplace_step, IMG.astype("f8"), 6, depth=1, boundary="edge"),
    "random": lambda p, d: p.map_chunks(noise, (500, 33), chunks=(64, 16)),
    "npy out": lambda p, d: p.map_chunks(fill, (64, 8), "f8", out=str(d / f"o{os.getpid()}.npy")),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    where = tmp_path_factory.mktemp("threads")
    np.save(where / "img.npy", IMG)
    return where


@pytest.fixture(scope="module")
def both(data):
    """The result of every job on worker processes and on threads."""
    results = {}
    for backend, options in (("processes", {"mp_context": "fork"}), ("threads", {})):
        with MemmapPool(2, backend=backend, **options) as pool:
            results[backend] = {name: _copy(job(pool, data)) for name, job in JOBS.items()}
    return results


def _copy(value):
    if isinstance(value, tuple):
        return tuple(np.array(v) for v in value)
    return np.array(value) if isinstance(value, np.ndarray) else value


@pytest.mark.parametrize("name", list(JOBS))
def test_threads_give_the_results_of_processes(both, name):
    """Every kind of job: the same values, bit for bit."""
    threads, processes = both["threads"][name], both["processes"][name]
    if isinstance(threads, tuple):
        assert all(np.array_equal(a, b) for a, b in zip(threads, processes))
    else:
        assert np.array_equal(threads, processes)


def test_a_temporary_output_is_a_read_only_array_in_memory(tmp_path):
    """No file: an ndarray (not a memmap), read-only, whose memory the job hands over."""
    temp = tmp_path / "pool-temp"
    temp.mkdir()
    with MemmapPool(2, backend="threads", temp_dir=temp) as pool:
        out = pool.map_chunks(fill, (2048, 1024), "float64", chunks=100)
        assert type(out) is np.ndarray
        assert not out.flags.writeable
        assert np.array_equal(out[:, 0], np.arange(2048))
        leftover = [f for _, _, fs in os.walk(temp) for f in fs if f.startswith("out")]
        assert leftover == []
        assert not memory._arrays, "the job's arrays must leave the registry when it ends"


def test_kernels_run_in_threads_of_this_process_and_errors_keep_their_type():
    """Each kernel call runs in one of the pool's threads; an exception is the kernel's."""

    def where(out, chunk):
        out[...] = os.getpid()
        return threading.current_thread().name

    with MemmapPool(2, backend="threads") as pool:
        job = pool.submit_chunks(where, (64,), "int64", chunks=4)
        assert np.all(job.result(timeout=60) == os.getpid())
        assert all(name.startswith("memmap-pool-worker") for name in job.chunk_results())
        with pytest.raises(ZeroDivisionError):
            pool.map_chunks(lambda out, chunk: 1 / 0, (8,))


def test_an_initializer_runs_in_each_worker_thread():
    seen = []
    with MemmapPool(2, backend="threads", initializer=seen.append, initargs=("hello",)) as pool:
        pool.map_chunks(fill, (64, 4), "int32", chunks=1)
    assert 1 <= len(seen) <= 2
    assert set(seen) == {"hello"}


def test_worker_threads_cap_the_blas_pools_while_the_pool_lives():
    """With threadpoolctl, worker_threads limits this process's BLAS while the pool is open,
    and the limits come back when it closes."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = {i["prefix"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}
    if not before:
        pytest.skip("no BLAS or OpenMP library is loaded in this process")
    with MemmapPool(2, backend="threads", worker_threads=1):
        during = {i["prefix"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}
        assert all(n == 1 for n in during.values()), during
    after = {i["prefix"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}
    assert after == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timeout": 5}, "a thread can't be killed"),
        ({"mp_context": "fork"}, "mp_context shapes worker processes"),
        ({"max_tasks_per_child": 3}, "max_tasks_per_child shapes worker processes"),
        ({"executor": object()}, "can't take executor="),
        ({"backend": "gpu"}, "backend must be 'processes' or 'threads'"),
    ],
)
def test_what_threads_cant_do_is_refused_with_the_reason(kwargs, match):
    options = {"backend": "threads", **kwargs}
    with pytest.raises(ValueError, match=match):
        MemmapPool(2, **options)


def test_a_job_timeout_is_refused_on_threads():
    with MemmapPool(1, backend="threads") as pool, pytest.raises(ValueError, match="killed"):
        pool.map_chunks(fill, (4, 4), timeout=1.0)


@pytest.mark.timeout(60)
def test_the_command_line_runs_on_threads(tmp_path):
    """memmap-pool run --backend threads writes the same .npy."""
    kernels = tmp_path / "k.py"
    kernels.write_text(
        "import numpy as np\n"
        "def fill(out, chunk):\n"
        "    out[...] = np.arange(chunk.slices[0].start, chunk.slices[0].stop)[:, None]\n"
    )
    out = tmp_path / "o.npy"
    env = dict(os.environ, MEMMAP_POOL_TEMP_DIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "memmap_pool", "run", f"{kernels}:fill", "--shape", "100,3",
         "--out", str(out), "--backend", "threads", "--chunks", "9"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(out), np.arange(100)[:, None] * np.ones(3))
