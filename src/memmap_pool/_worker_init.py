"""Worker start-up: what each worker process of the pool's own backend runs first.

- Ctrl-C is the parent's to handle: workers ignore SIGINT, and die of SIGTERM plainly.
- A watchdog thread ends the worker when the pool's process is gone (a parent killed with
  SIGKILL cannot stop its workers), and unmaps the files of jobs that ended while idle.
- BLAS/OpenMP thread pools are capped so that workers x threads <= cores (see :mod:`._blas`).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import sys
import threading
import time
from typing import Any

from ._blas import limit_threads, thread_count
from ._storage import pid_alive, proc_state
from ._worker import release_ended_jobs

WATCHDOG_INTERVAL = 0.25
"""How often a worker checks that the process that owns the pool is still alive. A parent
killed with SIGKILL cannot stop its workers, so they stop themselves within this delay."""

ORPHAN_EXIT_CODE = 70
"""Exit status of a worker that found its pool's process gone (EX_SOFTWARE)."""


def _watch_owner(owner_pid: int, parent_pid: int) -> None:
    info = proc_state(owner_pid)
    started = info[1] if info is not None and info[1] else None
    while True:
        time.sleep(WATCHDOG_INTERVAL)
        if os.getppid() != parent_pid or not pid_alive(owner_pid, started):
            break
        release_ended_jobs()
    # The owner is gone: nobody will collect our results. Exit at once, without cleanup
    # that could block on locks held by the thread running a kernel.
    os._exit(ORPHAN_EXIT_CODE)


def init_worker(
    owner_pid: int,
    threads: int | None,
    user_initializer: Any,
    user_initargs: tuple[Any, ...],
    started: Any = None,
    startup_error: Any = None,
    starter_stays: Any = None,
) -> None:
    """Initializer of every worker process of a local pool.

    ``started`` (a shared int) counts the workers that finished their start-up and
    ``startup_error`` (a shared byte array) receives the first error of a user initializer:
    from them the pool tells workers that die while starting from workers that die later.
    ``starter_stays`` says whether the thread that started this worker outlives it.
    """
    # Ctrl-C goes to the whole process group; the parent decides what stops, so workers
    # must not die half-way through a chunk on their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the parent's Python SIGTERM handler (map_chunks installs one
    # while it waits); a worker must die of SIGTERM plainly, so that its exit code says so.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _let_the_forkserver_go()
    if starter_stays is None or starter_stays.value or os.getppid() != owner_pid:
        # Started by a thread that outlives this worker, or by a forkserver.
        _die_with_parent()
    # A process that loaded OpenBLAS itself (spawn, forkserver) has its pool's threads
    # running already, and limiting them is free; in a forked copy the pool is stopped
    # until first used, and limiting it would start it: wait for a kernel to start it.
    pools_running = (thread_count() or 0) > 1
    threading.Thread(
        target=_watch_owner,
        args=(owner_pid, os.getppid()),
        name="memmap-pool-watchdog",
        daemon=True,
    ).start()
    if user_initializer is not None:
        try:
            user_initializer(*user_initargs)
        except BaseException as exc:
            if startup_error is not None:
                _record_startup_error(startup_error, exc)
            raise
    if threads is not None:
        # After the user's initializer: threads it started are part of the baseline.
        limit_threads(threads, now=pools_running)
    if started is not None:
        started.value += 1


def _let_the_forkserver_go() -> None:
    """Close this worker's copy of the forkserver's "alive" pipe.

    A forkserver runs as long as any process holds the write end of that pipe, and hands
    one to each child it starts, so that a child may start processes of its own through it.
    A worker started by a forkserver would then keep the server alive after the pool's
    process died, and, the server being its parent, never get its PR_SET_PDEATHSIG: a
    kernel holding the GIL would keep both running. Without the pipe, a worker that starts
    a forkserver pool of its own starts its own server, as any new process does.
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


PR_SET_PDEATHSIG = 1
"""prctl(2) option: a signal the kernel sends this process when its parent thread ends."""


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this worker when the process that started it dies.

    The watchdog thread does the same from Python, but it needs the GIL: a kernel holding
    it in C for minutes would keep an orphaned worker alive that long. Linux only; where
    the call is not available the watchdog alone remains.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(ORPHAN_EXIT_CODE)


def _record_startup_error(shared: Any, exc: BaseException) -> None:
    text = f"{type(exc).__name__}: {exc}".encode(errors="replace")[: len(shared) - 1]
    if not shared.value:
        shared.value = text


def probe_dir(path: str) -> tuple[str, str | None]:
    """Check from a worker that ``path`` can be written; returns (host:pid, error or None)."""
    import socket

    who = f"{socket.gethostname()}:{os.getpid()}"
    # An unpredictable name, created with O_EXCL: never a file another user planted there.
    name = f".memmap-pool-probe-{who.replace(':', '-')}-{secrets.token_hex(8)}"
    probe = os.path.join(path, name)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return who, f"{type(exc).__name__}: {exc}"
    return who, None
