"""One job's files: created from a request, turned into the result, removed at the end.

:meth:`JobFiles.create` does, in order, each step before anything the next one writes:

1. check the room for every file the job makes (temporary outputs, dumped inputs, the spec
   and status files), before anything is written;
2. outputs: a temporary file in the pool's private dir, a ``.npy`` with its journal (or the
   one being resumed, see :mod:`._resume`), or the caller's memmap;
3. inputs: files by reference, in-memory arrays written once to the private dir;
4. the status file (workers on this host) and the spec file.

If any step fails, what the earlier ones created is removed. :meth:`JobFiles.result` builds
the arrays the job returns, and :meth:`JobFiles.cleanup` removes the job's files.
"""

from __future__ import annotations

import logging
import os
import secrets
import weakref
from typing import Any

import numpy as np

from . import _memory as memory
from ._chunks import PAGE_SIZE, shares_pages
from ._claims import OutputClaim
from ._privatedir import PrivateDir
from ._protocol import InputBinding, JobSpec, StatusFile, write_spec
from ._request import JobRequest, OutputKind, OutputSpec
from ._resume import Journal, JournalGroup, journal_path, prepare_npy_output
from ._storage import (
    ArrayRef,
    allocated_bytes,
    check_room,
    contiguous_strides,
    fully_allocated,
    memmap_ref,
    unlink_quietly,
)
from ._workspace import OwnerOnly, Workspace
from .backends import Capabilities
from .errors import OutputBusyError

log = logging.getLogger("memmap_pool")

SPEC_OVERHEAD_BYTES = 8192
"""Room the spec file needs beyond the pickled kernel: the plan and file references."""


