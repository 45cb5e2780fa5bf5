"""A pool's workspace: which directory a job's temporary files go to, and the pool's private
directory in each.

Temporary outputs and dumped inputs go to ``temp_dir=`` (or ``$MEMMAP_POOL_TEMP_DIR``), else
/dev/shm when it has room, else the system temp dir; for workers on other hosts, always to
``shared_dir``. In each such base directory the pool makes one private directory (see
:func:`._storage.make_private_dir`) the first time it needs it, after removing the leftovers of
pools whose owner died, and removes it when the pool closes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from ._privatedir import PrivateDir, remove_leftovers
from ._storage import TEMP_DIR_ENV, choose_base_dir


def check_temp_dir(temp_dir: str | os.PathLike[str] | None) -> str | None:
    """``temp_dir=`` as a path, or ``$MEMMAP_POOL_TEMP_DIR`` when not given.

    Raises:
        ValueError: the directory (or the one the variable names) does not exist.
    """
    if temp_dir is not None:
        path = os.fspath(temp_dir)
        if not os.path.isdir(path):
            msg = f"temp_dir {path!r} is not a directory"
            raise ValueError(msg)
        return path
    env = os.environ.get(TEMP_DIR_ENV)
    if env:
        if not os.path.isdir(env):
            msg = (
                f"{TEMP_DIR_ENV}={env!r} is not a directory; create it, or unset the variable "
                "to let the pool choose"
            )
            raise ValueError(msg)
        return env
    return None


class OwnerOnly:
    """Wraps a finalizer callback so that it acts only in the process that created it.

    A process forked from one that holds a pool or a result inherits their finalizers, and
    runs them when it exits through ``sys.exit``: without this, a child would remove its
    parent's files and stop its parent's jobs.
    """

    def __init__(self, fn: Callable[..., object]) -> None:
        self.fn = fn
        self.pid = os.getpid()

    def __call__(self, *args: Any) -> None:
        if os.getpid() == self.pid:
            self.fn(*args)


class Workspace:
    """The directories of one pool; safe to use from any thread."""

    def __init__(self, temp_dir: str | None, shared_dir: str | None) -> None:
        self._temp_dir = temp_dir
        self._shared_dir = shared_dir
        self._lock = threading.Lock()
        self._dirs: dict[str, PrivateDir] = {}  # base dir -> this pool's private dir in it
        self._closed = False

    def base_for(self, nbytes: int) -> str:
        """The base directory for ``nbytes`` of temporary files."""
        if self._shared_dir is not None:
            return self._shared_dir
        return choose_base_dir(self._temp_dir, nbytes)

    def private_dir(self, base: str) -> PrivateDir:
        """The pool's private directory in ``base``, made on first use and checked (see
        :meth:`PrivateDir.verify`) at every use after that.

        Raises:
            RuntimeError: the pool is closed (a submission racing ``shutdown()`` must not
                re-create what it just removed).
            PrivateDirError: the directory was tampered with.
        """
        with self._lock:
            if self._closed:
                msg = "cannot schedule new work after shutdown"
                raise RuntimeError(msg)
            pdir = self._dirs.get(base)
            if pdir is None:
                remove_leftovers(base)
                pdir = PrivateDir(base)
                self._dirs[base] = pdir
            pdir.verify()
            return pdir

    def close(self) -> None:
        """Remove every private directory. Mapped files in them stay readable until their
        last mapping goes (the memory of an unlinked /dev/shm file goes with it)."""
        with self._lock:
            self._closed = True
            dirs, self._dirs = list(self._dirs.values()), {}
        for pdir in dirs:
            pdir.remove()
