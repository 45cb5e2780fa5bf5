"""Arrays in this process's memory, for a pool whose workers are threads of it.

With ``backend="threads"`` the workers share the caller's address space, so a temporary
output need not be a file: it is an anonymous mapping, page-aligned, advised to use
transparent huge pages where the kernel offers them (a fill then takes a fault per 2 MiB
instead of per 4 KiB page, as ``np.empty`` gets from numpy), and an in-memory input is shared
as it is, not written to a file. The job's spec refers to them by a key in place of a path;
a worker thread looks the key up here. Keys are removed when their job ends: the memory then
lives as long as the arrays returned.
"""

from __future__ import annotations

import mmap
import secrets
import threading
from typing import Any

import numpy as np

from ._storage import available_memory
from .errors import NotEnoughSpaceError

PREFIX = "memory:"
"""The start of a key: never a file path of the pool's (those are absolute)."""

_arrays: dict[str, np.ndarray[Any, Any]] = {}
_lock = threading.Lock()


def is_key(path: str) -> bool:
    return path.startswith(PREFIX)


def allocate(
    shape: tuple[int, ...], dtype: np.dtype[Any], order: str
) -> tuple[str, np.ndarray[Any, Any]]:
    """A new zeroed array in anonymous memory, and its key.

    Raises:
        NotEnoughSpaceError: the machine's available memory can't hold it.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    check_memory(nbytes)
    mapping = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and nbytes >= 2 * 2**20:
        try:
            mapping.madvise(advice)
        except OSError:  # pragma: no cover - a kernel without transparent huge pages
            pass
    layout: Any = order
    array = np.ndarray(shape, dtype, buffer=mapping, order=layout)
    return register(array), array


def register(array: np.ndarray[Any, Any]) -> str:
    """A key under which worker threads find ``array`` (until :func:`release`)."""
    key = f"{PREFIX}{secrets.token_hex(8)}"
    with _lock:
        _arrays[key] = array
    return key


def lookup(key: str) -> np.ndarray[Any, Any]:
    """The array of ``key``.

    Raises:
        FileNotFoundError: the key is not (or no longer) registered: its job ended.
    """
    with _lock:
        array = _arrays.get(key)
    if array is None:
        msg = f"{key}: no such array in this process (its job ended)"
        raise FileNotFoundError(msg)
    return array


def release(key: str) -> None:
    with _lock:
        _arrays.pop(key, None)


def check_memory(nbytes: int) -> None:
    """Raise :class:`NotEnoughSpaceError` when ``nbytes`` exceed the available memory."""
    available = available_memory()
    if available is not None and nbytes > available:
        gib = 2**30
        msg = (
            f"not enough memory for a {nbytes / gib:.2f} GiB temporary output "
            f"({available / gib:.2f} GiB available); write it to a file with out=, or use "
            "the process backend, whose outputs live in files"
        )
        raise NotEnoughSpaceError(msg, "memory")
