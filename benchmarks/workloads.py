"""The work every approach does, and how a result is checked against the serial reference.

Every workload computes a 2-d output, chunk by chunk along axis 0. Most fill it from nothing:
a *block function* ``fill(out_block, row_start)`` computes rows
``row_start .. row_start + len(out_block)`` of the output into ``out_block``; each approach
calls the same block function on the same chunks, and only the way it gets the chunks to the
cores and the rows back differs.

The *stencil* workload reads an input image instead (a ``.npy`` file written before anything is
timed) and blurs it: a *stencil function* ``blur(block) -> blurred block`` of the same shape,
applied to each chunk widened by a halo of :data:`STENCIL_DEPTH` rows on each side, and the halo
trimmed from its result. The halo is as deep as the filter's radius, so every chunked result is
equal, bit for bit, to the serial filter of the whole image, and is checked so.

The block functions live at module level so that worker processes import them by name under
every start method (nothing here is pickled by value).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

MiB = 2**20
GiB = 2**30


# -- block functions -----------------------------------------------------------------------------


def fill_block(out: np.ndarray, row_start: int) -> None:
    """Memory-bound: one multiply per element, ``out[i, j] = (i + 1) * (1 + j / ncols)``.

    Exact in float32 for any row count used here, so every approach must match bit for bit.
    """
    n, m = out.shape
    rows = np.arange(row_start + 1, row_start + n + 1, dtype=out.dtype)[:, None]
    cols = np.linspace(1.0, 2.0, m, endpoint=False, dtype=out.dtype)[None, :]
    np.multiply(rows, cols, out=out)


def gil_block(out: np.ndarray, row_start: int) -> None:
    """GIL-bound: a Python loop over rows, a few numpy calls on a short row each.

    Each call is so small that the interpreter, which holds the GIL, dominates: threads
    cannot overlap this, processes can.
    """
    base = np.arange(1, out.shape[1] + 1, dtype=out.dtype)
    for k in range(out.shape[0]):
        row = out[k]
        np.multiply(base, 1.0 / (row_start + k + 1), out=row)
        np.sin(row, out=row)
        row += 1.5
        np.sqrt(row, out=row)


COMPUTE_PASSES = 6
"""Rounds of transcendental math per element in :func:`compute_block`: enough that the block
stays in cache and the time goes to arithmetic, not to memory bandwidth."""


def compute_block(out: np.ndarray, row_start: int) -> None:
    """Compute-bound with the GIL released: whole-block transcendental ufuncs, in place.

    numpy releases the GIL inside each ufunc loop, so threads run these in parallel.
    """
    n, m = out.shape
    first = row_start * m
    np.multiply(np.arange(first, first + n * m, dtype=out.dtype).reshape(n, m), 1e-7, out=out)
    for _ in range(COMPUTE_PASSES):
        np.sin(out, out=out)
        np.exp(out, out=out)  # in [1/e, e]: keeps the next pass away from 0 and from overflow
        np.log1p(out, out=out)
        np.arctan(out, out=out)


def tiny_block(out: np.ndarray, row_start: int) -> None:
    """Trivial: the chunk's rows hold ``row + 1``. Measures what a chunk costs to dispatch."""
    out[...] = np.arange(row_start + 1, row_start + out.shape[0] + 1, dtype=out.dtype)[:, None]


BLOCK_FUNCTIONS: dict[str, Callable[[np.ndarray, int], None]] = {
    "fill": fill_block,
    "gil": gil_block,
    "compute": compute_block,
    "tiny": tiny_block,
}


# -- stencil functions ---------------------------------------------------------------------------

STENCIL_SIGMA = 4.0
"""Standard deviation, in pixels, of the Gaussian blur."""

STENCIL_TRUNCATE = 4.0
"""scipy's default: the kernel is cut at ``truncate * sigma``."""

STENCIL_DEPTH = int(STENCIL_TRUNCATE * STENCIL_SIGMA + 0.5)
"""The kernel's radius, as ``scipy.ndimage.gaussian_filter1d`` computes it (16 for sigma 4): an
output element depends on the input elements at most this far away on each axis, so a chunk
widened by this many rows on each side has everything its own rows need."""

STENCIL_MODE = "reflect"
"""scipy's ``mode`` beyond the image's edges. scipy's "reflect" repeats the edge element
(``d c b a | a b c d | d c b a``): it is ``np.pad``'s, dask's and MemmapPool's "symmetric", and
dask's "reflect"."""


