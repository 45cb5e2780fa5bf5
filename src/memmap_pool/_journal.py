"""The resume journal of a persistent ``.npy`` output.

``result.npy.journal`` sits beside the output while a job runs: one page of JSON describing
the plan, then one byte per chunk, set to 1 once that chunk is done. A chunk is recorded
only after its worker has flushed its data to the file, so a journal entry always means
"these bytes are on disk"; losing a journal update only means recomputing a chunk.

Only the parent writes the journal, so it stays correct on shared filesystems where two
hosts writing the same page would overwrite each other.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from ._chunks import MAX_CHUNKS, PAGE_SIZE
from ._storage import fsync_dir, new_temp_file
from .errors import JournalMismatchError

MAGIC = "memmap-pool journal"
VERSION = 1
SUFFIX = ".journal"

log = logging.getLogger("memmap_pool")


def journal_path(output_path: str) -> str:
    return output_path + SUFFIX


class Journal:
    """The done-flags of one job's chunks, persisted beside its output."""

    def __init__(
        self,
        path: str,
        fingerprint: dict[str, Any],
        done: np.ndarray[Any, Any],
        identity: tuple[int, int] | None = None,
        output_inode: int | None = None,
    ):
        self.path = path
        self.output_inode = output_inode  # the output file the journal was written for
        self.fingerprint = fingerprint
        self.done = done
        self._fd: int | None = None
        # (device, inode) of the journal this object wrote or read. Another job given the
        # same output replaces the file; this one must then neither write nor remove it.
        self._identity = identity
        self._stale = False
        self._dirty_lo = len(done)
        self._dirty_hi = 0

    @classmethod
    def create(
        cls, path: str, fingerprint: dict[str, Any], output_inode: int | None = None
    ) -> Journal:
        meta = {"magic": MAGIC, "version": VERSION, "plan": fingerprint, "output": output_inode}
        header = json.dumps(meta).encode()
        if len(header) >= PAGE_SIZE:
            msg = "the job's plan is too large to journal"
            raise ValueError(msg)
        count = int(fingerprint["count"])
        fd, tmp = new_temp_file(path)
        try:
            with open(fd, "wb") as f:
                f.write(header + b" " * (PAGE_SIZE - len(header) - 1) + b"\n")
                # The flags are written out, not left as a hole: their blocks are then taken
                # now, and marking chunks later cannot fail on a full disk.
                f.write(bytes(count))
                f.flush()
                os.fsync(f.fileno())
                identity = _identity(os.fstat(f.fileno()))
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        fsync_dir(path)
        return cls(path, fingerprint, np.zeros(count, dtype=np.uint8), identity, output_inode)

    @classmethod
    def load(cls, path: str) -> Journal:
        with open(path, "rb") as f:
            head = f.read(PAGE_SIZE)
            try:
                meta = json.loads(head.decode())
            except ValueError:
                msg = f"{path} is not a memmap-pool journal (unreadable header)"
                raise JournalMismatchError(msg) from None
            if (
                not isinstance(meta, dict)
                or meta.get("magic") != MAGIC
                or meta.get("version") != VERSION
            ):
                msg = f"{path} is not a memmap-pool journal of version {VERSION}"
                raise JournalMismatchError(msg)
            plan = meta.get("plan")
            count = _check_plan(path, plan)
            assert isinstance(plan, dict)
            identity = _identity(os.fstat(f.fileno()))
            flags = np.frombuffer(f.read(count), dtype=np.uint8)
        done = np.zeros(count, dtype=np.uint8)
        done[: len(flags)] = flags != 0  # a torn tail reads as "not done"
        return cls(path, plan, done, identity, meta.get("output"))

    def check_matches(self, fingerprint: dict[str, Any]) -> None:
        if self.fingerprint != fingerprint:
            diffs = [
                f"{key} {self.fingerprint.get(key)!r} -> {fingerprint.get(key)!r}"
                for key in sorted(set(fingerprint) | set(self.fingerprint))
                if self.fingerprint.get(key) != fingerprint.get(key)
            ]
            msg = (
                f"cannot resume: the journal {self.path} was written for a different plan "
                f"({'; '.join(diffs)}); rerun with the original shape, dtype, order and "
                "chunks, or pass resume=False to start afresh"
            )
            raise JournalMismatchError(msg)

    @property
    def done_count(self) -> int:
        return int(np.count_nonzero(self.done))

    def mark(self, indices: np.ndarray[Any, Any] | list[int]) -> None:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            return
        self.done[idx] = 1
        self._dirty_lo = min(self._dirty_lo, int(idx.min()))
        self._dirty_hi = max(self._dirty_hi, int(idx.max()) + 1)

    def sync(self) -> None:
        """Write the flags marked since the last sync and make them durable."""
        if self._dirty_hi <= self._dirty_lo or self._stale:
            return
        if self._fd is None:
            try:
                fd = os.open(self.path, os.O_WRONLY)
            except FileNotFoundError:
                fd = -1
            if fd < 0 or not self._is_ours(os.fstat(fd)):
                if fd >= 0:
                    os.close(fd)
                self._stale = True
                log.warning(
                    "the journal %s was removed or replaced by another job; this "
                    "job's progress is no longer recorded in it",
                    self.path,
                )
                return
            self._fd = fd
        lo, hi = self._dirty_lo, self._dirty_hi
        os.pwrite(self._fd, self.done[lo:hi].tobytes(), PAGE_SIZE + lo)
        os.fdatasync(self._fd)
        self._dirty_lo, self._dirty_hi = len(self.done), 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        try:
            if self._is_ours(os.stat(self.path)):
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _is_ours(self, st: os.stat_result) -> bool:
        return self._identity is None or _identity(st) == self._identity


def _check_plan(path: str, plan: object) -> int:
    """The chunk count of a journal's recorded plan, once the plan is known to be whole and
    consistent: a damaged journal must not be trusted, nor make the pool allocate absurdly.

    Raises:
        JournalMismatchError: saying what is wrong.
    """

    def bad(what: str) -> JournalMismatchError:
        return JournalMismatchError(
            f"the journal {path} is damaged ({what}); pass resume=False to compute the "
            "output afresh"
        )

    if not isinstance(plan, dict):
        raise bad("it records no plan")
    missing = [k for k in ("shape", "itemsize", "order", "block", "count") if k not in plan]
    if missing:
        raise bad(f"its plan lacks {', '.join(missing)}")
    shape, block, count = plan["shape"], plan["block"], plan["count"]
    if not (
        isinstance(shape, list)
        and isinstance(block, list)
        and len(shape) == len(block)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and all(isinstance(b, int) and b >= 1 for b in block)
    ):
        raise bad(f"shape {shape!r} and block {block!r} do not describe a chunk grid")
    expected = 1
    for n, b in zip(shape, block):
        expected *= -(-n // b)
    if count != expected:
        raise bad(f"it counts {count!r} chunks where its shape and block make {expected}")
    if count > MAX_CHUNKS:
        raise bad(f"{count} chunks is more than a job can have ({MAX_CHUNKS})")
    return int(count)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
