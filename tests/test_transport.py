"""What crosses the process boundary: counted for real on an executor that measures every
call it sends and every result it gets back. No array data travels, and the kernel is
pickled once per job, not once per chunk."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.reduction import ForkingPickler

import cloudpickle
import numpy as np
import pytest

from memmap_pool import MemmapPool

CHUNKS = 16


class MeasuringExecutor(ProcessPoolExecutor):
    """A ProcessPoolExecutor that records the pickled size of each call and of each result,
    pickled the way ProcessPoolExecutor pickles them to send them through its pipes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.sent: list[tuple[str, int]] = []
        self.received: list[int] = []

    def submit(self, fn, /, *args, **kwargs):
        size = len(ForkingPickler.dumps((fn, args, kwargs)))
        with self.lock:
            self.sent.append((getattr(fn, "__name__", repr(fn)), size))
        future = super().submit(fn, *args, **kwargs)
        future.add_done_callback(self._measure_result)
        return future

    def _measure_result(self, future):
        if future.cancelled() or future.exception() is not None:
            return
        size = len(ForkingPickler.dumps(future.result()))
        with self.lock:
            self.received.append(size)

    def reset(self):
        with self.lock:
            self.sent.clear()
            self.received.clear()


def fill_with_index(out, chunk):
    out[...] = chunk.index


@pytest.fixture
def measuring_pool():
    executor = MeasuringExecutor(
        max_workers=2, mp_context=__import__("multiprocessing").get_context("fork")
    )
    try:
        with MemmapPool(executor=executor) as pool:
            yield pool, executor
    finally:
        executor.shutdown()


def traffic(pool, executor, shape, **options):
    executor.reset()
    result = pool.map_chunks(fill_with_index, shape, "float64", chunks=(1, None), **options)
    assert result.shape == shape
    np.testing.assert_array_equal(result[:, 0], np.arange(shape[0]))
    np.testing.assert_array_equal(result[:, -1], np.arange(shape[0]))
    with executor.lock:
        sent = [size for _, size in executor.sent]
        received = list(executor.received)
    assert sent, "nothing was sent to the workers"
    assert len(received) == len(sent)
    return sent, received


@pytest.mark.timeout(60)
def test_bytes_sent_per_chunk_do_not_grow_with_the_array(measuring_pool):
    """A 64x larger output with the same chunk count moves no more bytes per chunk, and a
    chunk's messages are a tiny fraction of its data."""
    pool, executor = measuring_pool
    small_shape, large_shape = (CHUNKS, 1024), (CHUNKS, 64 * 1024)  # 128 KiB and 8 MiB
    small_sent, small_received = traffic(pool, executor, small_shape)
    large_sent, large_received = traffic(pool, executor, large_shape)

    # Each message is a few hundred bytes whatever the array: no array data inside.
    for sizes in (small_sent, small_received, large_sent, large_received):
        assert max(sizes) < 2048, sizes
    assert max(large_sent) <= max(small_sent) + 64
    assert max(large_received) <= max(small_received) + 64

    # Per chunk, everything that crossed, both ways, against a chunk's 512 KiB of data.
    chunk_bytes = large_shape[1] * 8
    per_chunk = (sum(large_sent) + sum(large_received)) / CHUNKS
    assert per_chunk < chunk_bytes / 100, per_chunk
    # Far below what returning (or sending) the arrays would cost.
    assert sum(large_sent) + sum(large_received) < 8 * 2**20 / 100


def kernel_with_a_big_constant(size):
    table = np.arange(size, dtype="float64")  # ~ size * 8 bytes when pickled by value

    def kernel(out, chunk):
        out[...] = table[chunk.index]

    return kernel


@pytest.mark.timeout(60)
def test_a_kernel_closing_over_a_big_constant_is_not_sent_per_chunk(measuring_pool):
    """A kernel closing over 1 MiB of data costs 1 MiB once per job, not once per chunk: the
    messages to the workers stay small."""
    pool, executor = measuring_pool
    kernel = kernel_with_a_big_constant(128 * 1024)
    kernel_size = len(cloudpickle.dumps(kernel))
    assert kernel_size > 2**20
    executor.reset()
    result = pool.map_chunks(kernel, (64, 32), "float64", chunks=1)
    np.testing.assert_array_equal(result[:, 0], np.arange(64))
    with executor.lock:
        total_sent = sum(size for _, size in executor.sent)
    # Once per chunk would be 64 MiB; even once per message would show.
    assert total_sent < kernel_size / 10, total_sent


def _record_unpickling(log_path):
    with open(log_path, "a") as f:
        f.write(f"load {os.getpid()}\n")
    return CountingKernel(log_path)


class CountingKernel:
    """A kernel that writes a line to a log file each time it is pickled or unpickled."""

    def __init__(self, log_path):
        self.log_path = log_path

    def __call__(self, out, chunk):
        out[...] = chunk.index

    def __reduce__(self):
        with open(self.log_path, "a") as f:
            f.write(f"dump {os.getpid()}\n")
        return (_record_unpickling, (self.log_path,))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_kernel_is_pickled_once_per_job_not_once_per_chunk(tmp_path, method):
    """Over 50 chunks, the kernel is pickled once in the parent and unpickled at most once
    per worker."""
    log_path = tmp_path / "pickling.log"
    kernel = CountingKernel(str(log_path))
    with MemmapPool(2, mp_context=method) as pool:
        for job in range(2):
            result = pool.map_chunks(kernel, (50, 8), "int32", chunks=1)
            np.testing.assert_array_equal(result[:, 0], np.arange(50))
            events = log_path.read_text().split("\n")[:-1]
            dumps = [e for e in events if e.startswith("dump")]
            loads = [e for e in events if e.startswith("load")]
            assert dumps == [f"dump {os.getpid()}"] * (job + 1)
            assert 1 <= len(loads) <= 2 * (job + 1), loads
            assert all(int(e.split()[1]) != os.getpid() for e in loads)
