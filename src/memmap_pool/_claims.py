"""Claims on outputs: one job at a time writes a given file.

Two jobs writing one ``.npy`` path would each return the other's half-written array; two
jobs updating one memmap in place would lose each other's updates. A job therefore claims
each of its persistent outputs for its whole lifetime, before it creates or changes
anything:

- in this process, by the output's real path in a set shared by every pool;
- across processes, by an exclusive ``flock`` on the file, held through a descriptor the
  claim keeps open. A ``.npy`` that the job creates anew is locked as soon as it exists
  (and the file it replaces before that), and the job's result is mapped through that same
  descriptor, so the result is the file the job wrote even if another program later puts
  another file at the path.

A second job is refused at once with :class:`OutputBusyError`, before any work.
"""

from __future__ import annotations

import fcntl
import os
import threading

from .errors import OutputBusyError

_claimed: set[str] = set()
_claimed_lock = threading.Lock()
_open_claims: set[OutputClaim] = set()  # their descriptors, closed in forked children


def _close_in_child() -> None:
    """In a process forked from a claimer (a worker, a user's fork): drop the inherited
    descriptors, which would otherwise keep the flock held as long as the child lives."""
    for claim in list(_open_claims):
        for fd in claim._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        claim._fds, claim.fd = [], None
    _open_claims.clear()
    _claimed.clear()


os.register_at_fork(after_in_child=_close_in_child)


class OutputClaim:
    """One job's hold on one output path; :meth:`release` when the job ends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._key = os.path.realpath(path)
        self._fds: list[int] = []
        self.fd: int | None = None  # the descriptor of the file the job writes
        with _claimed_lock:
            if self._key in _claimed:
                raise OutputBusyError(_busy_message(path, "in this process"))
            _claimed.add(self._key)

    def lock_existing(self) -> bool:
        """Lock the file now at the path, if any; True if there is one.

        Raises:
            OutputBusyError: a job of another process holds it.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        st = os.fstat(fd)
        for held in self._fds:
            other = os.fstat(held)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                # Already held (a resume keeps the file): a second description of the same
                # file would conflict with our own lock.
                os.close(fd)
                self.fd = held
                return True
        self._fds.append(fd)
        _open_claims.add(self)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusyError(_busy_message(self.path, "in another process")) from None
        self.fd = fd
        return True

    def release(self) -> None:
        """Let other jobs write the output (idempotent)."""
        fds, self._fds, self.fd = self._fds, [], None
        for fd in fds:
            os.close(fd)  # closing the last descriptor releases its flock
        with _claimed_lock:
            _claimed.discard(self._key)
            _open_claims.discard(self)


def _busy_message(path: str, where: str) -> str:
    return (
        f"{path} is the output of another job still running {where}; wait for that job "
        "(job.result()) or write to another file"
    )