def blur(block: np.ndarray) -> np.ndarray:
    """The stencil: a Gaussian blur of ``block``, a new array of the same shape and dtype.

    scipy filters axis by axis, each pass in float64 and stored in the block's dtype, so the
    rows of a chunk blurred with its halo get the same values as in the blur of the whole image.
    """
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(  # type: ignore[no-any-return]
        block, sigma=STENCIL_SIGMA, mode=STENCIL_MODE, truncate=STENCIL_TRUNCATE
    )


STENCIL_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"gaussian": blur}


# -- workloads -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One benchmark: an output of ``shape`` and ``dtype`` computed by ``kernel`` in chunks of
    ``chunk_rows`` rows.

    Attributes:
        key: short name, used on the command line and in result files.
        title: what the workload stands for, for the report.
        kernel: key of the block function in :data:`BLOCK_FUNCTIONS`, or of the stencil
            function in :data:`STENCIL_FUNCTIONS`.
        shape: output shape (rows, columns).
        dtype: output dtype.
        chunk_rows: rows per chunk, the same for every approach.
        task_batch: chunks per pool task for executors that batch by hand
            (``Executor.map(chunksize=...)``): 1 when a chunk is many milliseconds of work.
        startup: whether pool start-up and shutdown are inside the timed region.
        on_disk: output on a disk directory (out-of-core); approaches that hold the whole
            output in RAM are not run.
        full_check: check every row's sum (else sampled rows only: out-of-core outputs are too
            large to read back in full).
        input: stencils: the ``.npy`` file of the input image, of ``shape`` and ``dtype``
            (written by :func:`write_stencil_files` before anything is timed).
        expected: stencils: the ``.npy`` file of the serial result, which a result must equal.
    """

    key: str
    title: str
    kernel: str
    shape: tuple[int, int]
    dtype: str
    chunk_rows: int
    task_batch: int = 1
    startup: bool = False
    on_disk: bool = False
    full_check: bool = True
    input: str = ""
    expected: str = ""

    @property
    def block_function(self) -> Callable[[np.ndarray, int], None]:
        return BLOCK_FUNCTIONS[self.kernel]

    @property
    def stencil(self) -> bool:
        """Whether this workload blurs an input (else it fills its output from nothing)."""
        return self.kernel in STENCIL_FUNCTIONS

    @property
    def stencil_function(self) -> Callable[[np.ndarray], np.ndarray]:
        return STENCIL_FUNCTIONS[self.kernel]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.shape[1] * np.dtype(self.dtype).itemsize

    @property
    def n_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk_rows)

    def starts(self) -> range:
        """First row of every chunk."""
        return range(0, self.shape[0], self.chunk_rows)

    def rows_at(self, start: int) -> int:
        return min(self.chunk_rows, self.shape[0] - start)


def full_workloads(out_of_core_bytes: int | None = None) -> list[Workload]:
    """The sizes of a real run (2 workers on a 2-core machine)."""
    workloads = [
        Workload(
            "fill",
            "Memory-bound fill, pool start-up included",
            "fill",
            (65536, 4096),
            "float32",
            chunk_rows=1024,
            startup=True,
        ),
        Workload(
            "gil",
            "GIL-bound kernel (a Python loop of small numpy calls), pool started",
            "gil",
            (1048576, 16),
            "float64",
            chunk_rows=8192,
        ),
        Workload(
            "compute",
            "Compute-bound numpy kernel (GIL released), pool started",
            "compute",
            (8192, 4096),
            "float64",
            chunk_rows=32,
        ),
        Workload(
            "tiny",
            "Tiny chunks of a trivial kernel (per-chunk overhead), pool started",
            "tiny",
            (20000, 1024),
            "float32",
            chunk_rows=1,
            task_batch=1250,
        ),
        Workload(
            "stencil",
            f"Stencil: Gaussian blur (sigma {STENCIL_SIGMA:g}, halo {STENCIL_DEPTH}) of an image "
            "read from a .npy file, pool started",
            "gaussian",
            (16384, 16384),
            "float32",
            chunk_rows=1024,
        ),
    ]
    if out_of_core_bytes:
        workloads.append(out_of_core(out_of_core_bytes))
    return workloads


def out_of_core(nbytes: int, *, row_bytes: int = 4096 * 4, chunk_rows: int = 1024) -> Workload:
    rows = max(1, nbytes // row_bytes)
    return Workload(
        "ooc",
        "Out-of-core fill on disk, larger than RAM, pool start-up included",
        "fill",
        (rows, row_bytes // 4),
        "float32",
        chunk_rows=min(chunk_rows, rows),
        startup=True,
        on_disk=True,
        full_check=False,
    )


def smoke_workloads(out_of_core_bytes: int | None = None) -> list[Workload]:
    """Tiny sizes with the same structure: every approach, every code path, in seconds."""
    small = {
        "fill": {"shape": (256, 1024), "chunk_rows": 32},
        "gil": {"shape": (256, 32), "chunk_rows": 32},
        "compute": {"shape": (64, 1024), "chunk_rows": 8},
        "tiny": {"shape": (200, 256), "chunk_rows": 1, "task_batch": 25},
        # Uneven on purpose: the last chunk is shorter, and no size is a multiple of another.
        "stencil": {"shape": (300, 257), "chunk_rows": 64},
    }
    out = [replace(w, **small[w.key]) for w in full_workloads()]  # type: ignore[arg-type]
    if out_of_core_bytes:
        out.append(out_of_core(out_of_core_bytes, chunk_rows=16))
    return out


def format_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if nbytes == int(nbytes) else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


# -- the reference and the check -------------------------------------------------------------------

SAMPLE_ROWS = 16
"""Rows compared element by element (besides every row's sum)."""

SUM_RTOL = 1e-9
"""Row sums of a right result equal the reference's to rounding; a missing or misplaced
chunk changes them by far more."""

VALUE_RTOL = 1e-6


def sample_rows(w: Workload) -> np.ndarray:
    """Rows compared in full: spread over the array, including the first and the last."""
    n = w.shape[0]
    rng = np.random.default_rng(6)
    picks = rng.choice(n, size=min(n, SAMPLE_ROWS), replace=False)
    picks = np.union1d(picks, [0, n - 1])
    if not w.full_check:
        # Out-of-core: also the first and last row of every chunk, so each chunk is looked at.
        starts = np.arange(0, n, w.chunk_rows)
        ends = np.minimum(starts + w.chunk_rows, n) - 1
        picks = np.union1d(picks, np.union1d(starts, ends))
    return picks.astype(np.int64)


def expected_rows(w: Workload, rows: np.ndarray) -> np.ndarray:
    """The reference values of ``rows``, computed chunk by chunk with the serial code."""
    out = np.empty((len(rows), w.shape[1]), dtype=w.dtype)
    scratch = np.empty((w.chunk_rows, w.shape[1]), dtype=w.dtype)
    fn = w.block_function
    current = -1
    for k, r in enumerate(rows.tolist()):
        start = r - r % w.chunk_rows
        if start != current:
            block = scratch[: w.rows_at(start)]
            fn(block, start)
            current = start
        out[k] = block[r - start]
    return out


def reference(w: Workload) -> dict[str, np.ndarray]:
    """What a right result must match: every row's sum (float64) and some rows in full.

    Computed chunk by chunk in a scratch buffer, so it needs one chunk of memory, not the
    whole output. Nothing for a stencil, whose result is compared with the serial result of
    the whole image, element by element (:func:`write_stencil_files`).
    """
    if w.stencil:
        return {}
    rows = sample_rows(w)
    ref: dict[str, np.ndarray] = {"rows": rows, "values": expected_rows(w, rows)}
    if w.full_check:
        sums = np.empty(w.shape[0], dtype=np.float64)
        scratch = np.empty((w.chunk_rows, w.shape[1]), dtype=w.dtype)
        for start in w.starts():
            block = scratch[: w.rows_at(start)]
            w.block_function(block, start)
            block.sum(axis=1, dtype=np.float64, out=sums[start : start + len(block)])
        ref["sums"] = sums
    return ref


def check(w: Workload, result: Any, ref: dict[str, np.ndarray]) -> str | None:
    """None when ``result`` matches the reference, else what is wrong (for the report)."""
    if tuple(result.shape) != w.shape:
        return f"shape {tuple(result.shape)}, expected {w.shape}"
    if np.dtype(result.dtype) != np.dtype(w.dtype):
        return f"dtype {result.dtype}, expected {w.dtype}"
    if w.stencil:
        return check_equal(result, np.load(w.expected, mmap_mode="r"))
    got = np.asarray(result[ref["rows"]])
    bad = ~np.isclose(got, ref["values"], rtol=VALUE_RTOL, atol=0)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        row = int(ref["rows"][r])
        return (
            f"{int(bad.sum())} wrong values in {len(ref['rows'])} sampled rows, first at "
            f"[{row}, {c}]: {got[r, c].item()!r}, expected {ref['values'][r, c].item()!r}"
        )
    if "sums" in ref:
        sums = np.empty(w.shape[0], dtype=np.float64)
        # Slab by slab: one chunk-sized float64 temporary at a time.
        step = max(w.chunk_rows, 1024)
        for start in range(0, w.shape[0], step):
            np.asarray(result[start : start + step]).sum(
                axis=1, dtype=np.float64, out=sums[start : start + step]
            )
        wrong = ~np.isclose(sums, ref["sums"], rtol=SUM_RTOL, atol=0)
        if wrong.any():
            first = int(np.flatnonzero(wrong)[0])
            return (
                f"{int(wrong.sum())} of {w.shape[0]} rows have a wrong sum, first row {first}: "
                f"{sums[first].item()!r}, expected {ref['sums'][first].item()!r}"
            )
    return None


CHECK_SLAB_BYTES = 64 * MiB
"""Rows compared at a time in :func:`check_equal`."""


def check_equal(result: Any, expected: np.ndarray) -> str | None:
    """None when every element of ``result`` equals ``expected``'s, else where they differ.

    Slab by slab, so that neither array is read into memory whole.
    """
    rows, cols = expected.shape
    step = max(1, CHECK_SLAB_BYTES // max(1, cols * expected.itemsize))
    wrong, first, worst = 0, None, 0.0
    for start in range(0, rows, step):
        got = np.asarray(result[start : start + step])
        want = np.asarray(expected[start : start + step])
        bad = got != want
        if bad.any():
            wrong += int(bad.sum())
            worst = max(worst, float(np.abs(got[bad].astype(np.float64) - want[bad]).max()))
            if first is None:
                r, c = np.argwhere(bad)[0]
                first = (start + int(r), int(c), got[r, c].item(), want[r, c].item())
    if first is None:
        return None
    r, c, g, e = first
    return (
        f"{wrong} of {rows * cols} values differ from the serial result (largest difference "
        f"{worst:.3g}), first at [{r}, {c}]: {g!r}, expected {e!r}"
    )


# -- the stencil's input and expected result ---------------------------------------------------

IMAGE_SEED = 20240605


def write_image(path: str, shape: tuple[int, int], dtype: str, seed: int = IMAGE_SEED) -> None:
    """A deterministic test image in a ``.npy`` file: a smooth pattern plus uniform noise,
    values in [0, 2). Written slab by slab, so it never needs the whole image in memory."""
    rows, cols = shape
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    x = np.sin(np.linspace(0.0, 12.0 * np.pi, cols, dtype=np.float64))[None, :]
    step = max(1, CHECK_SLAB_BYTES // max(1, cols * out.itemsize))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        y = np.cos(np.arange(start, start + n, dtype=np.float64) * (8.0 * np.pi / rows))[:, None]
        rng = np.random.default_rng([seed, start])
        noise = rng.random((n, cols), dtype=np.float32)
        np.add(noise, 0.5 + 0.25 * (x + y), out=out[start : start + n], casting="unsafe")
    out.flush()
    del out


def warm_input(path: str) -> str:
    """The input of a stencil's warm-up run (:func:`mini`), next to the timed run's."""
    return path.removesuffix(".npy") + ".warm.npy"


def write_stencil_files(w: Workload, directory: str) -> Workload:
    """Write the input image of stencil ``w`` (and the smaller one of its warm-up) and the
    serial result of the whole image into ``directory``; ``w`` with their paths."""
    assert w.stencil
    path = os.path.join(directory, f"{w.key}.input.npy")
    write_image(path, w.shape, w.dtype)
    warm = mini(replace(w, input=path))
    write_image(warm.input, warm.shape, warm.dtype, seed=IMAGE_SEED + 1)
    # The reference: the stencil function on the whole image, in one call.
    expected = os.path.join(directory, f"{w.key}.expected.npy")
    result = w.stencil_function(np.load(path, mmap_mode="r"))
    np.save(expected, result)
    del result
    return replace(w, input=path, expected=expected)


def mini(w: Workload) -> Workload:
    """Two chunks of the same workload: warms up a started pool (imports, first mapping)."""
    rows = min(w.shape[0], 2 * w.chunk_rows)
    small = replace(w, shape=(rows, w.shape[1]), on_disk=False, full_check=True)
    if w.stencil:
        # Its own, smaller input; the warm-up's result is not checked.
        small = replace(small, input=warm_input(w.input), expected="")
    return small


def workload_from_dict(data: dict[str, Any]) -> Workload:
    data = dict(data)
    data["shape"] = tuple(data["shape"])
    return Workload(**data)
