"""The pool's private directories, and the removal of those a dead pool left behind.

A pool keeps its files (temporary outputs, dumped inputs, status and spec files) in
``<base>/memmap-pool-<pid>-<random>``, one per base directory it uses. The base may be shared
with other users (/tmp, /dev/shm, a project directory), so the pool trusts nothing found
there by name:

- it creates the directory itself (``mkdir``, mode 0700; never reused because one of that name
  exists), and a marker file inside it with ``O_EXCL``;
- before every use it checks that the path is still that directory: not a symlink, owned by
  this user, mode 0700, the same inode (:meth:`PrivateDir.verify`); files are created relative
  to a descriptor of the directory it holds;
- for its whole life it holds an exclusive ``flock`` on the marker. Another pool removes a
  directory only when it can take that lock, which a live owner holds even in another pid
  namespace (containers sharing /dev/shm), and only when the marker is one: a directory that
  another user renamed into a pool's name, or any directory without the marker, is left alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import shutil
import stat

from .errors import PrivateDirError

log = logging.getLogger("memmap_pool")

DIR_PREFIX = "memmap-pool-"
_DIR_RE = re.compile(r"^memmap-pool-(\d+)-[0-9a-f]+$")

MARKER = ".memmap-pool"
"""The file inside each private dir whose flock says its owner is alive."""

DIR_MODE = 0o700

_held: set[int] = set()  # marker descriptors this process holds


def _close_in_child() -> None:
    """A forked child must not keep its parent's directories "alive" after the parent dies."""
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class PrivateDir:
    """One private directory of a pool; see the module docstring."""

    def __init__(self, base: str) -> None:
        os.makedirs(base, exist_ok=True)
        self.path = os.path.join(base, f"{DIR_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(self.path, DIR_MODE)  # fails if anything has that name: never reused
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchmod(self.fd, DIR_MODE)  # whatever the umask
            st = os.fstat(self.fd)
            self._identity = (st.st_dev, st.st_ino)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            self._marker = os.open(MARKER, flags, 0o600, dir_fd=self.fd)
            fcntl.flock(self._marker, fcntl.LOCK_EX)
            _held.add(self._marker)
        except BaseException:
            os.close(self.fd)
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def verify(self) -> str:
        """The directory's path, once checked to still be the directory this pool made.

        Raises:
            PrivateDirError: it was removed, replaced, turned into a symlink, or its owner or
                mode changed.
        """
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            raise PrivateDirError(self._message("it was removed"), self.path) from None
        problem = None
        if stat.S_ISLNK(st.st_mode):
            problem = "it was replaced by a symbolic link"
        elif not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) != self._identity:
            problem = "another file or directory now has its name"
        elif st.st_uid != os.getuid():
            problem = f"it is owned by uid {st.st_uid}"
        elif stat.S_IMODE(st.st_mode) != DIR_MODE:
            problem = f"its mode is {stat.S_IMODE(st.st_mode):o}, not {DIR_MODE:o}"
        if problem is not None:
            raise PrivateDirError(self._message(problem), self.path)
        return self.path

    def _message(self, problem: str) -> str:
        return (
            f"refusing to use the pool's private directory {self.path}: {problem} since the "
            "pool made it; another user may have tampered with it. Put the pool's files in a "
            "directory only you can write (temp_dir= or MEMMAP_POOL_TEMP_DIR)"
        )

    def create(self, name: str, flags: int = os.O_RDWR) -> int:
        """A new file ``name`` in the directory, 0600, through the held descriptor: never an
        existing file, never through a symlink. Returns its descriptor."""
        self.verify()
        return os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=self.fd)

    def remove(self) -> None:
        """Remove the directory and all in it, then let go of it."""
        base, name = os.path.split(self.path)
        try:
            self.verify()
        except PrivateDirError:
            log.warning("not removing %s: it is no longer the pool's directory", self.path)
        else:
            try:
                base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                base_fd = None
            if base_fd is not None:
                try:
                    # Relative to the base's descriptor: safe against symlinks planted inside.
                    shutil.rmtree(name, dir_fd=base_fd, ignore_errors=True)
                finally:
                    os.close(base_fd)
        _held.discard(self._marker)
        for fd in (self._marker, self.fd):
            try:
                os.close(fd)
            except OSError:
                pass


def remove_leftovers(base: str) -> list[str]:
    """Remove the private dirs in ``base`` whose owner is gone; return their paths.

    A directory is removed only when it is one of ours (named so, a real directory owned by
    this user with mode 0700, holding a marker file owned by this user) and its marker's lock
    can be taken: its owner, wherever it runs, no longer holds it.
    """
    removed: list[str] = []
    try:
        base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return removed
    try:
        for name in os.listdir(base_fd):
            if _DIR_RE.match(name) and _is_dead_pool_dir(base_fd, name):
                shutil.rmtree(name, dir_fd=base_fd, ignore_errors=True)
                path = os.path.join(base, name)
                try:
                    os.lstat(name, dir_fd=base_fd)
                except FileNotFoundError:
                    removed.append(path)
                    log.info("removed the files a dead pool left in %s", path)
    finally:
        os.close(base_fd)
    return removed


def _is_dead_pool_dir(base_fd: int, name: str) -> bool:
    uid = os.getuid()
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=base_fd)
    except OSError:
        return False  # not a directory, a symlink, or not ours to open
    try:
        st = os.fstat(fd)
        if st.st_uid != uid or stat.S_IMODE(st.st_mode) != DIR_MODE:
            return False
        try:
            marker = os.open(MARKER, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError:
            return False  # no marker: not a pool's directory, whatever its name
        try:
            mst = os.fstat(marker)
            if not stat.S_ISREG(mst.st_mode) or mst.st_uid != uid:
                return False
            try:
                fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its owner is alive
            return True
        finally:
            os.close(marker)
    finally:
        os.close(fd)
