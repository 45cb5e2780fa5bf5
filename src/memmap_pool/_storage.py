"""Backing files: where they go, how they are created, reserved and described.

The pool's private directories, and the removal of those a dead pool left, are in
:mod:`._privatedir`.
"""

from __future__ import annotations

import ast
import ctypes
import errno
import logging
import math
import mmap
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._chunks import PAGE_SIZE
from .errors import NotEnoughSpaceError

log = logging.getLogger("memmap_pool")

TEMP_DIR_ENV = "MEMMAP_POOL_TEMP_DIR"
SHM_DIR = "/dev/shm"
SHM_MAX_FRACTION_OF_AVAILABLE_RAM = 0.5
"""/dev/shm is RAM: an output goes there only if it also leaves half of the available memory
to the kernels themselves, otherwise it goes to the system temp dir (disk, page cache)."""

NPY_HEADER_BYTES = PAGE_SIZE
""".npy files we write have their header padded to one page, so the data starts on a page
boundary and page-aligned chunks stay page-aligned in the file."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def check_room(directory: str, needed: int, what: str = "output") -> None:
    """Raise :class:`NotEnoughSpaceError` if ``directory`` has fewer than ``needed`` bytes free."""
    free = free_bytes(directory)
    if needed > free:
        msg = (
            f"not enough space in {directory} for a {format_bytes(needed)} {what} "
            f"({format_bytes(free)} free); free some space, pass temp_dir= or set "
            f"{TEMP_DIR_ENV}, or write the output to a .npy path on a larger filesystem"
        )
        raise NotEnoughSpaceError(msg, directory)


def choose_base_dir(temp_dir: str | os.PathLike[str] | None, needed: int) -> str:
    """Where temporary files of ``needed`` bytes go: ``temp_dir``, else ``$MEMMAP_POOL_TEMP_DIR``,
    else /dev/shm when it has room, else the system temp dir."""
    if temp_dir is not None:
        return os.fspath(temp_dir)
    env = os.environ.get(TEMP_DIR_ENV)
    if env:
        return env
    if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK):
        try:
            room = free_bytes(SHM_DIR)
        except OSError:
            room = 0
        available = available_memory()
        ram_ok = available is None or needed <= available * SHM_MAX_FRACTION_OF_AVAILABLE_RAM
        if needed <= room and ram_ok:
            return SHM_DIR
    return tempfile.gettempdir()


def proc_state(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process as /proc shows them; ("X", "") once it is gone;
    None where /proc can't tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return ("X", "") if os.path.isdir("/proc/self") else None
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # the command name may hold spaces
    return fields[0].decode(), fields[19].decode()


def pid_alive(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` runs. A zombie (killed, not yet reaped: that may never
    happen) counts as dead, and so does a recycled pid when ``started`` (its start time from
    :func:`proc_state`) is given."""
    info = proc_state(pid)
    if info is not None:
        state, start = info
        return state not in ("Z", "X", "x") and (started is None or start == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, and someone else's
    return True


def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...], order: str) -> bytes:
    """A version 1.0 .npy header padded to :data:`NPY_HEADER_BYTES`."""
    fields = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": order == "F" and len(shape) > 1,
        "shape": shape,
    }
    try:
        text = repr(fields).encode("latin1")
        version, length_bytes = b"\x01\x00", 2
    except UnicodeEncodeError:
        # Field names outside Latin-1: format 3.0 is 2.0 with a UTF-8 header.
        text = repr(fields).encode("utf8")
        version, length_bytes = b"\x03\x00", 4
    prefix = 8 + length_bytes  # magic (6) + version (2) + header length
    total = NPY_HEADER_BYTES * max(1, math.ceil((prefix + len(text) + 1) / NPY_HEADER_BYTES))
    if total - prefix >= 1 << (8 * length_bytes):
        msg = f"the dtype {dtype} is too large to describe in a .npy header"
        raise ValueError(msg)
    body = text + b" " * (total - prefix - len(text) - 1) + b"\n"
    return b"\x93NUMPY" + version + (total - prefix).to_bytes(length_bytes, "little") + body


