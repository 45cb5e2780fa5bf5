"""memmap-pool: run numpy kernels on every core, writing straight into shared memory-mapped
arrays. Outputs and inputs are shared through files, never copied between processes.

Example:
    >>> from memmap_pool import MemmapPool
    >>> def render(out, chunk):
    ...     rows = chunk.slices[0]
    ...     out[:] = np.arange(rows.start, rows.stop)[:, None]
    >>> with MemmapPool() as pool:  # doctest: +SKIP
    ...     img = pool.map_chunks(render, (8192, 8192), dtype="float32")
"""

from __future__ import annotations

from . import errors
from ._chunks import Chunk
from ._jobs import Job, JobStats, Progress
from ._kernel import Kernel, kernel
from ._pool import MemmapPool
from .errors import (
    ChunkTimeoutError,
    JournalMismatchError,
    KernelError,
    MemmapPoolError,
    NotEnoughSpaceError,
    SerializationError,
    SharedDirError,
    WorkerCrashedError,
)

__version__ = "0.1.0"

__all__ = [
    "Chunk",
    "ChunkTimeoutError",
    "Job",
    "JobStats",
    "JournalMismatchError",
    "Kernel",
    "KernelError",
    "MemmapPool",
    "MemmapPoolError",
    "NotEnoughSpaceError",
    "Progress",
    "SerializationError",
    "SharedDirError",
    "WorkerCrashedError",
    "__version__",
    "errors",
    "kernel",
]
