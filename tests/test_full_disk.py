"""Full disks: a tiny tmpfs mounted for the test stands for a full /dev/shm.

A plain ``np.memmap`` whose file is on a full tmpfs dies with SIGBUS on its first write to a
page that has no block yet. The pool checks for room before any work, and each worker
reserves its chunks' blocks before writing, so a disk that fills up during the job gives a
clear error instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import faults
from memmap_pool import MemmapPool, NotEnoughSpaceError, WorkerCrashedError
from memmap_pool._privatedir import MARKER

MiB = 1 << 20


def library_files(where: Path) -> list[str]:
    """Everything the library left in ``where`` (its private dirs and their files)."""
    return sorted(
        str(p.relative_to(where))
        for p in where.rglob("*")
        if p.name.startswith("memmap-pool-") or "memmap-pool-" in str(p)
    )


@pytest.mark.timeout(60)
def test_output_too_big_is_refused_before_any_work(tiny_tmpfs, tmp_path):
    """An output larger than the free space raises NotEnoughSpaceError naming the directory,
    the size needed and the space free, before any chunk runs or any file is made."""
    log = str(tmp_path / "log")
    with MemmapPool(2, mp_context="fork", temp_dir=tiny_tmpfs) as pool:
        with pytest.raises(NotEnoughSpaceError) as info:
            pool.map_chunks(faults.counting, (1024, 1024), "int64", kwargs={"log": log})
        message = str(info.value)
        assert str(tiny_tmpfs) in message
        assert "8.0 MiB" in message  # needed
        assert re.search(r"\(\d+\.\d (KiB|MiB) free\)", message), message
        assert "temp_dir=" in message  # the remedy
        assert info.value.path == str(tiny_tmpfs)
        assert isinstance(info.value, OSError)

        npy = tiny_tmpfs / "big.npy"
        with pytest.raises(NotEnoughSpaceError, match=str(tiny_tmpfs)):
            pool.map_chunks(
                faults.counting, (1024, 1024), "int64", out=str(npy), kwargs={"log": log}
            )
        assert not npy.exists()
        assert not os.path.exists(log)
        assert [p.name for p in tiny_tmpfs.iterdir() if not p.name.startswith("memmap-pool-")] == []
        # A job that fits still runs there.
        result = pool.map_chunks(faults.counting, (64, 1024), "int64")
        assert np.array_equal(result, faults.expected((64, 1024)))
        del result
    assert library_files(tiny_tmpfs) == []


@pytest.mark.timeout(60)
def test_disk_filled_by_another_writer_mid_job_gives_a_clear_error(small_tmpfs, tmp_path):
    """Another program takes all the space while the job runs: the job fails with
    NotEnoughSpaceError from a worker's reservation (never a hang or a dead parent), the
    job's files are removed, and the pool runs the next job."""
    filler = small_tmpfs / "filler"
    log = str(tmp_path / "log")
    shape = (256, 1024)  # 2 MiB of int64 in 32 chunks: half the tmpfs
    with MemmapPool(2, mp_context="fork", temp_dir=small_tmpfs) as pool:
        with pytest.raises((NotEnoughSpaceError, WorkerCrashedError)) as info:
            pool.map_chunks(
                faults.fill_disk_once,
                shape,
                "int64",
                chunks=8,
                kwargs={
                    "filler": str(filler),
                    "marker": str(tmp_path / "m"),
                    "log": log,
                    "delay": 0.05,
                },
            )
        err = info.value
        if isinstance(err, WorkerCrashedError):  # the other clear outcome a full tmpfs has
            assert "SIGBUS" in str(err)
        else:
            assert "no space left" in str(err)
            assert "chunk " in str(err)
        assert filler.stat().st_size > 0
        assert len(faults.read_log(log)) < shape[0] // 8  # it stopped
        # The job's own files are gone; only the pool's (empty) dir remains until shutdown.
        for d in small_tmpfs.glob("memmap-pool-*"):
            assert [p.name for p in d.iterdir() if p.name != MARKER] == []
        filler.unlink()
        result = pool.map_chunks(faults.counting, shape, "int64", chunks=8)
        assert np.array_equal(result, faults.expected(shape))
        del result
    assert library_files(small_tmpfs) == []


@pytest.mark.timeout(60)
def test_npy_output_on_a_disk_that_filled_up_resumes_once_space_is_freed(small_tmpfs, tmp_path):
    """A ``.npy`` job stopped by a full disk keeps its journal; once space is freed,
    resume=True runs only the chunks it lacks and the output is right."""
    filler = small_tmpfs / "filler"
    out = str(small_tmpfs / "result.npy")
    log = str(tmp_path / "log")
    shape = (256, 1024)
    count = shape[0] // 8
    with MemmapPool(2, mp_context="fork", temp_dir=tmp_path) as pool:
        with pytest.raises((NotEnoughSpaceError, WorkerCrashedError)):
            pool.map_chunks(
                faults.fill_disk_once,
                shape,
                "int64",
                chunks=8,
                out=out,
                kwargs={
                    "filler": str(filler),
                    "marker": str(tmp_path / "m"),
                    "log": log,
                    "delay": 0.05,
                },
            )
        with open(out + ".journal", "rb") as f:
            f.seek(4096)
            journaled = set(np.flatnonzero(np.frombuffer(f.read(), dtype=np.uint8)).tolist())
        filler.unlink()
        first = set(faults.read_log(log))
        assert len(first) < count
        assert journaled <= first
        log2 = str(tmp_path / "log2")
        result = pool.map_chunks(
            faults.counting, shape, "int64", chunks=8, out=out, resume=True, kwargs={"log": log2}
        )
        assert sorted(faults.read_log(log2)) == sorted(set(range(count)) - journaled)
        assert np.array_equal(result, faults.expected(shape))
        del result
    assert not os.path.exists(out + ".journal")


def _reserve_flags(pool: MemmapPool, out) -> tuple[bool, ...]:
    """Whether the workers of a job into ``out`` would reserve its blocks (from its spec)."""
    from memmap_pool._jobfiles import JobFiles
    from memmap_pool._request import build_request

    request = build_request(
        lambda o, c: None, out.shape, out.dtype, out=out, defaults=pool._defaults()
    )
    files = JobFiles.create(request, pool._workspace, pool._backend.capabilities)
    try:
        return files.spec.reserve
    finally:
        files.cleanup(succeeded=False)


def test_blocks_are_reserved_only_where_an_output_has_holes(tiny_tmpfs, fork_pool):
    """A sparse output is reserved batch by batch; one whose blocks are all allocated is
    not, so a job on an existing output costs the same whatever its size (reserving walks
    the file's pages); the reservation still protects what can fail."""
    sparse = np.memmap(tiny_tmpfs / "sparse.bin", "float64", "w+", shape=(16_384,))
    assert _reserve_flags(fork_pool, sparse) == (True,)
    written = np.memmap(tiny_tmpfs / "written.bin", "float64", "w+", shape=(8_192,))
    written[:] = 1.0
    written.flush()
    assert _reserve_flags(fork_pool, written) == (False,)
    # The fully allocated output is updated in place on the full tmpfs all the same.
    result = fork_pool.map_chunks(lambda out, chunk: out.__iadd__(1), written.shape, out=written)
    assert np.all(result == 2.0)
    del sparse, written, result