def create_npy(
    path: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    order: str,
    before_replace: Callable[[int], None] | None = None,
) -> int:
    """Create (or replace) a .npy file for the array; return the data offset.

    ``before_replace(inode)`` runs once the new file exists under a temporary name, before
    it takes the place of ``path``: the resume journal records the inode there.
    """
    return _replace_with_npy(path, dtype, shape, order, None, before_replace)


def write_npy(path: str, array: np.ndarray[Any, Any]) -> None:
    """Write ``array`` as the ``.npy`` at ``path``, whole or not at all: into a new file
    beside it, synced, then renamed onto it."""

    def copy_in(fd: int, offset: int) -> None:
        with mmap.mmap(fd, 0) as mapping:
            target = np.ndarray(array.shape, array.dtype, buffer=mapping, offset=offset)
            rows = max(1, (64 << 20) // max(1, array[:1].nbytes))  # 64 MiB at a time
            for start in range(0, len(array), rows):
                target[start : start + rows] = array[start : start + rows]
            del target
            mapping.flush()

    _replace_with_npy(path, array.dtype, array.shape, "C", copy_in, None)


def _replace_with_npy(
    path: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    order: str,
    write_data: Callable[[int, int], None] | None,
    before_replace: Callable[[int], None] | None,
) -> int:
    """A new .npy file under a temporary name beside ``path``: header, size, then
    ``write_data(fd, data_offset)`` if given, synced, renamed onto ``path``."""
    header = npy_header(dtype, shape, order)
    nbytes = math.prod(shape) * dtype.itemsize
    fd, tmp = new_temp_file(path)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as np.save would make it
        os.write(fd, header)
        os.ftruncate(fd, len(header) + nbytes)
        if write_data is not None and nbytes:
            write_data(fd, len(header))
        os.fsync(fd)  # the header survives a power loss that the journal's entries survive
        inode = os.fstat(fd).st_ino
        if before_replace is not None:
            before_replace(inode)
        # Atomic replace: a reader never sees a half-written header, and an old file of the
        # same name stays whole until the new one exists.
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    os.close(fd)
    fsync_dir(path)
    return len(header)


def new_temp_file(path: str) -> tuple[int, str]:
    """A new file beside ``path`` to be renamed onto it: an unpredictable name, created with
    O_EXCL (never an existing file, never through a symlink another user planted), 0600."""
    directory, name = os.path.split(os.path.abspath(path))
    return tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)


def unlink_quietly(path: str) -> None:
    """Remove ``path`` if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _umask() -> int:
    """This process's umask, read without changing it (Linux), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - without /proc
    os.umask(mask)
    return mask


def fsync_dir(path: str) -> None:
    """Make the rename of ``path`` durable (a renamed file's directory entry is data of the
    directory, not of the file)."""
    try:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems can't fsync a directory; nothing more to do there
    finally:
        os.close(fd)


@dataclass(frozen=True)
class NpyInfo:
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    order: str
    offset: int


def read_npy_header(path: str) -> NpyInfo:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            # 3.0 (numpy writes it for field names outside Latin-1): 2.0 with UTF-8 text,
            # which numpy has no public reader for.
            length = int.from_bytes(f.read(4), "little")
            fields = ast.literal_eval(f.read(length).decode("utf8"))
            shape, fortran = fields["shape"], fields["fortran_order"]
            dtype = np.lib.format.descr_to_dtype(fields["descr"])
        offset = f.tell()
    return NpyInfo(tuple(shape), dtype, "F" if fortran else "C", offset)


# -- reserving blocks --------------------------------------------------------------------------

_FALLOC_SUPPORTED = sys.platform.startswith("linux")
_libc: Any = None


_SYNC_FILE_RANGE_WRITE = 2
"""``SYNC_FILE_RANGE_WRITE`` (linux/fs.h): start writeback of the range's dirty pages."""


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        libc.sync_file_range.argtypes = [
            ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint,
        ]  # fmt: skip
        _libc = libc
    return _libc


