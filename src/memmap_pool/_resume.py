"""Resume: reconciling a persistent ``.npy`` output with its journal.

A ``.npy`` output is created with its journal beside it (see :mod:`._journal` for the
format). ``resume=True`` on an existing output trusts it only when every check passes:

- the file's header is one of ours (padded to whole pages) and describes the job's array;
- the file is not truncated;
- the journal's plan (shape, dtype, order, chunking) is the job's plan;
- the journal was written for this very file (its inode), not one that replaced it.

Then only the chunks the journal lacks are run. An output of ours without a journal is a
job that completed: nothing is run. Any mismatch is a :class:`JournalMismatchError` before
any work, and the existing file is left as it is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._chunks import PAGE_SIZE, ChunkPlan, plan_chunks
from ._journal import Journal, journal_path
from ._npy import read_npy
from ._storage import (
    ArrayRef,
    NpyInfo,
    check_room,
    contiguous_strides,
    create_npy,
)
from .errors import JournalMismatchError

log = logging.getLogger("memmap_pool")

NPY_HEADER_QUANTUM = 4096
"""The .npy files the pool writes have headers padded to a multiple of this (one page on
most machines, :data:`PAGE_SIZE` where pages are larger); numpy's own writer pads to 64
bytes, which is how resume tells our files from others."""


def fingerprint(plan: ChunkPlan, dtype: np.dtype[Any]) -> dict[str, Any]:
    """What a journal records of the job it was written for."""
    fp = plan.fingerprint()
    fp["dtype"] = repr(np.lib.format.dtype_to_descr(dtype))
    return fp


def resumed_plan(plan: ChunkPlan, out: str, dtype: np.dtype[Any]) -> ChunkPlan:
    """The plan of a job resumed with chunks="auto": its journal's, when the journal is for
    the same array, since the plan of an interrupted run is the one its journal counts in."""
    path = os.path.abspath(out)
    if not (os.path.exists(path) and os.path.exists(journal_path(path))):
        return plan
    try:
        recorded = Journal.load(journal_path(path)).fingerprint
        mine = fingerprint(plan, dtype)
        if any(recorded.get(k) != v for k, v in mine.items() if k not in ("block", "count")):
            return plan  # another array: the resume refuses it with the differences
        return plan_chunks(plan.shape, dtype, plan.order, tuple(recorded["block"]), 1)
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
    dtype: np.dtype[Any],
    order: str,
    resume: bool,
    created: list[str],
) -> NpyOutput:
    """Resume ``path`` (see the module docstring) or create it afresh with a journal.

    Files created are appended to ``created`` so the caller can remove them if the job
    cannot start.

    Raises:
        JournalMismatchError: ``resume`` and the file or journal is not for this job.
        NotEnoughSpaceError: no room for a new file.
    """
    nbytes = plan.nbytes
    strides = contiguous_strides(plan.shape, dtype.itemsize, order)
    if resume and os.path.exists(path):
        offset, journal, done = _reconcile(path, plan, dtype, order)
        return NpyOutput(ArrayRef(path, offset, dtype, plan.shape, strides), journal, done)
    directory = os.path.dirname(path) or "."
    # The header, the journal's page and its one byte per chunk besides the data.
    check_room(directory, nbytes + 2 * NPY_HEADER_QUANTUM + plan.count, "output")
    journals: list[Journal] = []

    def write_journal(inode: int) -> None:
        # Before the output takes its name: a journal never lacks for an output of ours.
        jpath = journal_path(path)
        journals.append(Journal.create(jpath, fingerprint(plan, dtype), output_inode=inode))
        created.append(jpath)

    offset = create_npy(path, dtype, plan.shape, order, write_journal)
    created.append(path)
    done = np.zeros(plan.count, dtype=bool)
    return NpyOutput(ArrayRef(path, offset, dtype, plan.shape, strides), journals[0], done)


def _reconcile(
    path: str, plan: ChunkPlan, dtype: np.dtype[Any], order: str
) -> tuple[int, Journal | None, np.ndarray[Any, Any]]:
    try:
        info = read_npy(path, "out")
    except ValueError as exc:
        msg = f"cannot resume: {exc}; pass resume=False to compute it afresh"
        raise JournalMismatchError(msg) from None
    if (info.shape, info.dtype, info.order if len(info.shape) > 1 else order) != (
        plan.shape,
        dtype,
        order,
    ):
        msg = (
            f"cannot resume into {path}: it holds a {info.shape} {info.dtype} "
            f"{info.order}-order array, the job makes {plan.shape} {dtype} "
            f"{order}-order; pass resume=False to replace it"
        )
        raise JournalMismatchError(msg)
    _check_resumable(path, info, plan.nbytes)
    jpath = journal_path(path)
    done = np.zeros(plan.count, dtype=bool)
    if not os.path.exists(jpath):
        log.info("%s is complete (no journal beside it): nothing to run", path)
        done[:] = True
        return info.offset, None, done
    journal = Journal.load(jpath)
    journal.check_matches(fingerprint(plan, dtype))
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
