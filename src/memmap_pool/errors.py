"""The exceptions memmap-pool raises.

Every exception defined here derives from :class:`MemmapPoolError`, so ``except
MemmapPoolError`` catches all of them, and each one also derives from the builtin it really
is (``OSError``, ``TimeoutError``, ``ValueError``, ...), so code written for the builtin keeps
working. Bad arguments are reported with the plain builtins (``TypeError``, ``ValueError``,
``FileNotFoundError``) before any work starts.

Exceptions raised by a kernel are not wrapped: they are re-raised in the parent with their
original type, the worker's traceback as ``__cause__``, and a note naming the chunk.
"""

from __future__ import annotations

import errno
import pickle
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "ChunkTimeoutError",
    "JournalMismatchError",
    "KernelError",
    "MemmapPoolError",
    "NotEnoughSpaceError",
    "OutputBusyError",
    "PrivateDirError",
    "SerializationError",
    "SharedDirError",
    "WorkerCrashedError",
    "WorkerStartupError",
]


class MemmapPoolError(Exception):
    """Root of every error raised by memmap-pool itself.

    Catch it to handle any failure of the library (as opposed to an exception raised by
    your own kernel, which is re-raised with its own type).
    """


class WorkerCrashedError(MemmapPoolError, BrokenProcessPool):
    """A worker process died while running a chunk, more often than ``retries`` allows.

    Raised when a worker is killed (``SIGKILL``, often the out-of-memory killer), crashes in
    native code (``SIGSEGV``, ``SIGBUS``) or calls ``os._exit`` while a chunk of the job was
    in flight, and the chunk failed again on each retry. The message names the chunks, the
    worker's exit code or signal and its likely cause. Finished chunks are kept; the pool
    replaces its own workers and stays usable (a user's ``executor=`` can't be rebuilt: it
    stays broken).

    What to do: for an out-of-memory kill, use smaller chunks or fewer workers; for a crash
    in native code, run the kernel on the named chunk in a single process to debug it.

    Attributes:
        chunks: indices of the chunks that exhausted their retries.
        exitcodes: the exit codes of the dead workers (negative: killed by that signal).
    """

    def __init__(
        self, message: str, chunks: tuple[int, ...] = (), exitcodes: tuple[int, ...] = ()
    ) -> None:
        super().__init__(message)
        self.chunks = chunks
        self.exitcodes = exitcodes

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.chunks, self.exitcodes))


class WorkerStartupError(MemmapPoolError, BrokenProcessPool):
    """The pool's worker processes keep dying while they start, before running any task.

    Raised by a job, and by every later ``submit``/``map_chunks`` of the pool, once the
    workers were replaced a few times in a row without one of them finishing its start-up.
    The message names the cause when it is known: the ``initializer`` raised (its error is
    quoted), or, with the spawn and forkserver start methods, the workers exited while
    importing the main module, which happens when a script creates a pool without an
    ``if __name__ == "__main__":`` guard.

    What to do: fix the initializer, or put the code that creates and uses the pool under
    ``if __name__ == "__main__":``; then create a new pool.
    """


class ChunkTimeoutError(MemmapPoolError, TimeoutError):
    """A chunk ran longer than the job's ``timeout`` (seconds per chunk).

    The worker running it is killed and replaced; the job's other chunks are dropped. The
    pool stays usable.

    What to do: raise ``timeout``, use smaller chunks, or look for a hang in the kernel on
    the chunk named in the message.

    Attributes:
        chunk: index of the chunk that timed out.
        timeout: the limit that was exceeded, in seconds.
    """

    def __init__(self, message: str, chunk: int = -1, timeout: float = 0.0) -> None:
        super().__init__(message)
        self.chunk = chunk
        self.timeout = timeout

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.chunk, self.timeout))


class _PathError(OSError):
    """An ``OSError`` of a fixed errno about one path: ``str()`` is the message alone (no
    ``[Errno N]`` prefix) and it survives pickling (from a worker to the parent)."""

    errno_code = 0

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(self.errno_code, message)
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.strerror, self.path))


