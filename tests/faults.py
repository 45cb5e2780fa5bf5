"""Fault-injection helpers for the fault-tolerance tests: kernels that kill, crash, hang or
raise in their worker, values and arguments that can't cross between processes, and a
counting log that tells which chunks ran.

Every kernel fills its chunk with :func:`expected` values when it does not fail, so a test
compares a result with ``expected(shape)``. A kernel that should fail only once keeps a
marker file (created atomically with ``O_EXCL``) so that the retry finds it and succeeds.

The module is sent to the workers by value (cloudpickle), so these kernels work under every
start method without the tests directory on the workers' ``sys.path``.
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import os
import re
import signal
import sys
import threading
import time
from typing import Any

import cloudpickle
import numpy as np

cloudpickle.register_pickle_by_value(sys.modules[__name__])

HANG_SECONDS = 600.0
"""How long a hanging kernel sleeps: far beyond any test's timeout, so only a kill ends it."""


# -- values and counting -----------------------------------------------------------------------


def expected(shape: tuple[int, ...], dtype: Any = "int64") -> np.ndarray:
    """The array every well-behaved kernel here computes: each element's flat C index."""
    return np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)


def fill(out: np.ndarray, chunk: Any) -> None:
    """Write the chunk's part of :func:`expected` into ``out``."""
    grid = np.indices(chunk.region_shape)
    coords = tuple(g + s for g, s in zip(grid, chunk.start))
    out[...] = np.ravel_multi_index(coords, chunk.shape)


def record(log: str | None, index: int, tag: str = "") -> None:
    """Append ``index`` (and an optional tag) as one line to ``log``: one write with
    O_APPEND, so lines from several workers never interleave."""
    if log is None:
        return
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{tag}{index}\n".encode())
    finally:
        os.close(fd)


def read_log(log: str | os.PathLike[str], tag: str = "") -> list[int]:
    """The chunk indices recorded in ``log`` with ``tag``, in the order they were written."""
    try:
        with open(log) as f:
            lines = f.read().split()
    except FileNotFoundError:
        return []
    pattern = re.compile(rf"^{re.escape(tag)}(\d+)$")
    return [int(m.group(1)) for m in map(pattern.match, lines) if m]


def first_time(marker: str) -> bool:
    """True for the first caller across all processes (the marker file doesn't exist yet)."""
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    return True


def _hits(chunk: Any, victim: int | None) -> bool:
    return victim is None or chunk.index == victim


# -- kernels -----------------------------------------------------------------------------------


def counting(out: np.ndarray, chunk: Any, log: str | None = None, delay: float = 0.0) -> None:
    """Fill the chunk; log ``start<i>`` before and ``<i>`` after, optionally slowly."""
    record(log, chunk.index, "start")
    if delay:
        time.sleep(delay)
    fill(out, chunk)
    record(log, chunk.index)


def sigkill_once(
    out: np.ndarray,
    chunk: Any,
    marker: str,
    victim: int | None = 0,
    log: str | None = None,
    delay: float = 0.0,
) -> None:
    """SIGKILL the worker on the first attempt at chunk ``victim``; fill otherwise."""
    record(log, chunk.index, "start")
    if delay:
        time.sleep(delay)
    if _hits(chunk, victim) and first_time(marker):
        os.kill(os.getpid(), signal.SIGKILL)
    fill(out, chunk)
    record(log, chunk.index)


def sigkill_always(
    out: np.ndarray, chunk: Any, victim: int | None = 0, log: str | None = None
) -> None:
    """SIGKILL the worker every time it runs chunk ``victim`` (an out-of-memory kill)."""
    record(log, chunk.index, "start")
    if _hits(chunk, victim):
        os.kill(os.getpid(), signal.SIGKILL)
    fill(out, chunk)
    record(log, chunk.index)


def segfault(out: np.ndarray, chunk: Any, victim: int | None = 0) -> None:
    """Read address 0 from native code on chunk ``victim``: a real SIGSEGV."""
    if _hits(chunk, victim):
        faulthandler.disable()  # the crash is the point: no traceback dump in the test log
        ctypes.string_at(0)
    fill(out, chunk)