class JobFiles:
    """The files of one running job; see the module docstring."""

    spec: JobSpec
    spec_path: str
    spec_inode: int
    status: StatusFile | None
    journal: Journal | JournalGroup | None
    done: np.ndarray[Any, Any]  # bool per chunk: the chunks a resume found done

    def __init__(self, request: JobRequest) -> None:
        self.request = request
        self.token = secrets.token_hex(8)
        self._created: list[str] = []  # removed if the job can't start
        self._job_files: list[str] = []  # removed when the job ends, whatever its outcome
        self._refs: list[ArrayRef] = []
        self._claims: list[OutputClaim | None] = []  # per output; None for temporary ones
        self.status = None
        self.journal = None
        # A resume (every output a .npy) narrows this to the chunks every output holds.
        self.done = np.full(request.plan.count, request.resume, dtype=bool)
        self._journals: list[Journal] = []
        self._reserve: list[bool] = []  # per output: whether workers reserve its blocks
        self._in_memory = False  # temporary outputs and in-memory inputs in this process
        self._memory_keys: list[str] = []  # their keys for the worker threads
        self._memory_outputs: dict[int, np.ndarray[Any, Any]] = {}  # output index -> array

    @classmethod
    def create(
        cls, request: JobRequest, workspace: Workspace, capabilities: Capabilities
    ) -> JobFiles:
        """Create the job's files (see the module docstring).

        Raises:
            NotEnoughSpaceError: not enough room for them.
            JournalMismatchError: a resume that doesn't fit the existing output.
            OSError: a file could not be created.
            RuntimeError: the pool was shut down meanwhile.
        """
        files = cls(request)
        try:
            files._create(workspace, capabilities)
        except BaseException:
            files._remove(files._created)
            if files.status is not None:
                files.status.close()
            files._release_claims()
            for key in files._memory_keys:
                memory.release(key)
            raise
        return files

    def _create(self, workspace: Workspace, capabilities: Capabilities) -> None:
        request, plan = self.request, self.request.plan
        self._in_memory = capabilities.same_process
        # Worker threads of this process write temporary outputs in its memory, and read
        # in-memory inputs as they are: no file for either.
        temporary = [
            o for o in request.outputs if o.kind is OutputKind.TEMPORARY and not self._in_memory
        ]
        dumped = [i.array for i in request.inputs if i.array is not None and not self._in_memory]
        temp_bytes = sum(o.nbytes for o in temporary) + sum(int(a.nbytes) for a in dumped)
        local = capabilities.shares_page_cache
        small_bytes = StatusFile.nbytes(plan.count) if local else 0
        small_bytes += len(request.kernel) + SPEC_OVERHEAD_BYTES

        # 1. The persistent outputs are this job's alone, and there is room, before anything
        # is written.
        self._claim_outputs()
        base = workspace.base_for(temp_bytes)
        if temp_bytes:
            check_room(base, temp_bytes, _what_needs_room(bool(temporary), bool(dumped)))
        # The status and spec files are small, but must fit: a full /dev/shm sends them to
        # the system temp dir like any other file.
        small_base = base if not local else workspace.base_for(small_bytes)
        needed_here = small_bytes + (temp_bytes if small_base == base else 0)
        check_room(small_base, needed_here, "job's files")

        # 2. Outputs.
        for k, output in enumerate(request.outputs):
            ref = self._create_output(k, output, workspace, base)
            own_plan = plan.for_output(output.shape, output.dtype.itemsize, output.order)
            if not local and shares_pages(own_plan, ref.offset):
                log.warning(
                    "job %s: chunks share memory pages of %s (chunks=%s, data at byte %d): "
                    "workers on different hosts would overwrite each other's bytes; use "
                    "chunks='auto' or blocks whose bytes are multiples of %d (see "
                    "docs/distributed.md)",
                    request.name,
                    ref.path,
                    plan.block,
                    ref.offset,
                    PAGE_SIZE,
                )
            self._refs.append(ref)
            # Workers reserve the blocks of each batch before writing it, unless the file has
            # them all already (an existing output: reserving again would walk its pages,
            # a cost that grows with its size on every job).
            self._reserve.append(
                not memory.is_key(ref.path)
                and (output.kind is OutputKind.TEMPORARY or not fully_allocated(ref.path))
            )
        if len(self._journals) == 1:
            self.journal = self._journals[0]
        elif self._journals:
            self.journal = JournalGroup(self._journals)

        # 3. Inputs: by reference, or dumped once.
        bindings = []
        for k, spec in enumerate(request.inputs):
            input_ref = spec.ref
            if input_ref is None and self._in_memory:
                assert spec.array is not None
                key = memory.register(spec.array)
                self._memory_keys.append(key)
                a = spec.array
                input_ref = ArrayRef(key, 0, a.dtype, tuple(a.shape), tuple(a.strides))
            if input_ref is None:
                assert spec.array is not None
                pdir = workspace.private_dir(base)
                name = f"in{k}-{self.token}.bin"
                fd = pdir.create(name, os.O_WRONLY)
                path = os.path.join(pdir.path, name)
                self._created.append(path)
                self._job_files.append(path)
                input_ref = dump_array(spec.array, fd, path)
            bindings.append(InputBinding(input_ref, spec.role))
        if not local:
            # Workers on other hosts read the files, not this host's page cache: write the
            # caller's changes to them out first (close-to-open consistency on NFS).
            for holder in request.caller_maps:
                holder.flush()

        # 4. Status file (workers on this host) and spec file.
        small_dir = workspace.private_dir(small_base)
        status_path = None
        if local:
            status_path, self.status = create_status_file(
                small_dir, self.token, plan.count, self._created, self._job_files
            )
        self.spec = JobSpec(
            token=self.token,
            plan=plan,
            outputs=tuple(self._refs),
            order=request.outputs[0].order if request.outputs else request.plan.order,
            output_orders=tuple(o.order for o in request.outputs),
            reserve=tuple(self._reserve),
            inputs=tuple(bindings),
            kernel=request.kernel,
            status_path=status_path,
            flush=any(o.kind is OutputKind.NPY for o in request.outputs) or not local,
        )
        self.spec_path, self.spec_inode = create_spec_file(
            small_dir, self.spec, self._created, self._job_files
        )

    def _claim_outputs(self) -> None:
        """Hold each persistent output for the job (see :mod:`._claims`)."""
        for output in self.request.outputs:
            path = output.path if output.kind is OutputKind.NPY else None
            if output.kind is OutputKind.MEMMAP:
                assert output.array is not None
                ref = memmap_ref(output.array)
                path = ref.path if ref is not None else None
            claim = None if path is None else OutputClaim(path)
            self._claims.append(claim)
            if claim is not None:
                claim.lock_existing()

    def _create_output(
        self, k: int, output: OutputSpec, workspace: Workspace, base: str
    ) -> ArrayRef:
        plan = self.request.plan
        strides = contiguous_strides(output.shape, output.dtype.itemsize, output.order)
        if output.kind is OutputKind.NPY:
            assert output.path is not None
            npy = prepare_npy_output(
                output.path,
                plan,
                output.shape,
                output.dtype,
                output.order,
                self.request.resume,
                self._created,
            )
            if npy.journal is not None:
                self._journals.append(npy.journal)
            # With several outputs a chunk is done when every output holds it.
            self.done &= npy.done
            claim = self._claims[k]
            assert claim is not None
            # Hold the file the job writes (a new one replaced the one locked so far).
            claim.lock_existing()
            expected = npy.journal.output_inode if npy.journal is not None else None
            assert claim.fd is not None
            if expected is not None and os.fstat(claim.fd).st_ino != expected:
                msg = f"{output.path} was replaced by another program while the job made it"
                raise OutputBusyError(msg)
            return npy.ref
        if output.kind is OutputKind.TEMPORARY and self._in_memory:
            key, array = memory.allocate(output.shape, output.dtype, output.order)
            self._memory_keys.append(key)
            self._memory_outputs[k] = array
            return ArrayRef(key, 0, output.dtype, output.shape, tuple(array.strides))
        if output.kind is OutputKind.TEMPORARY:
            name = f"out{k or ''}-{self.token}.bin"  # out-, out1-, out2-, ...
            pdir = workspace.private_dir(base)
            path = os.path.join(pdir.path, name)
            fd = pdir.create(name)
            self._created.append(path)
            try:
                # Sparse: the workers reserve the blocks of each batch before writing it.
                os.ftruncate(fd, output.nbytes)
            finally:
                os.close(fd)
            return ArrayRef(path, 0, output.dtype, output.shape, strides)
        assert output.array is not None
        ref = memmap_ref(output.array)
        assert ref is not None  # checked when the request was built
        missing = output.nbytes - allocated_bytes(ref.path)
        if missing > 0:
            check_room(os.path.dirname(ref.path) or ".", missing, "output (sparse file)")
        return ref

    # -- the end of the job --------------------------------------------------------------------

    def result(self) -> tuple[Any, ...]:
        """The job's outputs as arrays, in the order of ``request.outputs``."""
        results = []
        for k, (output, ref, claim) in enumerate(
            zip(self.request.outputs, self._refs, self._claims)
        ):
            array = self._memory_outputs.get(k)
            if array is not None:
                result = array.view()
                result.flags.writeable = False  # read-only, as the memmaps of other outputs
                results.append(result)
            else:
                results.append(_result(output, ref, claim))
        return tuple(results)

    def cleanup(self, succeeded: bool) -> None:
        """Remove the job's own files (and its temporary outputs, unless it succeeded: then
        they go with their result arrays)."""
        if self.status is not None:
            self.status.close()
            self.status = None
        self._remove(self._job_files)
        self._release_claims()
        for key in self._memory_keys:
            memory.release(key)  # the arrays live on as long as the results do
        self._memory_keys = []
        self._memory_outputs = {}
        if not succeeded:
            for output, ref in zip(self.request.outputs, self._refs):
                if output.kind is OutputKind.TEMPORARY:
                    unlink_quietly(ref.path)

    def _release_claims(self) -> None:
        for claim in self._claims:
            if claim is not None:
                claim.release()

    @staticmethod
    def _remove(paths: list[str]) -> None:
        for path in paths:
            unlink_quietly(path)


