"""What crosses between parent and workers: the status file's layout and operations, and the
spec file, written privately and loaded only if it is the very file the parent wrote."""

from __future__ import annotations

import errno
import os
import pickle
import stat

import cloudpickle
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memmap_pool._chunks import plan_chunks
from memmap_pool._privatedir import PrivateDir
from memmap_pool._protocol import (
    STATUS_HEADER_BYTES,
    ChunkState,
    InputBinding,
    JobSpec,
    SpecRejected,
    StatusFile,
    load_spec,
    write_spec,
)
from memmap_pool._roles import SameRegion
from memmap_pool._storage import ArrayRef, contiguous_strides

SETTINGS = settings(max_examples=30, deadline=None, database=None)

# -- the status file -----------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 100_000))
def test_status_arrays_are_aligned_and_do_not_overlap(count):
    """State, pid and start arrays follow the header, each aligned for its type, in order."""
    state_at, pid_at, start_at, size = StatusFile.layout(count)
    assert state_at == STATUS_HEADER_BYTES
    assert state_at % 8 == pid_at % 8 == start_at % 8 == 0
    assert state_at + count <= pid_at < state_at + count + 8
    assert pid_at + 4 * count <= start_at < pid_at + 4 * count + 8
    assert size == start_at + 8 * count == StatusFile.nbytes(count)


@SETTINGS
@given(
    st.integers(1, 64).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.sampled_from(list(ChunkState)), min_size=n, max_size=n),
            st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n),
            st.lists(st.floats(0, 1e9), min_size=n, max_size=n),
        )
    )
)
def test_status_fields_are_stored_independently(case):
    """Writing every chunk's state, pid and start reads each back, the cancel flag apart."""
    count, states, pids, starts = case
    status = StatusFile.in_memory(count)
    for i, (state, pid, start) in enumerate(zip(states, pids, starts)):
        status.start(i, pid, start)
        status.states[i] = state
    assert not status.cancelled
    status.cancel()
    assert status.cancelled
    assert [status.state(i) for i in range(count)] == states
    assert [status.pid(i) for i in range(count)] == pids
    assert status.starts.tolist() == starts


def _new_file(path) -> int:
    """A new 0600 file, as the pool's private dir makes them."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)


def test_a_new_status_has_every_chunk_pending_and_no_cancel():
    """A fresh status: nothing running, nothing done, the cancel flag down."""
    status = StatusFile.in_memory(5)
    assert not status.cancelled
    assert [status.state(i) for i in range(5)] == [ChunkState.PENDING] * 5
    assert status.running().tolist() == []
    assert status.count_done() == 0
    assert status.overdue(1e9, 1.0) == []


def test_a_started_chunk_is_running_with_its_pid_and_start_time():
    """start() marks the chunk RUNNING in the given pid from the given time."""
    status = StatusFile.in_memory(4)
    status.start(2, 777, 50.0)
    assert status.state(2) is ChunkState.RUNNING
    assert status.pid(2) == 777
    assert status.starts[2] == 50.0
    assert status.running().tolist() == [2]


def test_overdue_lists_the_chunks_running_longer_than_the_limit():
    """overdue(now, limit) holds running chunks started more than limit seconds before now."""
    status = StatusFile.in_memory(4)
    status.start(0, 1, 10.0)
    status.start(1, 2, 14.0)
    status.start(3, 3, 5.0)
    status.finish(3, with_result=False)
    assert status.overdue(15.0, 4.0) == [0]
    assert status.overdue(15.0, 5.0) == []
    assert status.overdue(20.0, 5.0) == [0, 1]


def test_finished_chunks_count_done_with_or_without_a_result():
    """finish() gives DONE or DONE_WITH_RESULT, both counted by count_done()."""
    status = StatusFile.in_memory(3)
    status.start(0, 1, 0.0)
    status.finish(0, with_result=False)
    status.start(1, 1, 0.0)
    status.finish(1, with_result=True)
    assert status.state(0) is ChunkState.DONE
    assert status.state(1) is ChunkState.DONE_WITH_RESULT
    assert status.count_done() == 2
    assert status.running().tolist() == []


def test_a_reset_chunk_is_pending_again():
    """reset() puts a running or done chunk back to PENDING."""
    status = StatusFile.in_memory(2)
    status.start(0, 1, 0.0)
    status.start(1, 1, 0.0)
    status.finish(1, with_result=False)
    status.reset(0)
    status.reset(1)
    assert [status.state(i) for i in range(2)] == [ChunkState.PENDING] * 2
    assert status.count_done() == 0


def test_a_status_file_is_shared_between_its_openers(tmp_path):
    """Two openers of one status file see each other's writes; closing one keeps the other."""
    path = str(tmp_path / "status.bin")
    StatusFile.create(path, 6)
    assert os.path.getsize(path) == StatusFile.nbytes(6)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    parent = StatusFile.open(path, 6)
    worker = StatusFile.open(path, 6)
    worker.start(4, 321, 7.5)
    assert parent.state(4) is ChunkState.RUNNING
    assert parent.pid(4) == 321
    parent.cancel()
    assert worker.cancelled
    worker.close()
    assert parent.state(4) is ChunkState.RUNNING
    parent.close()


def test_a_status_file_is_never_created_over_an_existing_file(tmp_path):
    """create() refuses a path that exists."""
    path = tmp_path / "status.bin"
    path.write_bytes(b"x")
    with pytest.raises(FileExistsError):
        StatusFile.create(str(path), 4)


