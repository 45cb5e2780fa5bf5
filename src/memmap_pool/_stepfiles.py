"""The files of an ``iterate`` run, and its steps as the dispatcher drives them (see
:mod:`._steps`)."""

from __future__ import annotations

import math
import os
import secrets
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._chunks import PAGE_SIZE
from ._claims import OutputClaim
from ._halo import HaloRole, fill_border, padded_shape
from ._jobfiles import create_spec_file, create_status_file
from ._protocol import InputBinding, JobSpec, StatusFile, StepSpec
from ._request import InputSpec
from ._resume import Journal, JournalGroup
from ._stepjournal import StepJournal, StepRecord, boot_id, state_fingerprint
from ._steps import JOURNAL_SUFFIX, SIBLING_SUFFIXES, IterateRequest
from ._storage import (
    ArrayRef,
    check_room,
    contiguous_strides,
    create_npy,
    fsync_dir,
    unlink_quietly,
    write_npy,
)
from ._workspace import OwnerOnly, Workspace
from .backends import Capabilities
from .errors import JournalMismatchError


class IterateFiles:
    """The files of one ``iterate`` run (a :class:`._run.RunFiles`)."""

    spec: JobSpec
    spec_path: str
    spec_inode: int
    status: StatusFile | None
    journal: Journal | JournalGroup | None = None  # none: the steps have their own journal
    done: np.ndarray[Any, Any]

    def __init__(self, request: IterateRequest) -> None:
        self.request = request
        self.token = secrets.token_hex(8)
        self.status = None
        self.done = np.zeros(request.plan.count, dtype=bool)
        self.first_step = 1  # the first step this run computes
        self.step_journal: StepJournal | None = None
        self.paths: dict[str, str] = {}  # "a", "b" (the buffers) and "out" -> file
        self.parity: tuple[str, str] = ("a", "b")  # which file is buffers[0] and buffers[1]
        self._created: list[str] = []
        self._job_files: list[str] = []
        self._claim: OutputClaim | None = None
        self.offsets: dict[str, int] = {}
        self.pad: tuple[int, ...] = ()  # elements beyond both ends of each axis, per buffer
        self.source: ArrayRef | None = None  # a resumed run's first step reads this state
        self.source_key = "initial"  # the file that holds step first_step - 1

    @classmethod
    def create(
        cls, request: IterateRequest, workspace: Workspace, capabilities: Capabilities
    ) -> IterateFiles:
        """Create the buffers, the journal, the status and spec files (or resume).

        Raises:
            JournalMismatchError: a resume that doesn't fit the journal or the output.
            NotEnoughSpaceError: no room for the buffers.
            OSError: a file could not be created.
        """
        files = cls(request)
        try:
            files._create(workspace, capabilities)
        except BaseException:
            files._abandon()
            raise
        return files

    def _create(self, workspace: Workspace, capabilities: Capabilities) -> None:
        request = self.request
        plan = request.plan
        local = capabilities.shares_page_cache
        if local:
            self.pad = _state_pad(request)
        stored_shape = self._stored_shape()
        state_bytes = math.prod(stored_shape) * request.dtype.itemsize
        if request.out is None:
            base = workspace.base_for(2 * state_bytes)
            check_room(base, 2 * state_bytes + StatusFile.nbytes(plan.count), "state (2 buffers)")
            pdir = workspace.private_dir(base)
            for key in ("a", "b"):
                name = f"state-{key}-{self.token}.bin"
                path = os.path.join(pdir.path, name)
                fd = pdir.create(name)
                self._created.append(path)
                self._job_files.append(path)
                try:
                    _allocate(fd, state_bytes)
                finally:
                    os.close(fd)
                self.paths[key] = path
                self.offsets[key] = 0
                self._fill_constant_border(key)
            self.parity = ("a", "b") if request.steps % 2 == 0 else ("b", "a")
        else:
            self._open_npy_state()
            small_base = workspace.base_for(0)
            pdir = workspace.private_dir(small_base)
        if not local:
            for holder in request.caller_maps:
                holder.flush()

        status_path = None
        if local:
            status_path, self.status = create_status_file(
                pdir, self.token, plan.count, self._created, self._job_files
            )

        strides = contiguous_strides(stored_shape, request.dtype.itemsize, "C")
        inside = sum(p * stride for p, stride in zip(self.pad, strides))
        first, second = (
            ArrayRef(
                self.paths[key], self.offsets[key] + inside, request.dtype, plan.shape, strides
            )
            for key in self.parity
        )
        buffers = (first, second)
        initial = None
        if self.first_step == 1:
            initial = InputBinding(_input_ref(request.initial, self, pdir), request.initial.role)
        elif self.source is not None:
            # A resume reads the state it starts from through the halo's own windows: a
            # border left by an earlier run is not trusted (its boundary may have differed).
            initial = InputBinding(self.source, request.initial.role)
        bindings = tuple(
            InputBinding(_input_ref(spec, self, pdir, k + 1), spec.role)
            for k, spec in enumerate(request.inputs)
        )
        self.spec = JobSpec(
            token=self.token,
            plan=plan,
            outputs=(),
            order="C",
            inputs=bindings,
            kernel=request.kernel,
            status_path=status_path,
            flush=not local,  # remote workers: each chunk reaches the shared files
            steps=StepSpec(
                buffers,
                initial,
                self.first_step,
                pad=self.pad,
                pad_mode=getattr(request.initial.role, "mode", "none") if self.pad else "none",
            ),
            prev_role=request.initial.role,
        )
        self.spec_path, self.spec_inode = create_spec_file(
            pdir, self.spec, self._created, self._job_files
        )

    def _open_npy_state(self) -> None:
        """The state files of a ``.npy`` out: resumed from the journal, or made afresh.

        The two buffers are siblings of ``out``, ``out.a`` and ``out.b``: ``.npy`` files of
        the state padded as the halo says (see :func:`_state_pad`). ``out`` itself is
        written once, at the end, with the final state; a resume that asks for more steps
        starts from it.
        """
        request = self.request
        out = request.out
        assert out is not None
        jpath = out + JOURNAL_SUFFIX
        self.paths = {"out": out, "a": out + SIBLING_SUFFIXES[0], "b": out + SIBLING_SUFFIXES[1]}
        self._claim = OutputClaim(out)
        self._claim.lock_existing()
        fingerprint = state_fingerprint(request.plan.shape, request.dtype)
        if request.resume and os.path.exists(out) and not os.path.exists(jpath):
            msg = (
                f"cannot resume {out}: it has no step journal beside it, so nothing says "
                "which step it holds (it is not the state of an iterate run, or its journal "
                "was removed); pass resume=False to start afresh"
            )
            raise JournalMismatchError(msg)
        holder = "initial"
        if request.resume and os.path.exists(jpath):
            journal = StepJournal.load(jpath)
            record = journal.record
            if journal.fingerprint != fingerprint:
                msg = (
                    f"cannot resume: the step journal {jpath} is of a state "
                    f"{journal.fingerprint}, this run's is {fingerprint}; pass resume=False "
                    "to start afresh"
                )
                raise JournalMismatchError(msg)
            if record.step > request.steps:
                msg = (
                    f"cannot resume: {out} holds step {record.step} already, more than the "
                    f"steps={request.steps} asked; ask for steps >= {record.step}, or pass "
                    "resume=False to start afresh"
                )
                raise JournalMismatchError(msg)
            if record.boot != boot_id() and not (record.durable and record.checkpoint == 1):
                msg = (
                    f"cannot resume {out}: the machine restarted since step {record.step} was "
                    f"recorded, and with checkpoint={record.checkpoint} that step was not "
                    "made durable before the next one overwrote its buffer; pass "
                    "resume=False (checkpoint=1 makes every step durable)"
                )
                raise JournalMismatchError(msg)
            holder = record.state
            if holder not in ("initial", "out", "a", "b"):
                msg = f"cannot resume: the step journal {jpath} names no state file it knows"
                raise JournalMismatchError(msg)
            if holder != "initial":
                path = self.paths[holder]
                if not os.path.exists(path):
                    msg = f"cannot resume: the state file of step {record.step} is missing"
                    raise JournalMismatchError(msg)
                pad = () if holder == "out" else self.pad  # out holds the state unpadded
                offset, shape = _check_state_file(path, request, pad)
                strides = contiguous_strides(shape, request.dtype.itemsize, "C")
                inside = sum(p * st for p, st in zip(pad, strides))
                self.source = ArrayRef(
                    path, offset + inside, request.dtype, request.plan.shape, strides
                )
                self.offsets[holder] = offset
            self.step_journal = journal
            self.first_step = record.step + 1
        else:
            # The journal first: a run killed at any moment after this resumes from it.
            self.step_journal = StepJournal.create(
                jpath, fingerprint, StepRecord(0, "initial", checkpoint=request.checkpoint or 1)
            )
            self._created.append(jpath)
        self.source_key = holder
        if self.first_step > request.steps:
            # Nothing to compute: the journal's state is the final one.
            self.parity = (holder, holder)
            return
        # Step k writes buffers[k % 2]. A sibling that holds step first_step - 1 is kept (the
        # first step reads it, through self.source) and the other is made afresh; else both.
        written_first, read_first = ("b", "a") if holder == "a" else ("a", "b")
        self._new_state_file(written_first)
        if holder != read_first:
            self._new_state_file(read_first)
        pair = (read_first, written_first)  # (holds first_step - 1, holds first_step)
        self.parity = pair if (self.first_step - 1) % 2 == 0 else (written_first, read_first)
        self._claim.lock_existing()

    def _stored_shape(self) -> tuple[int, ...]:
        shape = self.request.plan.shape
        return padded_shape(shape, self.pad) if self.pad else shape

    def _new_state_file(self, key: str) -> None:
        """A fresh sibling ``.npy`` of the padded state, allocated whole."""
        request = self.request
        path = self.paths[key]
        stored = self._stored_shape()
        nbytes = math.prod(stored) * request.dtype.itemsize
        check_room(os.path.dirname(path), nbytes + PAGE_SIZE, "state")
        offset = create_npy(path, request.dtype, stored, "C")
        self._created.append(path)
        fd = os.open(path, os.O_RDWR)
        try:
            _allocate(fd, offset + nbytes)
        finally:
            os.close(fd)
        self.offsets[key] = offset
        self._fill_constant_border(key)

    def _fill_constant_border(self, key: str) -> None:
        """A constant boundary's border is written once, when a buffer is made."""
        role = self.request.initial.role
        if self.pad and isinstance(role, HaloRole) and role.mode == "constant":
            border = np.memmap(
                self.paths[key],
                dtype=self.request.dtype,
                mode="r+",
                offset=self.offsets[key],
                shape=self._stored_shape(),
            )
            fill_border(border, self.pad, role.fill)
            border.flush()
            del border

    # -- steps -------------------------------------------------------------------------------

    def holder_of(self, step: int) -> str:
        """The file key ("out", "a", "b") that holds step ``step``."""
        if step < self.first_step:
            return self.source_key
        return self.parity[step % 2]

    def make_durable(self, step: int) -> None:
        """fsync the file that holds ``step`` (the parent's page cache is the workers')."""
        _fsync_path(self.paths[self.holder_of(step)])

    # -- the end of the run ------------------------------------------------------------------

    def result(self) -> tuple[Any, ...]:
        request = self.request
        last = request.steps
        key = self.holder_of(last)
        if request.out is not None:
            if key != "out":
                self._finish_npy(key)
            return (_read_only_npy(request.out),)
        shape = request.plan.shape
        path = self.paths[key]
        stored = np.memmap(path, dtype=request.dtype, mode="r", shape=self._stored_shape())
        weakref.finalize(stored, OwnerOnly(unlink_quietly), path)
        if self.pad:
            # The state inside its border: a view, its memmap (the whole file) as its base.
            return (stored[tuple(slice(p, p + n) for p, n in zip(self.pad, shape))],)
        return (stored,)

    def _finish_npy(self, key: str) -> None:
        """Put the final state, in sibling ``key``, in out's place; then say so in the journal
        and remove the siblings. A crash on the way leaves the journal naming the sibling,
        which a resume finishes from."""
        request = self.request
        out = request.out
        assert out is not None
        path = self.paths[key]
        if not self.pad:
            os.replace(path, out)  # an unpadded sibling is a .npy of the state already
        else:
            sibling = np.load(path, mmap_mode="r")
            inside = sibling[tuple(slice(p, p + n) for p, n in zip(self.pad, request.plan.shape))]
            write_npy(out, inside)
            del sibling, inside
        fsync_dir(out)
        if self.step_journal is not None:
            checkpoint = request.checkpoint or 1
            self.step_journal.write(StepRecord(request.steps, "out", checkpoint=checkpoint), True)
        for sibling_key in ("a", "b"):
            unlink_quietly(self.paths[sibling_key])

    def cleanup(self, succeeded: bool) -> None:
        if self.status is not None:
            self.status.close()
            self.status = None
        kept = None
        if succeeded and self.request.out is None:
            kept = self.paths[self.holder_of(self.request.steps)]
        for path in self._job_files:
            if path != kept:
                unlink_quietly(path)  # the result's file goes with the result
        if self.step_journal is not None:
            self.step_journal.close()
        if self._claim is not None:
            self._claim.release()

    def _abandon(self) -> None:
        """A run that could not start: remove what it created."""
        for path in self._created:
            unlink_quietly(path)
        if self.status is not None:
            self.status.close()
        if self.step_journal is not None:
            self.step_journal.close()
        if self._claim is not None:
            self._claim.release()