def empty_results(request: JobRequest) -> tuple[Any, ...]:
    """The outputs of a job over zero elements: no file can map them and no chunk runs."""
    results = []
    for output in request.outputs:
        if output.kind is OutputKind.MEMMAP:
            results.append(output.array)
            continue
        empty = np.empty(output.shape, dtype=output.dtype, order=output.order)  # type: ignore[call-overload]
        if output.kind is OutputKind.NPY:
            assert output.path is not None
            # An empty array can't be mapped: the file is written, the array returned as is.
            np.save(output.path, empty)
            unlink_quietly(journal_path(output.path))
        empty.setflags(write=False)
        results.append(empty)
    return tuple(results)


def _result(output: OutputSpec, ref: ArrayRef, claim: OutputClaim | None) -> Any:
    if output.kind is OutputKind.MEMMAP:
        return output.array
    if output.nbytes == 0:
        # An empty output beside others that are not (an empty trailing axis): nothing
        # to map.
        empty = np.empty(output.shape, dtype=output.dtype, order=output.order)  # type: ignore[call-overload]
        empty.setflags(write=False)
        return empty
    if output.kind is OutputKind.NPY:
        assert claim is not None
        assert claim.fd is not None
        os.fsync(claim.fd)  # the header; chunks were flushed by the workers
        # Mapped from the file the job held, not by path: the result is the file the job
        # wrote, whatever is at the path now. A new open of it (not a dup, which would share
        # the claim's lock and keep it for as long as the result lives).
        with open(_reopen(claim.fd, ref.path), "rb", buffering=0) as f:
            f.name = ref.path  # np.memmap takes its filename from it
            return np.memmap(  # type: ignore[call-overload]
                f,
                dtype=output.dtype,
                mode="r",
                offset=ref.offset,
                shape=output.shape,
                order=output.order,
            )
    result = np.memmap(
        ref.path, dtype=output.dtype, mode="r", shape=output.shape, order=output.order
    )  # type: ignore[call-overload]
    # The file goes when the result does (or when the pool closes, if sooner: a mapped
    # file stays readable after it is unlinked).
    weakref.finalize(result, OwnerOnly(unlink_quietly), ref.path)
    return result