def test_a_closed_status_has_no_views_left():
    """close() drops the arrays: using the status afterwards fails loudly."""
    status = StatusFile.in_memory(3)
    status.close()
    with pytest.raises(AttributeError):
        status.state(0)


# -- the spec file -------------------------------------------------------------------------------


def _kernel(out, chunk, scale):
    out[:] = scale


def make_spec(tmp_path) -> JobSpec:
    shape = (6, 4)
    dtype = np.dtype(np.float32)
    plan = plan_chunks(shape, dtype, "C", 2)
    strides = contiguous_strides(shape, dtype.itemsize, "C")
    out = ArrayRef(str(tmp_path / "out.bin"), 0, dtype, shape, strides)
    weights = ArrayRef(str(tmp_path / "in0.bin"), 128, np.dtype(np.int16), (6,), (2,))
    return JobSpec(
        token="0123abcd",
        plan=plan,
        outputs=(out,),
        order="C",
        inputs=(InputBinding(weights, SameRegion((0,))),),
        kernel=cloudpickle.dumps((_kernel, (2.0,), {})),
        status_path=str(tmp_path / "status.bin"),
        flush=True,
    )


def test_a_spec_written_is_the_spec_loaded(tmp_path):
    """write_spec then load_spec with the returned inode gives an equal spec."""
    spec = make_spec(tmp_path)
    path = str(tmp_path / "spec.pkl")
    inode = write_spec(_new_file(path), spec)
    assert inode == os.stat(path).st_ino
    loaded = load_spec(path, inode)
    assert loaded == spec
    assert loaded.plan.slices(1) == spec.plan.slices(1)
    fn, args, kwargs = cloudpickle.loads(loaded.kernel)
    assert (fn.__name__, args, kwargs) == ("_kernel", (2.0,), {})


def test_a_spec_file_is_private_to_its_user(tmp_path):
    """The spec file is created with mode 0600."""
    path = str(tmp_path / "spec.pkl")
    write_spec(_new_file(path), make_spec(tmp_path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_spec_is_never_written_over_an_existing_file_or_through_a_symlink(tmp_path):
    """The pool's files are created with O_EXCL|O_NOFOLLOW in its private dir: a file or a
    symlink planted at the name is refused, and its target left alone."""
    pdir = PrivateDir(str(tmp_path))
    try:
        existing = os.path.join(pdir.path, "spec.pkl")
        with open(existing, "wb") as f:
            f.write(b"theirs")
        with pytest.raises(FileExistsError):
            pdir.create("spec.pkl", os.O_WRONLY)
        target = tmp_path / "target"
        target.write_bytes(b"target")
        os.symlink(target, os.path.join(pdir.path, "link.pkl"))
        with pytest.raises(FileExistsError):
            pdir.create("link.pkl", os.O_WRONLY)
        with open(existing, "rb") as f:
            assert f.read() == b"theirs"
        assert target.read_bytes() == b"target"
    finally:
        pdir.remove()


def test_load_spec_refuses_a_symlink_without_following_it(tmp_path):
    """A symlink to a valid spec file is not opened (ELOOP)."""
    target = str(tmp_path / "spec.pkl")
    inode = write_spec(_new_file(target), make_spec(tmp_path))
    link = tmp_path / "link.pkl"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symbolic links") as info:
        load_spec(str(link), inode)
    assert info.value.errno == errno.ELOOP


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_spec_refuses_a_file_others_can_read_or_write(tmp_path, mode):
    """A spec file with any group or other permission is rejected."""
    path = str(tmp_path / "spec.pkl")
    inode = write_spec(_new_file(path), make_spec(tmp_path))
    os.chmod(path, mode)
    with pytest.raises(SpecRejected, match=f"mode {mode:o}"):
        load_spec(path, inode)


def test_load_spec_refuses_a_file_replaced_since_it_was_written(tmp_path):
    """A valid spec file at the path, but not the inode recorded, is rejected."""
    path = str(tmp_path / "spec.pkl")
    inode = write_spec(_new_file(path), make_spec(tmp_path))
    other = str(tmp_path / "other.pkl")
    write_spec(_new_file(other), make_spec(tmp_path))
    os.replace(other, path)
    assert os.stat(path).st_ino != inode
    with pytest.raises(SpecRejected, match="replaced"):
        load_spec(path, inode)


def test_load_spec_refuses_a_file_that_holds_something_else(tmp_path):
    """A private file of the right inode that does not hold a JobSpec is rejected."""
    path = tmp_path / "spec.pkl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        pickle.dump({"token": "x"}, f)
    with pytest.raises(SpecRejected, match="does not hold a job spec"):
        load_spec(str(path), os.stat(path).st_ino)


@pytest.mark.skipif(os.getuid() != 0, reason="changing a file's owner needs root")
def test_load_spec_refuses_a_file_owned_by_another_user(tmp_path):
    """A spec file owned by another uid is rejected."""
    path = str(tmp_path / "spec.pkl")
    inode = write_spec(_new_file(path), make_spec(tmp_path))
    os.chown(path, 54321, -1)
    with pytest.raises(SpecRejected, match="owned by uid 54321"):
        load_spec(path, inode)


def test_load_spec_of_a_removed_file_is_an_os_error(tmp_path):
    """The spec file of a job that ended (removed) gives FileNotFoundError."""
    path = str(tmp_path / "spec.pkl")
    inode = write_spec(_new_file(path), make_spec(tmp_path))
    os.unlink(path)
    with pytest.raises(FileNotFoundError):
        load_spec(path, inode)