class NotEnoughSpaceError(MemmapPoolError, _PathError):
    """The directory chosen for a file has no room for it (``errno.ENOSPC``).

    Raised before any work starts when the free space is smaller than the bytes needed, or
    by a worker when reserving its batch's blocks fails because another program took the
    space during the job. Nothing is written past the point of failure.

    What to do: free space, pass ``temp_dir=`` or set ``MEMMAP_POOL_TEMP_DIR`` to a larger
    filesystem, or write the output to a ``.npy`` path on one.
    """

    errno_code = errno.ENOSPC


class OutputBusyError(MemmapPoolError, BlockingIOError):
    """Another job is writing the same output: a ``.npy`` path or the file of a memmap.

    Raised by ``map_chunks``/``submit_chunks`` before any work, when a job still running in
    this process or in another one holds that file: each job holds its persistent outputs
    until it ends, so that no job returns another's half-written array and no in-place
    update is lost. Nothing is written.

    What to do: wait for the other job (``job.result()``), or write to another file.
    """


class SerializationError(MemmapPoolError, pickle.PicklingError):
    """The kernel, its arguments or a chunk's return value could not be (un)pickled.

    Raised before any work starts when the kernel or ``args``/``kwargs`` cannot be pickled
    with cloudpickle, or when a worker cannot unpickle them (a module missing on the worker,
    for instance), or when a kernel's return value cannot cross between processes.

    What to do: keep kernel arguments to plain data; open resources such as files or
    connections inside the kernel, not outside it.
    """


class JournalMismatchError(MemmapPoolError, ValueError):
    """``resume=True`` found a journal written for a different job.

    The journal beside an output records the plan it was written for (shape, dtype, order
    and chunking). Mixing chunks of two plans would give a wrong array, so the resume is
    refused before any work starts.

    What to do: rerun with the original shape, dtype, order and chunks, or pass
    ``resume=False`` to start the output afresh.
    """


class SharedDirError(MemmapPoolError, OSError):
    """A worker of a cluster cannot open or write the pool's ``shared_dir``.

    Raised when a distributed pool starts: every worker must see the same directory,
    because outputs and inputs travel through files in it. The message names the worker
    and the path.

    What to do: pass a ``shared_dir`` on a filesystem mounted at the same path on every
    node (NFS, Lustre, GPFS, ...), writable by the workers' user.
    """


class KernelError(MemmapPoolError, RuntimeError):
    """Stands in for a kernel's exception that could not be sent back from the worker.

    A kernel exception is normally re-raised with its own type. When the exception object
    itself cannot be pickled (it holds a lock, a file or a module, for instance), this error
    is raised instead; its message has the original type, message and the worker's
    traceback, and names the chunk. It also stands in for ``SystemExit`` and
    ``KeyboardInterrupt`` raised by a kernel (``sys.exit()`` in it), which must not end or
    interrupt the parent.

    What to do: fix the kernel's error shown in the message; to keep the original type, make
    the exception picklable (plain-data arguments); raise an exception rather than exit.
    """


class PrivateDirError(MemmapPoolError, _PathError, PermissionError):
    """The pool's private directory is not the one it created, so it refuses to use it.

    Raised before the pool creates, reads or removes a file in its private directory
    (``<temp dir>/memmap-pool-<pid>-<random>``) when what is at that path is no longer the
    directory the pool made: it was replaced (another directory now has its name), turned
    into a symbolic link, given to another owner, had its mode changed from 0700, or was
    removed. Another local user who can write to the temp dir can rename a directory there;
    the pool then stops rather than write its files to, or load files from, a directory
    someone else controls. Nothing is written into the directory found at that path.

    What to do: put the pool's files in a directory only you can write (``temp_dir=`` or
    ``MEMMAP_POOL_TEMP_DIR``), and find out who changed the directory named in the message.

    Attributes:
        path: the private directory's path.
    """

    errno_code = errno.EPERM
