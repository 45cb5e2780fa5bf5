"""Fault-injection helpers for the fault-tolerance tests: kernels that kill, crash, hang or
raise in their worker, values and arguments that can't cross between processes, a
counting log that tells which chunks ran, initializers that fail, and a way to run Python in
a process (and session) of its own that is killed as a whole afterwards.

Every kernel fills its chunk with :func:`expected` values when it does not fail (except the
few that say otherwise: values that tell jobs apart, in-place updates), so a test
compares a result with ``expected(shape)``. A kernel that should fail only once keeps a
marker file (created atomically with ``O_EXCL``) so that the retry finds it and succeeds.

The module is sent to the workers by value (cloudpickle), so these kernels work under every
start method without the tests directory on the workers' ``sys.path``. Initializers are not
(the executor pickles them by reference): a pool using one needs this directory on the
workers' path, as :func:`script_env` gives.
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import json
import os
import re
import signal
import subprocess
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


# -- faults at worker start-up -----------------------------------------------------------------


def initializer_raises() -> None:
    """A pool ``initializer`` that raises in every worker (a missing resource, say)."""
    raise InjectedError("injected failure in the initializer")


def initializer_exits(code: int = 3) -> None:
    """A pool ``initializer`` that ends every worker with ``os._exit(code)``."""
    os._exit(code)


# -- more kernels ------------------------------------------------------------------------------


def exit_once(
    out: np.ndarray, chunk: Any, marker: str, victim: int | None = 0, code: int = 3
) -> None:
    """``os._exit(code)`` on the first attempt at chunk ``victim``; fill otherwise."""
    if _hits(chunk, victim) and first_time(marker):
        os._exit(code)
    fill(out, chunk)


class UnprintableError(Exception):
    """An exception whose ``__str__`` itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be turned into text")


def raise_unprintable(out: np.ndarray, chunk: Any, victim: int | None = 0) -> None:
    """Raise :class:`UnprintableError` on chunk ``victim``; fill otherwise."""
    if _hits(chunk, victim):
        raise UnprintableError
    fill(out, chunk)


def returns_unloadable(out: np.ndarray, chunk: Any, victim: int | None = 0) -> Any:
    """Fill the chunk, then return from chunk ``victim`` a value that pickles in the worker
    but raises when the parent unpickles it."""
    fill(out, chunk)
    return FailsToUnpickle() if _hits(chunk, victim) else None


def named_unlike_out(dst: np.ndarray, where: Any, out: int = 0) -> None:
    """A kernel whose first two parameters are not called ``out`` and ``chunk``, and which
    takes a keyword argument named ``out``: its chunk of :func:`expected` plus ``out``."""
    fill(dst, where)
    dst += out


def row_index(out: np.ndarray, chunk: Any, fail_on: int | None = None) -> None:
    """Set every element of the chunk to ``chunk.index`` (its row, with ``chunks=1``), or
    raise :class:`InjectedError` on chunk ``fail_on``. Only the leading axis matters, so
    the values are the same whether a subarray dtype's axes are the chunk's or its
    elements'."""
    if chunk.index == fail_on:
        raise InjectedError(f"injected failure in chunk {chunk.index}")
    out[...] = chunk.index


def fill_value(out: np.ndarray, chunk: Any, value: int, delay: float = 0.0) -> None:
    """Sleep ``delay``, then set the chunk to ``value``: a job whose values say which job
    wrote them."""
    if delay:
        time.sleep(delay)
    out[...] = value


def increment(out: np.ndarray, chunk: Any, delay: float = 0.0) -> None:
    """``out += 1``, with its read and its write ``delay`` seconds apart (a kernel that
    computes for a while between reading its chunk and writing it back)."""
    current = np.array(out)
    if delay:
        time.sleep(delay)
    out[...] = current + 1


def hold_gil(out: np.ndarray, chunk: Any, pidfile: str, seconds: int = 30) -> None:
    """Write the worker's pid to ``pidfile``, then block ``seconds`` in C without releasing
    the GIL (a long native call that doesn't release it): no other thread of the worker runs
    meanwhile."""
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pidfile + ".tmp", pidfile)
    # PyDLL keeps the GIL held during the call; libc's sleep() blocks in the kernel.
    ctypes.PyDLL(None).sleep(seconds)
    fill(out, chunk)


