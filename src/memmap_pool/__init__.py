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

import logging

from . import errors
from ._chunks import Chunk
from ._halo import Halo
from ._jobs import Job, JobStats, Progress
from ._kernel import Kernel, kernel
from ._output import Output
from ._pool import MemmapPool
from .errors import (
    ChunkTimeoutError,
    JournalMismatchError,
    KernelError,
    MemmapPoolError,
    NotEnoughSpaceError,
    OutputBusyError,
    PrivateDirError,
    SerializationError,
    SharedDirError,
    WorkerCrashedError,
    WorkerStartupError,
)

__version__ = "0.1.0"

# A library's logger stays silent until the application configures logging (the command
# line does): without this, warnings reach stderr through Python's last-resort handler.
logging.getLogger("memmap_pool").addHandler(logging.NullHandler())

__all__ = [
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
]