def _state_pad(request: IterateRequest) -> tuple[int, ...]:
    """How far to pad temporary state buffers: by the halo's depth when the boundary pads.

    A padded buffer holds the state inside a border that the workers keep equal to the
    boundary's values (``np.pad``'s), so every window of the previous state is a view of it,
    as in a hand-written stencil on a padded array: no window is copied, whatever axis the
    chunks split. ``.npy`` outputs keep the state's own layout (a ``.npy`` is the state)."""
    role = request.initial.role
    if not isinstance(role, HaloRole) or role.mode == "none" or not any(role.depth):
        return ()
    return role.depth


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _allocate(fd: int, nbytes: int) -> None:
    """Size the file and allocate its blocks now: the workers never reserve any, and a full
    disk is an error here rather than a SIGBUS in a step."""
    os.ftruncate(fd, nbytes)
    if nbytes and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            if exc.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: the filesystem can't
                raise


def _check_state_file(
    path: str, request: IterateRequest, pad: tuple[int, ...]
) -> tuple[int, tuple[int, ...]]:
    """The data offset and shape of a state file a resume starts from: the state itself, or
    the state padded by ``pad`` (a sibling of this run's halo).

    Raises:
        JournalMismatchError: not a ``.npy``, or not of this run's state.
    """
    from ._npy import read_npy

    try:
        info = read_npy(path, "out")
    except ValueError as exc:
        msg = f"cannot resume: {exc}; pass resume=False to start afresh"
        raise JournalMismatchError(msg) from None
    shape = padded_shape(request.plan.shape, pad) if pad else request.plan.shape
    if (info.shape, info.dtype) != (shape, request.dtype) or info.order != "C":
        msg = (
            f"cannot resume into {path}: it holds a {info.shape} {info.dtype} array, the run "
            f"steps a {shape} {request.dtype} state (its halo's border included); pass "
            "resume=False, or resume with the depth and boundary of the run that wrote it"
        )
        raise JournalMismatchError(msg)
    return info.offset, shape