# -- Python in a process of its own ------------------------------------------------------------

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def script_env(temp_dir: str) -> dict[str, str]:
    """The environment of a process started by :func:`start_python`: it imports ``faults``
    and the library as the tests do (whatever its working directory), and its pools put
    their files in ``temp_dir`` (a killed process's files then stay out of the machine's
    shared temp dirs)."""
    env = dict(os.environ)
    paths = [TESTS_DIR, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in paths)
    env["MEMMAP_POOL_TEMP_DIR"] = temp_dir
    env.pop("PYTHONWARNINGS", None)
    return env


class Finished:
    """How a process started by :func:`start_python` ended."""

    def __init__(self, returncode: int | None, stdout: str, stderr: str, hung: bool) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.hung = hung

    @property
    def tracebacks(self) -> int:
        return self.stderr.count("Traceback (most recent call last)")

    def reports(self) -> list[Any]:
        """The JSON values it printed, one per line starting with ``REPORT ``."""
        prefix = "REPORT "
        return [
            json.loads(line[len(prefix) :])
            for line in self.stdout.splitlines()
            if line.startswith(prefix)
        ]

    def __repr__(self) -> str:
        how = "hung" if self.hung else f"exited {self.returncode}"
        return (
            f"<python {how}; {self.tracebacks} tracebacks; stdout {self.stdout[-600:]!r}; "
            f"stderr tail {self.stderr[-600:]!r}>"
        )


def session_processes(sid: int, helpers: bool = True) -> list[int]:
    """Live processes of session ``sid`` (a process started by :func:`start_python` and what
    it started, orphaned or not); without multiprocessing's resource trackers unless
    ``helpers``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["status", "cmdline"]):
        try:
            if os.getsid(proc.pid) != sid or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except (ProcessLookupError, PermissionError):
            continue
        if helpers or "multiprocessing.resource_tracker" not in " ".join(
            proc.info["cmdline"] or ()
        ):
            found.append(proc.pid)
    return found


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_session(sid: int, bound: float = 30.0) -> None:
    """SIGKILL every process of session ``sid`` and wait until they are gone.

    A resource tracker goes last, and is first given some seconds to exit on its own: once
    the processes it served are gone it removes the named semaphores they left in /dev/shm.
    """
    deadline = time.monotonic() + bound
    while (left := session_processes(sid, helpers=False)) and time.monotonic() < deadline:
        _kill_all(left)
        time.sleep(0.02)
    wait_session(sid, 15.0)
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        _kill_all(left)
        time.sleep(0.02)


def wait_session(sid: int, bound: float) -> bool:
    """Wait up to ``bound`` seconds for session ``sid`` to have no live process; say whether
    it got there."""
    deadline = time.monotonic() + bound
    while session_processes(sid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def start_python(args: Any, *, env: dict[str, str], **popen: Any) -> subprocess.Popen[str]:
    """Start ``python *args`` in a session of its own, with pipes for its output."""
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        **popen,
    )


def finish_python(proc: subprocess.Popen[str], timeout: float) -> Finished:
    """Wait up to ``timeout`` seconds for a process from :func:`start_python`, then kill its
    whole session either way (its workers may outlive it), so nothing of it stays."""
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            kill_session(proc.pid)
            out, err = proc.communicate()
    finally:
        # What it started gets a few seconds to exit on its own (orphaned workers do, and
        # then the resource tracker cleans up after them) before it is killed.
        wait_session(proc.pid, 5.0)
        kill_session(proc.pid)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Finished(None if hung else proc.returncode, out, err, hung)


def run_python(args: Any, *, env: dict[str, str], timeout: float, **popen: Any) -> Finished:
    """Run ``python *args`` in a session of its own, for at most ``timeout`` seconds."""
    return finish_python(start_python(args, env=env, **popen), timeout)
