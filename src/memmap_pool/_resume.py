"""Resume: the journal of a persistent ``.npy`` output, and reconciling the output with it.

A ``.npy`` output is created with its journal beside it (its format is below).
``resume=True`` on an existing output trusts it only when every check passes:

- the file's header is one of ours (padded to whole pages) and describes the job's array;
- the file is not truncated;
- the journal's plan (shape, dtype, order, chunking) is the job's plan;
- the journal was written for this very file (its inode), not one that replaced it.

Then only the chunks the journal lacks are run. An output of ours without a journal is a
job that completed: nothing is run. Any mismatch is a :class:`JournalMismatchError` before
any work, and the existing file is left as it is.

The journal, ``result.npy.journal``, sits beside the output while a job runs: one page of JSON
describing the plan, then one byte per chunk, set to 1 once that chunk is done. A chunk is recorded
only after its worker has flushed its data to the file, so a journal entry always means
"these bytes are on disk"; losing a journal update only means recomputing a chunk.

Only the parent writes the journal, so it stays correct on shared filesystems where two
hosts writing the same page would overwrite each other.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._chunks import MAX_CHUNKS, PAGE_SIZE, ChunkPlan, plan_chunks
from ._npy import read_npy
from ._storage import (
    ArrayRef,
    NpyInfo,
    check_room,
    contiguous_strides,
    create_npy,
    fsync_dir,
    new_temp_file,
    unlink_quietly,
)
from .errors import JournalMismatchError

log = logging.getLogger("memmap_pool")

NPY_HEADER_QUANTUM = 4096
"""The .npy files the pool writes have headers padded to a multiple of this (one page on
most machines, :data:`PAGE_SIZE` where pages are larger); numpy's own writer pads to 64
bytes, which is how resume tells our files from others."""


# -- the journal ------------------------------------------------------------------------------

MAGIC = "memmap-pool journal"
VERSION = 1
SUFFIX = ".journal"


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
            unlink_quietly(tmp)
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


class JournalGroup:
    """The journals of a job with several ``.npy`` outputs: one beside each, marked and
    synced together, so each output can tell on its own which chunks it holds."""

    def __init__(self, journals: list[Journal]) -> None:
        self.journals = journals
        self.path = ", ".join(j.path for j in journals)

    def mark(self, indices: np.ndarray[Any, Any] | list[int]) -> None:
        for journal in self.journals:
            journal.mark(indices)

    def sync(self) -> None:
        for journal in self.journals:
            journal.sync()

    def close(self) -> None:
        for journal in self.journals:
            journal.close()

    def remove(self) -> None:
        for journal in self.journals:
            journal.remove()


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


# -- reconciling an output with its journal -----------------------------------------------------


def fingerprint(
    plan: ChunkPlan, dtype: np.dtype[Any], shape: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """What a journal records of the job it was written for (``shape``: the output's, when
    it has trailing axes beyond the chunk grid's)."""
    fp = plan.fingerprint()
    fp["dtype"] = repr(np.lib.format.dtype_to_descr(dtype))
    if shape is not None and shape != plan.shape:
        fp["output_shape"] = list(shape)
    return fp


def resumed_plan(
    plan: ChunkPlan, out: str, dtype: np.dtype[Any], shape: tuple[int, ...] | None = None
) -> ChunkPlan:
    """The plan of a job resumed with chunks="auto": its journal's, when the journal is for
    the same array, since the plan of an interrupted run is the one its journal counts in."""
    path = os.path.abspath(out)
    if not (os.path.exists(path) and os.path.exists(journal_path(path))):
        return plan
    try:
        recorded = Journal.load(journal_path(path)).fingerprint
        mine = fingerprint(plan, dtype, shape)
        if any(recorded.get(k) != v for k, v in mine.items() if k not in ("block", "count")):
            return plan  # another array: the resume refuses it with the differences
        block = tuple(recorded["block"])
        return plan_chunks(plan.shape, dtype, plan.order, block, (plan.itemsize,))
    except (OSError, ValueError, TypeError, KeyError):
        return plan  # a damaged journal: the resume reports it


@dataclass
class NpyOutput:
    """A persistent output ready for the job: its file, journal, and chunks already done."""

    ref: ArrayRef
    journal: Journal | None  # None: the file is complete, nothing to run
    done: np.ndarray[Any, Any]  # bool per chunk


def prepare_npy_output(
    path: str,
    plan: ChunkPlan,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    order: str,
    resume: bool,
    created: list[str],
) -> NpyOutput:
    """Resume ``path`` (see the module docstring) or create it afresh with a journal, for
    an output of ``shape`` (the plan's, or with trailing axes).

    Files created are appended to ``created`` so the caller can remove them if the job
    cannot start.

    Raises:
        JournalMismatchError: ``resume`` and the file or journal is not for this job.
        NotEnoughSpaceError: no room for a new file.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    strides = contiguous_strides(shape, dtype.itemsize, order)
    if resume and os.path.exists(path):
        offset, journal, done = _reconcile(path, plan, shape, dtype, order)
        return NpyOutput(ArrayRef(path, offset, dtype, shape, strides), journal, done)
    directory = os.path.dirname(path) or "."
    # The header, the journal's page and its one byte per chunk besides the data.
    check_room(directory, nbytes + 2 * NPY_HEADER_QUANTUM + plan.count, "output")
    journals: list[Journal] = []

    def write_journal(inode: int) -> None:
        # Before the output takes its name: a journal never lacks for an output of ours.
        jpath = journal_path(path)
        fp = fingerprint(plan, dtype, shape)
        journals.append(Journal.create(jpath, fp, output_inode=inode))
        created.append(jpath)

    offset = create_npy(path, dtype, shape, order, write_journal)
    created.append(path)
    done = np.zeros(plan.count, dtype=bool)
    return NpyOutput(ArrayRef(path, offset, dtype, shape, strides), journals[0], done)


def _reconcile(
    path: str, plan: ChunkPlan, shape: tuple[int, ...], dtype: np.dtype[Any], order: str
) -> tuple[int, Journal | None, np.ndarray[Any, Any]]:
    try:
        info = read_npy(path, "out")
    except ValueError as exc:
        msg = f"cannot resume: {exc}; pass resume=False to compute it afresh"
        raise JournalMismatchError(msg) from None
    if (info.shape, info.dtype, info.order if len(info.shape) > 1 else order) != (
        shape,
        dtype,
        order,
    ):
        msg = (
            f"cannot resume into {path}: it holds a {info.shape} {info.dtype} "
            f"{info.order}-order array, the job makes {shape} {dtype} "
            f"{order}-order; pass resume=False to replace it"
        )
        raise JournalMismatchError(msg)
    _check_resumable(path, info, math.prod(shape) * dtype.itemsize)
    jpath = journal_path(path)
    done = np.zeros(plan.count, dtype=bool)
    if not os.path.exists(jpath):
        log.info("%s is complete (no journal beside it): nothing to run", path)
        done[:] = True
        return info.offset, None, done
    journal = Journal.load(jpath)
    journal.check_matches(fingerprint(plan, dtype, shape))
    if journal.output_inode is not None and journal.output_inode != os.stat(path).st_ino:
        msg = (
            f"cannot resume: {path} was replaced since its journal was written "
            "(another file now has its name), so the chunks the journal lists "
            "are not in it; pass resume=False to compute it afresh"
        )
        raise JournalMismatchError(msg)
    return info.offset, journal, journal.done.astype(bool)


def _check_resumable(path: str, info: NpyInfo, nbytes: int) -> None:
    """Refuse to resume into a file memmap-pool did not write, or one cut short."""
    if info.offset % NPY_HEADER_QUANTUM or info.offset > max(NPY_HEADER_QUANTUM, PAGE_SIZE):
        msg = (
            f"cannot resume into {path}: it was not written by memmap-pool (its header is "
            f"{info.offset} bytes, ours are padded to {NPY_HEADER_QUANTUM}), so nothing says "
            "which of its chunks are done; pass resume=False to compute it afresh"
        )
        raise JournalMismatchError(msg)
    size = os.stat(path).st_size
    if size < info.offset + nbytes:
        msg = (
            f"cannot resume into {path}: it is truncated ({size} bytes, the array needs "
            f"{info.offset + nbytes}); pass resume=False to compute it afresh"
        )
        raise JournalMismatchError(msg)
