"""Everything that crosses the boundary between the parent and its workers.

Three channels, none of which carries array data::

    spec file   parent writes once per job   JobSpec: plan, file references, roles, and the
                (0600, private dir)          cloudpickled kernel with its args
    batch       parent -> worker, per batch  Batch: spec path and identity, job token, chunk
                (a pool task's arguments)    indices (a ``range`` pickles to a few bytes)
    result      worker -> parent, per batch  BatchResult: indices done, per-chunk seconds,
                                             small pickled return values, or a ChunkFailure
    status file shared mapping, per job      StatusFile: a cancel flag, and per chunk its
                (workers on this host only)  state, the pid running it and when it started

The status file lets the parent follow progress inside a batch, find the chunks a dead
worker was running (and the pid to kill for a timeout) without any message from the worker,
and stop every worker of a job at once through the cancel flag.
"""

from __future__ import annotations

import enum
import errno
import os
import pickle
import stat
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._chunks import ChunkPlan
from ._roles import InputRole
from ._storage import ArrayRef
from .errors import NotEnoughSpaceError


class FailureKind(enum.Enum):
    """Why a worker stopped a batch before its end."""

    KERNEL = "kernel"
    """The kernel raised: re-raised in the parent with its own type."""
    SERIALIZATION = "serialization"
    """The kernel or its arguments could not be loaded, or a return value not pickled."""
    STORAGE = "storage"
    """Reserving the output's blocks failed: the filesystem is full."""
    FILES = "files"
    """A file of the job is missing, truncated, not the pool's, or could not be mapped."""


@dataclass(frozen=True)
class InputBinding:
    """One input of a job as a worker sees it: where the array is, and how a chunk's region
    maps to the view the kernel gets (its role)."""

    ref: ArrayRef
    role: InputRole


@dataclass(frozen=True)
class StepSpec:
    """What a worker needs to step a state (``iterate``): the two buffers (step ``k`` writes
    ``buffers[k % 2]`` and reads the other), the initial state step 1 reads (None when the
    run resumes at a later step), the first step the run computes, and how the buffers are
    padded."""

    buffers: tuple[ArrayRef, ArrayRef]
    initial: InputBinding | None
    first_step: int
    # Padded buffers: each file holds the state with ``pad`` more elements at both ends of
    # every axis (the buffers' refs are views of the inside), which a worker refreshes with
    # ``pad_mode`` after each chunk; the kernel's window of the previous state is then a
    # view. Empty: the buffers are the state itself.
    pad: tuple[int, ...] = ()
    pad_mode: str = "none"


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs for a job; written once to a file, read once per worker."""

    token: str
    plan: ChunkPlan
    outputs: tuple[ArrayRef, ...]
    order: str
    inputs: tuple[InputBinding, ...]
    kernel: bytes  # cloudpickle of (fn, args, kwargs)
    status_path: str | None
    flush: bool  # msync each chunk before reporting it done (persistent or remote outputs)
    output_orders: tuple[str, ...] = ()  # each output's layout; default: all ``order``
    reserve: tuple[bool, ...] = ()  # per output: reserve blocks before writing (default: yes)
    steps: StepSpec | None = None  # an iterate run: no outputs, two state buffers instead
    prev_role: InputRole | None = None  # how the kernel sees the previous state


@dataclass(frozen=True)
class Batch:
    """One pool task: run chunks ``indices`` of the job whose spec is at ``spec_path``.

    ``spec_inode`` is the inode of the spec file the parent wrote: a worker refuses to load a
    file that is not that one (see :func:`load_spec`).
    """

    spec_path: str
    spec_inode: int
    token: str
    indices: range | tuple[int, ...]
    step: int = 0  # the step of an iterate run the chunks belong to


@dataclass(frozen=True)
class ChunkFailure:
    """Why a batch stopped: a kernel exception or a failure of the worker's own work."""

    index: int  # the chunk, or -1 when the job as a whole could not be loaded
    region: str
    kind: FailureKind
    exception: bytes | None  # the pickled exception when it survives a round trip
    type_name: str
    message: str
    traceback: str


@dataclass
class BatchResult:
    """What a worker sends back: small, whatever the size of the chunks."""

    pid: int
    done: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    nbytes: int = 0
    results: dict[int, bytes] = field(default_factory=dict)
    failure: ChunkFailure | None = None


# -- the spec file -----------------------------------------------------------------------------


class SpecRejected(OSError):
    """The spec file a worker was sent to is not the one the parent wrote."""


def write_spec(fd: int, spec: JobSpec) -> int:
    """Write ``spec`` to the new file open at ``fd`` (made 0600 in the pool's private dir,
    see :meth:`._privatedir.PrivateDir.create`); return its inode for :class:`Batch`."""
    with open(fd, "wb") as f:
        pickle.dump(spec, f, protocol=pickle.HIGHEST_PROTOCOL)
        return os.fstat(f.fileno()).st_ino


def load_spec(path: str, inode: int) -> JobSpec:
    """Load a job's spec in a worker, after checking that it is the file the parent wrote.

    Unpickling runs code, so a file that another user could have put in its place is never
    loaded: it must be a regular file (not a symlink), owned by this process's user, not
    readable or writable by anyone else, and have the inode the parent recorded.

    Raises:
        SpecRejected: when any of these does not hold.
        OSError: when the file can't be opened: the job ended and removed it, or the path
            is a symlink (``ELOOP``).
    """
    # O_NONBLOCK: a FIFO planted at the path must not block the worker (it is then refused
    # as not a regular file); it changes nothing for a regular file.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "it is not a regular file"
        elif st.st_uid != os.getuid():
            problem = f"it is owned by uid {st.st_uid}, not by this worker's user"
        elif st.st_mode & 0o077:
            problem = f"its mode {stat.S_IMODE(st.st_mode):o} lets other users at it"
        elif st.st_ino != inode:
            problem = "it was replaced since the pool wrote it"
        if problem is not None:
            msg = f"refusing to load the job's spec file {path}: {problem}"
            raise SpecRejected(msg)
        spec = pickle.load(f)
    if not isinstance(spec, JobSpec):
        msg = f"refusing to use {path}: it does not hold a job spec"
        raise SpecRejected(msg)
    return spec


