"""A streaming PNG writer in numpy and zlib alone: a block of rows is compressed at a time,
so writing an image held in a memmap never needs the whole image in memory."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

PNG_ROWS_PER_BLOCK = 256
"""Rows of pixels compressed at a time: bounds the parent's memory while writing the PNG."""

PNG_COMPRESSION = 6
"""zlib level of the demo's image: the default trade-off of size against time."""


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def _png_idat(rgb: np.ndarray[Any, Any], level: int) -> Iterator[bytes]:
    height, wide, _ = rgb.shape
    compressor = zlib.compressobj(level)
    for top in range(0, height, PNG_ROWS_PER_BLOCK):
        block = rgb[top : top + PNG_ROWS_PER_BLOCK]
        rows = np.zeros((block.shape[0], 1 + wide * 3), dtype=np.uint8)  # filter byte 0
        rows[:, 1:] = block.reshape(block.shape[0], wide * 3)
        data = compressor.compress(rows.tobytes())
        if data:
            yield _png_chunk(b"IDAT", data)
    yield _png_chunk(b"IDAT", compressor.flush())


def write_png(path: str | os.PathLike[str], rgb: np.ndarray[Any, Any], level: int = 6) -> None:
    """Write ``rgb`` (rows x columns x 3, uint8) as an 8-bit RGB PNG, with zlib alone.

    Args:
        path: the file to write.
        rgb: the pixels; any array, including a memmap (read a block of rows at a time).
        level: zlib compression level, 0 to 9.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        msg = f"write_png needs a rows x columns x 3 uint8 array (got {rgb.shape} {rgb.dtype})"
        raise ValueError(msg)
    height, wide, _ = rgb.shape
    # IHDR: width, height, bit depth 8, colour type 2 (RGB), deflate, adaptive filters,
    # no interlace.
    ihdr = struct.pack(">IIBBBBB", wide, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_png_chunk(b"IHDR", ihdr))
        for piece in _png_idat(rgb, level):
            f.write(piece)
        f.write(_png_chunk(b"IEND", b""))