def exit_now(out: np.ndarray, chunk: Any, victim: int | None = 0, code: int = 3) -> None:
    """``os._exit(code)`` on chunk ``victim``: the worker vanishes without a traceback."""
    if _hits(chunk, victim):
        os._exit(code)
    fill(out, chunk)


def exits(out: np.ndarray, chunk: Any, victim: int | None = 0) -> None:
    """``sys.exit(1)`` on chunk ``victim``: a SystemExit raised by the kernel."""
    if _hits(chunk, victim):
        sys.exit(1)
    fill(out, chunk)


class InjectedError(ValueError):
    """The exception :func:`raise_on` raises (a ValueError, to check the type survives)."""


def raise_on(
    out: np.ndarray, chunk: Any, victim: int | None = 0, log: str | None = None, delay: float = 0.0
) -> None:
    """Raise :class:`InjectedError` on chunk ``victim``; fill (slowly) otherwise."""
    record(log, chunk.index, "start")
    if _hits(chunk, victim):
        raise InjectedError(f"injected failure in chunk {chunk.index}")
    if delay:
        time.sleep(delay)
    fill(out, chunk)
    record(log, chunk.index)


def hang(
    out: np.ndarray,
    chunk: Any,
    victim: int | None = 0,
    log: str | None = None,
    seconds: float = HANG_SECONDS,
) -> None:
    """Sleep far too long on chunk ``victim`` (a deadlock in the kernel); fill otherwise."""
    record(log, chunk.index, "start")
    if _hits(chunk, victim):
        time.sleep(seconds)
    fill(out, chunk)
    record(log, chunk.index)


def raise_while_another_hangs(out: np.ndarray, chunk: Any, pidfile: str) -> None:
    """Chunk 0 hangs (after writing its worker's pid to ``pidfile``); chunk 1 raises
    :class:`InjectedError` once chunk 0 is hanging; the others fill."""
    if chunk.index == 0:
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pidfile + ".tmp", pidfile)
        time.sleep(HANG_SECONDS)
    elif chunk.index == 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.01)
        raise InjectedError("injected failure in chunk 1")
    fill(out, chunk)


def returns_unpicklable(out: np.ndarray, chunk: Any, victim: int | None = 0) -> Any:
    """Fill the chunk, then return a lock (which no pickler can send) from chunk ``victim``."""
    fill(out, chunk)
    return threading.Lock() if _hits(chunk, victim) else None


def takes_arg(out: np.ndarray, chunk: Any, arg: Any) -> None:
    """Fill the chunk; ``arg`` only has to arrive."""
    fill(out, chunk)


class Unpicklable:
    """An argument that can't be pickled at all (it holds a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


def _refuse_to_load(why: str) -> Any:
    raise RuntimeError(why)


class FailsToUnpickle:
    """An argument that pickles fine in the parent but raises when a worker unpickles it
    (as a class from a module missing on the worker would)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, ("this argument cannot be rebuilt in a worker",))


def fill_disk_once(
    out: np.ndarray,
    chunk: Any,
    filler: str,
    marker: str,
    log: str | None = None,
    delay: float = 0.0,
) -> None:
    """On the first chunk to run, take every free byte of the filesystem holding ``filler``
    (another program filling the disk mid-job); fill the chunk either way."""
    record(log, chunk.index, "start")
    if first_time(marker):
        fill_filesystem(filler)
    if delay:
        time.sleep(delay)
    fill(out, chunk)
    record(log, chunk.index)


def fill_filesystem(path: str) -> int:
    """Write ``path`` until the filesystem is full; return the bytes written."""
    written = 0
    block = b"\xff" * 65536
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                n = os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
            written += n
            if n < len(block):
                block = block[: len(block) - n] or b"\xff"
    finally:
        os.close(fd)
    # Fill the last partial block too, one byte at a time (tmpfs counts whole pages).
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for _ in range(8192):
            try:
                written += os.write(fd, b"\xff")
            except OSError:
                break
    finally:
        os.close(fd)
    return written