# -- the status file ---------------------------------------------------------------------------


class ChunkState(enum.IntEnum):
    """A chunk's state in the status file."""

    PENDING = 0
    RUNNING = 1
    DONE = 2
    DONE_WITH_RESULT = 3  # done, and the kernel returned a value (sent with the batch)


STATUS_HEADER_BYTES = 64
"""Byte 0 is the job's cancel flag; the rest of the header is padding, so that the per-chunk
arrays that follow start 8-byte aligned."""


class StatusFile:
    """The shared per-job status: a cancel flag, and per chunk a state, a pid, a start time.

    The parent creates the file; every worker on this host maps it. Each field is written by
    one side at a time (a chunk's fields by the worker running it, then reset by the parent
    only once that worker is known dead), so no lock is needed.
    """

    def __init__(self, buffer: Any, count: int, mapping: Any = None) -> None:
        self.count = count
        self._mapping = mapping
        state_at, pid_at, start_at, _ = self.layout(count)
        self._header = np.frombuffer(buffer, dtype=np.uint8, count=STATUS_HEADER_BYTES)
        self.states = np.frombuffer(buffer, dtype=np.uint8, count=count, offset=state_at)
        self.pids = np.frombuffer(buffer, dtype=np.int32, count=count, offset=pid_at)
        self.starts = np.frombuffer(buffer, dtype=np.float64, count=count, offset=start_at)

    @staticmethod
    def layout(count: int) -> tuple[int, int, int, int]:
        """Offsets of the state (u1), pid (i4) and start time (f8) arrays, and the size."""
        state_at = STATUS_HEADER_BYTES
        pid_at = state_at + -(-count // 8) * 8
        start_at = pid_at + -(-count * 4 // 8) * 8
        return state_at, pid_at, start_at, start_at + count * 8

    @classmethod
    def nbytes(cls, count: int) -> int:
        return cls.layout(count)[3]

    @classmethod
    def create(cls, path: str, count: int, fd: int | None = None) -> None:
        """Create the file with all its blocks written: parent and workers write it through
        mappings, and a store into a hole of a full tmpfs is a SIGBUS. ``fd``: the new file,
        already created at ``path`` (it is closed here).

        Raises:
            NotEnoughSpaceError: when the filesystem is full.
        """
        nbytes = cls.nbytes(count)
        if fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, bytes(nbytes))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            directory = os.path.dirname(path)
            msg = (
                f"not enough space in {directory} for the job's {nbytes}-byte status file; "
                "free some space or pass temp_dir="
            )
            raise NotEnoughSpaceError(msg, directory) from exc
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: str, count: int) -> StatusFile:
        import mmap

        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE)
        finally:
            os.close(fd)
        return cls(mapping, count, mapping)

    @classmethod
    def in_memory(cls, count: int) -> StatusFile:
        """A status that lives in this process only (unit tests of the dispatcher)."""
        return cls(bytearray(cls.nbytes(count)), count)

    # -- the job -------------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        return bool(self._header[0])

    def cancel(self) -> None:
        """Tell every worker to start no further chunk of the job. A no-op once closed: the
        job has ended (``Job.cancel`` may race with its end)."""
        header = getattr(self, "_header", None)
        if header is not None:
            header[0] = 1

    # -- one chunk -----------------------------------------------------------------------------

    # Plain ints: numpy converts an IntEnum member into a uint8 about 2x slower than an int,
    # and these run twice per chunk in the workers' loops.
    _RUNNING, _DONE, _DONE_WITH_RESULT = (
        int(ChunkState.RUNNING),
        int(ChunkState.DONE),
        int(ChunkState.DONE_WITH_RESULT),
    )

    def start(self, index: int, pid: int, now: float) -> None:
        self.pids[index] = pid
        self.starts[index] = now
        self.states[index] = self._RUNNING

    def finish(self, index: int, with_result: bool) -> None:
        self.states[index] = self._DONE_WITH_RESULT if with_result else self._DONE

    def reset(self, index: int) -> None:
        """Back to pending: its worker is gone, or it failed and must not look running."""
        self.states[index] = ChunkState.PENDING

    def state(self, index: int) -> ChunkState:
        return ChunkState(int(self.states[index]))

    def pid(self, index: int) -> int:
        return int(self.pids[index])

    # -- all chunks ----------------------------------------------------------------------------

    def running(self) -> np.ndarray[Any, Any]:
        """Indices of the chunks running now."""
        return np.flatnonzero(self.states == ChunkState.RUNNING)

    def overdue(self, now: float, limit: float) -> list[int]:
        """Running chunks that started more than ``limit`` seconds before ``now``."""
        running = self.running()
        if not running.size:
            return []
        late: list[int] = running[now - self.starts[running] > limit].tolist()
        return late

    def clear(self) -> None:
        """Every chunk back to pending: a new step of an iterate run begins."""
        self.states[:] = ChunkState.PENDING

    def count_done(self) -> int:
        return int(np.count_nonzero(self.states >= ChunkState.DONE))

    def close(self) -> None:
        """Drop the views and the mapping (views first, or mmap.close raises BufferError)."""
        del self._header, self.states, self.pids, self.starts
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                pass  # a view escaped; the mapping goes with it
            self._mapping = None