def _linux_fallocate(fd: int, offset: int, length: int) -> int:
    """fallocate(2) without glibc's emulation: returns 0 or an errno.

    ``posix_fallocate`` falls back, on filesystems without fallocate, to writing a byte per
    block, which could overwrite a neighbour's data when chunks interleave in the file; the
    raw system call either reserves or says it can't.
    """
    if _load_libc().fallocate(fd, 0, offset, length) == 0:
        return 0
    return ctypes.get_errno()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing the dirty pages of ``[offset, offset + length)`` to disk, without
    waiting for them (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; nothing elsewhere).

    Only a head start for the msync that must follow: it does not make anything durable,
    and an error it meets (or a filesystem that lacks it) is left for that msync to report.
    """
    if _FALLOC_SUPPORTED and length > 0:
        _load_libc().sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def reserve(fd: int, offset: int, length: int, contiguous: bool) -> bool:
    """Reserve the blocks of ``[offset, offset + length)`` so later writes cannot hit a full
    disk (on tmpfs, that would be a SIGBUS). Returns False where the filesystem can't.

    Raises:
        OSError: with ``errno.ENOSPC`` when there is no room.
    """
    if length <= 0:
        return True
    # Whole pages: a partial page at either end belongs to a neighbour that reserves it too,
    # and fallocate on already reserved blocks is a no-op.
    start = offset - offset % PAGE_SIZE
    length = offset + length - start
    if _FALLOC_SUPPORTED:
        err = _linux_fallocate(fd, start, length)
        if err == 0:
            return True
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err))
    if contiguous and hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, start, length)
        return True
    return False


def fully_allocated(path: str) -> bool:
    """Whether every block of the file at ``path`` is allocated (no hole), so that writing it
    cannot find the disk full. From the block count: one ``stat``, whatever the size (asking
    for holes with ``SEEK_HOLE`` walks the file on tmpfs)."""
    st = os.stat(path)
    blocks = getattr(st, "st_blocks", None)
    if blocks is None:  # pragma: no cover - not POSIX
        return False
    unit = max(st.st_blksize, 1)
    return bool(blocks * 512 >= -(-st.st_size // unit) * unit)


def allocated_bytes(path: str) -> int:
    st = os.stat(path)
    return min(st.st_size, getattr(st, "st_blocks", 0) * 512)


# -- arrays by reference -----------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayRef:
    """An array in a file, by reference: ``np.ndarray(shape, dtype, buffer=<mapping of path>,
    offset=offset, strides=strides)``. A few hundred bytes whatever the array's size."""

    path: str
    offset: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def contiguous_strides(shape: tuple[int, ...], itemsize: int, order: str) -> tuple[int, ...]:
    from ._chunks import element_strides

    return tuple(s * itemsize for s in element_strides(shape, order))


def memmap_holder(array: np.ndarray[Any, Any]) -> np.memmap[Any, Any] | None:
    """The ``np.memmap`` that owns the file mapping ``array`` lives in (itself, or the base of
    a view), or None."""
    holder: Any = array
    while holder is not None and not (
        isinstance(holder, np.memmap) and getattr(holder, "_mmap", None) is not None
    ):
        holder = getattr(holder, "base", None)
        if isinstance(holder, mmap.mmap):
            return None  # a bare mmap: we don't know its file
    if holder is None or not holder.filename:
        return None
    return holder


def memmap_ref(array: np.ndarray[Any, Any]) -> ArrayRef | None:
    """The file reference of an ``np.memmap`` (or a view of one), or None if ``array`` does
    not live in a file mapping."""
    holder = memmap_holder(array)
    if holder is None or holder.filename is None:
        return None
    if holder.mode == "c":
        return None  # copy-on-write: the caller's values are in private pages, not the file
    mapping = holder._mmap  # type: ignore[attr-defined]
    # numpy maps from the offset rounded down to the allocation granularity; the mapping's
    # first byte is therefore file byte `offset - offset % granularity`.
    map_start = holder.offset - holder.offset % mmap.ALLOCATIONGRANULARITY
    probe = np.frombuffer(mapping, dtype=np.uint8, count=1)
    base_address = probe.__array_interface__["data"][0]
    del probe
    address = array.__array_interface__["data"][0]
    if array.size and any(s < 0 for s in array.strides):
        return None  # negative strides: let the caller copy it once
    return ArrayRef(
        path=os.path.abspath(holder.filename),
        offset=map_start + (address - base_address),
        dtype=array.dtype,
        shape=tuple(array.shape),
        strides=tuple(array.strides),
    )