def _reopen(fd: int, path: str) -> int:
    """A new read-only open file description of the file behind ``fd``."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    except OSError:  # pragma: no cover - no /proc: by path, checked to be the same file
        new = os.open(path, os.O_RDONLY)
        if os.fstat(new).st_ino != os.fstat(fd).st_ino:
            os.close(new)
            msg = f"{path} was replaced by another program before the job could return it"
            raise OutputBusyError(msg) from None
        return new


def _what_needs_room(temp_output: bool, dumped_inputs: bool) -> str:
    if temp_output and dumped_inputs:
        return "output and inputs"
    return "output" if temp_output else "inputs"


def create_status_file(
    pdir: PrivateDir, token: str, count: int, created: list[str], job_files: list[str]
) -> tuple[str, StatusFile]:
    """Create the status file of a job of ``count`` chunks in ``pdir``; return its path and
    the parent's open view of it.

    Its path joins ``created`` (removed if the job can't start) and ``job_files`` (removed
    when it ends), as every file of a job does.
    """
    name = f"status-{token}.bin"
    path = os.path.join(pdir.path, name)
    StatusFile.create(path, count, pdir.create(name))
    created.append(path)
    job_files.append(path)
    return path, StatusFile.open(path, count)


def create_spec_file(
    pdir: PrivateDir, spec: JobSpec, created: list[str], job_files: list[str]
) -> tuple[str, int]:
    """Write the job's ``spec`` to a new file in ``pdir``; return its path and its inode (the
    workers check it, see :func:`._protocol.load_spec`). The path joins ``created`` and
    ``job_files`` before the file is written, so a failed write leaves nothing behind."""
    name = f"spec-{spec.token}.pkl"
    path = os.path.join(pdir.path, name)
    created.append(path)
    job_files.append(path)
    return path, write_spec(pdir.create(name, os.O_WRONLY), spec)


def dump_array(array: np.ndarray[Any, Any], fd: int, path: str) -> ArrayRef:
    """Write an in-memory input once, so workers map it instead of receiving copies.

    Plain writes, not a memmap of a sparse file: if the disk fills up in the meantime, a
    write fails with ENOSPC where a store into a mapping would kill the parent with SIGBUS.
    """
    order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
    with open(fd, "wb") as f:
        # tofile writes in C order; the transpose of an F-ordered array is C-ordered and
        # has the same bytes, so neither layout is copied in memory first.
        (array.T if order == "F" else array).tofile(f)
        if array.nbytes == 0:
            f.truncate(1)  # an empty file cannot be mapped
    shape = tuple(array.shape)
    return ArrayRef(
        path, 0, array.dtype, shape, contiguous_strides(shape, array.dtype.itemsize, order)
    )
