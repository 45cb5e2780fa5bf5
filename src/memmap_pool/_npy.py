"""Reading the header of a ``.npy`` file that the user named, without trusting it.

numpy's header readers raise whatever the damage makes them raise (``ValueError``,
``SyntaxError``, ``tokenize.TokenError``, ...), and a file cut short after its header reads
as a whole array until a worker touches the missing part. :func:`read_npy` turns both into a
``ValueError`` that names the file, before any work starts.
"""

from __future__ import annotations

import math
import os
import tokenize

import numpy as np

from ._storage import NpyInfo, read_npy_header

KNOWN_VERSIONS = ((1, 0), (2, 0), (3, 0))
"""The .npy format versions numpy writes (3.0: 2.0 with a UTF-8 header)."""

NPY_HEADER_ERRORS = (
    ValueError,
    SyntaxError,
    EOFError,
    KeyError,
    TypeError,
    UnicodeError,
    tokenize.TokenError,
)
"""What numpy's header readers raise on a damaged file."""


def read_npy(path: str, what: str) -> NpyInfo:
    """The header of the ``.npy`` file ``path``, checked against the file's size.

    Raises:
        ValueError: the file is not a readable ``.npy`` file, or it is shorter than its
            header says (``what``, if given, names the argument in the message).
        OSError: the file can't be opened.
    """
    prefix = f"{what}: " if what else ""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
        if version not in KNOWN_VERSIONS:
            msg = f"format version {version[0]}.{version[1]} is not one numpy writes"
            raise ValueError(msg)
        info = read_npy_header(path)
    except OSError:
        raise
    except NPY_HEADER_ERRORS as exc:
        msg = f"{prefix}{path} is not a .npy file numpy can read ({type(exc).__name__}: {exc})"
        raise ValueError(msg) from None
    needed = info.offset + math.prod(info.shape) * info.dtype.itemsize
    size = os.stat(path).st_size
    if size < needed:
        msg = (
            f"{prefix}{path} is truncated: its header describes a {info.shape} {info.dtype} "
            f"array of {needed} bytes, the file has {size}"
        )
        raise ValueError(msg)
    return info