def _read_only_npy(path: str) -> np.memmap[Any, Any]:
    from ._npy import read_npy

    info = read_npy(path, "out")
    return np.memmap(path, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape)


def _input_ref(spec: InputSpec, files: IterateFiles, pdir: Any, k: int = 0) -> ArrayRef:
    """An input by reference, or written once to the private dir."""
    if spec.ref is not None:
        return spec.ref
    from ._jobfiles import dump_array

    assert spec.array is not None
    name = f"in{k}-{files.token}.bin"
    fd = pdir.create(name, os.O_WRONLY)
    path = os.path.join(pdir.path, name)
    files._created.append(path)
    files._job_files.append(path)
    return dump_array(spec.array, fd, path)


# -- the dispatcher's side ---------------------------------------------------------------------


@dataclass
class StepControl:
    """The steps of a running ``iterate`` (held by its :class:`._run.Run`)."""

    files: IterateFiles
    step: int  # the step being computed
    last: int
    checkpoint: int | None
    completed: list[int] = field(default_factory=list)

    def finish_step(self) -> bool:
        """Step ``step`` is complete: journal it (durably every ``checkpoint`` steps) and move
        to the next; False when it was the last."""
        files = self.files
        journal = files.step_journal
        step = self.step
        if journal is not None:
            durable = self.checkpoint is not None and (
                step % self.checkpoint == 0 or step == self.last
            )
            if durable:
                files.make_durable(step)
            journal.write(
                StepRecord(step, files.holder_of(step), checkpoint=self.checkpoint or 1), durable
            )
        if step >= self.last:
            return False
        if files.status is not None:
            files.status.clear()
        self.step += 1
        return True
