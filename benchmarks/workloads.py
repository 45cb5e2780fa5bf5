"""The work every approach does, and how a result is checked against the serial reference.

Every workload is of one *kind* (:attr:`Workload.kind`), which says what is computed and how
the result is checked: the block fills ("fill"), the stencil ("stencil"), time-stepping the
heat equation ("heat"), the cost of an empty step ("empty_step"), a sum over a file on disk
("reduction") and random numbers ("normals").

The fills and the stencil compute a 2-d output, chunk by chunk along axis 0. The fills fill it
from nothing: a *block function* ``fill(out_block, row_start)`` computes rows
``row_start .. row_start + len(out_block)`` of the output into ``out_block``; each approach
calls the same block function on the same chunks, and only the way it gets the chunks to the
cores and the rows back differs.

The *stencil* workload reads an input image instead (a ``.npy`` file written before anything is
timed) and blurs it: a *stencil function* ``blur(block) -> blurred block`` of the same shape,
applied to each chunk widened by a halo of :data:`STENCIL_DEPTH` rows on each side, and the halo
trimmed from its result. The halo is as deep as the filter's radius, so every chunked result is
equal, bit for bit, to the serial filter of the whole image, and is checked so.

The *heat* workload steps the 2-d heat equation from an initial state (a ``.npy`` file): an
explicit 5-point stencil on the state padded by one element of its edge values. Every approach
runs the same update (:func:`heat_update`) on the same padded row blocks, so every result
equals, bit for bit, the reference (the same update on the whole padded state, step after step),
written before anything is timed.

The *empty step* workload steps a state with a kernel that does nothing: what a step of
``MemmapPool.iterate`` costs by itself. The *reduction* sums a ``.npy`` file on a disk (the page
cache warm: the file is read once before anything is timed) and is checked against the serial
sum, to rounding. The *normals* workload draws standard normal random numbers; approaches draw
different streams by design, so it is checked by the moments of the result, by its first
values against each approach's own generator, and by the result being the same on every run.

The block functions live at module level so that worker processes import them by name under
every start method (nothing here is pickled by value).
"""

from __future__ import annotations

import hashlib
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


# -- heat, the empty step, the reduction, the normals ---------------------------------------------

HEAT_ALPHA = 0.1
"""The heat equation's ``alpha`` (diffusivity x time step / grid step squared): the explicit
scheme is stable for ``alpha <= 0.25``."""

HEAT_STEPS = 200

HEAT_SEED = 20240607
"""Seed of the initial state: a uniform random field in [0, 1)."""

EMPTY_STEPS = 51
"""Steps of the longer of the empty step's two runs (the other has 1): the time per step is
the difference of their times divided by ``EMPTY_STEPS - 1``."""

REDUCTION_BYTES = 4 * GiB

REDUCTION_SEED = 20240608

NORMALS_SEED = 20240609

NORMALS_PREFIX = 2**20
"""First values of each stream of an approach's normals compared with its own generator."""

KINDS: dict[str, str] = {
    **dict.fromkeys(BLOCK_FUNCTIONS, "fill"),
    **dict.fromkeys(STENCIL_FUNCTIONS, "stencil"),
    "heat": "heat",
    "noop": "empty_step",
    "sum": "reduction",
    "normals": "normals",
}
"""The kind of workload each kernel key makes."""


def heat_update(out: np.ndarray, u: np.ndarray, alpha: float) -> None:
    """One explicit step of the heat equation: ``out = c + alpha * laplacian`` on ``u``.

    ``u`` is a block of the previous state padded by one element on every side (the state's
    neighbours, or its edge values beyond its edges); ``out`` is the block itself, two rows
    and two columns smaller. The arithmetic is in place, in one fixed order, so every block of
    every approach gets the same bits as the whole state does:
    ``c + alpha * ((((-4 c + north) + south) + west) + east)``.
    """
    c = u[1:-1, 1:-1]
    np.multiply(c, -4.0, out=out)
    out += u[:-2, 1:-1]
    out += u[2:, 1:-1]
    out += u[1:-1, :-2]
    out += u[1:-1, 2:]
    out *= alpha
    out += c


def pad_edges(u: np.ndarray) -> None:
    """Fill the border of the padded state ``u`` with its edge values, as ``np.pad(x, 1,
    "edge")`` of its inside does (the 5-point stencil never reads the corners)."""
    u[0, 1:-1] = u[1, 1:-1]
    u[-1, 1:-1] = u[-2, 1:-1]
    u[:, 0] = u[:, 1]
    u[:, -1] = u[:, -2]


def heat_reference(u0: np.ndarray, steps: int, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """The reference of the heat workload: ``np.pad(state, 1, "edge")`` of the whole state and
    :func:`heat_update` on it, step after step (independent of any chunking)."""
    u = np.array(u0, dtype=np.float64)
    new = np.empty_like(u)
    for _ in range(steps):
        heat_update(new, np.pad(u, 1, mode="edge"), alpha)
        u, new = new, u
    return u


def heat_serial(u0: np.ndarray, steps: int, chunk_rows: int, alpha: float = HEAT_ALPHA) -> Any:
    """Serial numpy: two preallocated padded states, swapped after each step, the border
    refreshed from the edges, :func:`heat_update` row block by row block. The final state, a
    view of the inside of one of them."""
    n, m = u0.shape
    a = np.empty((n + 2, m + 2), dtype=np.float64)
    b = np.empty_like(a)
    a[1:-1, 1:-1] = u0
    for _ in range(steps):
        pad_edges(a)
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            heat_update(b[1 + start : 1 + stop, 1:-1], a[start : stop + 2], alpha)
        a, b = b, a
    return a[1:-1, 1:-1]


def normals_tolerance(n: int) -> float:
    """How far the mean of ``n`` standard normals may be from 0, and their standard deviation
    from 1: 1e-3, or six standard errors when ``n`` is too small for that (smoke sizes)."""
    return max(1e-3, 6.0 / math.sqrt(n))


# -- workloads -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One benchmark: an output of ``shape`` and ``dtype`` computed by ``kernel`` in chunks of
    ``chunk_rows`` rows.

    Attributes:
        key: short name, used in result files (and on the command line, see ``group``).
        title: what the workload stands for, for the report.
        kernel: key of the block function in :data:`BLOCK_FUNCTIONS`, of the stencil
            function in :data:`STENCIL_FUNCTIONS`, or one of the other kinds' kernels in
            :data:`KINDS`.
        shape: output shape (rows, columns); 1-d for the reduction (its input's) and the
            normals.
        dtype: output dtype.
        chunk_rows: rows per chunk, the same for every approach; 0: MemmapPool's "auto"
            chunks (the other approaches chunk as they do by default).
        task_batch: chunks per pool task for executors that batch by hand
            (``Executor.map(chunksize=...)``): 1 when a chunk is many milliseconds of work.
        startup: whether pool start-up and shutdown are inside the timed region.
        on_disk: output on a disk directory (out-of-core); approaches that hold the whole
            output in RAM are not run.
        full_check: check every row's sum (else sampled rows only: out-of-core outputs are too
            large to read back in full).
        input: the ``.npy`` file an approach reads, written by :func:`write_files` before
            anything is timed: a stencil's input image, the initial state of heat and of
            the empty step, the reduction's array.
        expected: stencils and heat: the ``.npy`` file of the reference result, which a
            result must equal.
        steps: heat and the empty step: the steps of a timed run.
        group: the name ``--workloads`` selects it by (default: ``key``); the two sizes of the
            empty step share "empty_step".
        note: a remark for the report (a size that had to be reduced to fit).
    """

    key: str
    title: str
    kernel: str
    shape: tuple[int, ...]
    dtype: str
    chunk_rows: int
    task_batch: int = 1
    startup: bool = False
    on_disk: bool = False
    full_check: bool = True
    input: str = ""
    expected: str = ""
    steps: int = 0
    group: str = ""
    note: str = ""

    @property
    def block_function(self) -> Callable[[np.ndarray, int], None]:
        return BLOCK_FUNCTIONS[self.kernel]

    @property
    def kind(self) -> str:
        """What is computed: "fill", "stencil", "heat", "empty_step", "reduction", "normals"."""
        return KINDS[self.kernel]

    @property
    def name(self) -> str:
        """The name ``--workloads`` selects this workload by."""
        return self.group or self.key

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
    def row_elements(self) -> int:
        """Elements per row (1 for a 1-d shape)."""
        return math.prod(self.shape[1:])

    @property
    def chunk_bytes(self) -> int:
        """Bytes of a chunk (0 for "auto" chunks: MemmapPool's own choice)."""
        return self.chunk_rows * self.row_elements * np.dtype(self.dtype).itemsize

    @property
    def n_chunks(self) -> int:
        """Chunks of the output (0 for "auto" chunks)."""
        return -(-self.shape[0] // self.chunk_rows) if self.chunk_rows else 0

    @property
    def ram_bytes(self) -> int:
        """Bytes of the files one approach's run keeps in the RAM directory at a time."""
        kind = self.kind
        if kind == "stencil":
            return 3 * self.nbytes  # input, expected, output
        if kind == "heat":
            return 5 * self.nbytes  # initial, expected, two buffers, the result of a peer
        if kind == "empty_step":
            return 2 * self.nbytes  # two buffers; the initial state is a sparse file
        if kind == "reduction":
            return 0  # the input is on a disk; nothing is written
        return self.nbytes

    def starts(self) -> range:
        """First row of every chunk."""
        return range(0, self.shape[0], self.chunk_rows)

    def rows_at(self, start: int) -> int:
        return min(self.chunk_rows, self.shape[0] - start)


def full_workloads(out_of_core_bytes: int | None = None) -> list[Workload]:
    """The sizes of a real run (2 workers on a 2-core machine)."""
    workloads = [titled(w) for w in _templates()]
    if out_of_core_bytes:
        workloads.append(out_of_core(out_of_core_bytes))
    return workloads


def _templates() -> list[Workload]:
    """The workloads of a full run, the sizes in their titles not filled in (:func:`titled`)."""
    return [
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
        Workload(
            "heat",
            "Heat equation, {size} state: {steps} explicit steps (5-point stencil, alpha "
            f"{HEAT_ALPHA:g}, edge boundary), pool started",
            "heat",
            (4096, 4096),
            "float64",
            chunk_rows=64,  # what iterate's chunks="auto" gives this state: 2 MiB chunks
            steps=HEAT_STEPS,
        ),
        Workload(
            "empty_step_small",
            "Empty step, {size} state: iterate with a kernel that does nothing, time per step, "
            "pool started",
            "noop",
            (512, 512),
            "float64",
            chunk_rows=0,
            steps=EMPTY_STEPS,
            group="empty_step",
        ),
        Workload(
            "empty_step_large",
            "Empty step, {size} state: iterate with a kernel that does nothing, time per step, "
            "pool started",
            "noop",
            (16384, 16384),
            "float64",
            chunk_rows=0,
            steps=EMPTY_STEPS,
            group="empty_step",
        ),
        _reduction_template(REDUCTION_BYTES),
        Workload(
            "normals",
            "{count} standard normal random numbers (float64), pool started",
            "normals",
            (200_000_000,),
            "float64",
            chunk_rows=0,
        ),
    ]


def titled(w: Workload) -> Workload:
    """``w`` with the sizes in its title filled in (``{size}``, ``{count}`` of elements,
    ``{steps}``)."""
    n = math.prod(w.shape)
    count = f"{n / 1e6:g} M" if n >= 10**6 else f"{n:,}"
    title = w.title.replace("{size}", format_size(w.nbytes)).replace("{count}", count)
    title = title.replace("{steps}", str(w.steps))
    return replace(w, title=title)


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


def resize_reduction(nbytes: int, note: str) -> Workload:
    """The full run's reduction over ``nbytes`` instead (the most that fits), with ``note``."""
    return titled(replace(_reduction_template(nbytes), note=note))


def _reduction_template(nbytes: int) -> Workload:
    """The reduction over a float64 array of ``nbytes`` (rounded down to whole elements)."""
    n = max(1, nbytes // 8)
    return Workload(
        "reduction",
        "Reduction: float64 sum of a {size} .npy file on a disk, page cache warm, pool started",
        "sum",
        (n,),
        "float64",
        chunk_rows=0,
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
        "heat": {"shape": (64, 48), "chunk_rows": 24, "steps": 5},
        # The full run's steps: the time per step is a difference, which needs them.
        "empty_step_small": {"shape": (16, 32)},
        "empty_step_large": {"shape": (256, 256)},
        # Odd element counts: MemmapPool's chunks do not divide them.
        "reduction": {"shape": (3_000_017,)},
        "normals": {"shape": (2_000_003,)},
    }
    out = [
        titled(replace(w, **small[w.key]))  # type: ignore[arg-type]
        for w in _templates()
    ]
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
    whole output. For a reduction, the serial sum of its file (which also reads the file into
    the page cache, before anything is timed). Nothing for the other kinds: a stencil's and
    heat's results are compared with a reference result written as a file
    (:func:`write_files`), the normals' by their statistics.
    """
    if w.kind == "reduction":
        return {"sum": np.asarray(np.load(w.input, mmap_mode="r").sum(dtype=np.float64))}
    if w.kind != "fill":
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


def check_run(w: Workload, result: Any, ref: dict[str, np.ndarray]) -> tuple[str | None, str]:
    """``(problem, fingerprint)`` of one run's result: ``problem`` is None when ``result``
    matches the reference, else what is wrong (for the report); ``fingerprint`` is the same
    for two runs only if they gave the same bits ("" where it is not compared: kinds whose
    results are compared with a reference exactly)."""
    if w.kind == "reduction":
        return check_sum(result, ref["sum"]), _sum_fingerprint(result)
    problem = check(w, result, ref)
    if w.kind == "normals":
        if problem:
            return problem, ""
        return check_normals(result)
    return problem, ""


def check(w: Workload, result: Any, ref: dict[str, np.ndarray]) -> str | None:
    """None when ``result`` matches the reference, else what is wrong (for the report).

    A reduction's and the normals' statistics are checked by :func:`check_run`; here their
    shape and dtype only.
    """
    if w.kind == "reduction":
        return check_sum(result, ref["sum"])
    if tuple(result.shape) != w.shape:
        return f"shape {tuple(result.shape)}, expected {w.shape}"
    if np.dtype(result.dtype) != np.dtype(w.dtype):
        return f"dtype {result.dtype}, expected {w.dtype}"
    if w.kind in ("stencil", "heat"):
        return check_equal(result, np.load(w.expected, mmap_mode="r"))
    if w.kind in ("empty_step", "normals"):
        # The empty step's kernel writes nothing: the shape and dtype are what there is.
        return None
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
"""Rows compared at a time in :func:`check_equal` (and elements read at a time by
:func:`check_normals`)."""


def check_sum(result: Any, expected: np.ndarray) -> str | None:
    """None when the sum ``result`` is the serial sum ``expected`` to rounding.

    The order of the additions differs between approaches (chunk partials, a tree of partials,
    numpy's pairwise sum), so the sums agree to a relative :data:`SUM_RTOL`, not bit for bit.
    """
    if np.ndim(result) != 0:
        return f"a sum of shape {np.shape(result)}, expected a scalar"
    got, want = float(result), float(expected)
    if not math.isclose(got, want, rel_tol=SUM_RTOL, abs_tol=0.0):
        return f"sum {got!r}, expected {want!r} (relative difference {abs(got - want) / abs(want):.3g})"
    return None


def _sum_fingerprint(result: Any) -> str:
    return float(result).hex() if np.ndim(result) == 0 else ""


def check_normals(result: Any) -> tuple[str | None, str]:
    """Moments of standard normals, and a digest of their bits, in one pass slab by slab.

    The mean must be within :func:`normals_tolerance` of 0 and the standard deviation within
    it of 1; the digest (SHA-1 of the bytes) tells whether another run gave the same values.
    """
    flat = result.reshape(-1)
    n = flat.size
    step = max(1, CHECK_SLAB_BYTES // flat.itemsize)
    total = squares = 0.0
    digest = hashlib.sha1(usedforsecurity=False)
    for start in range(0, n, step):
        slab = np.ascontiguousarray(flat[start : start + step])
        total += float(slab.sum(dtype=np.float64))
        squares += float(np.dot(slab, slab))
        digest.update(memoryview(slab).cast("B"))
    mean = total / n
    std = math.sqrt(max(squares / n - mean * mean, 0.0))
    tol = normals_tolerance(n)
    if not (abs(mean) <= tol and abs(std - 1.0) <= tol) or not math.isfinite(std):
        return (
            f"mean {mean:.3g}, standard deviation {std:.6g}: not standard normal (tolerance {tol:.3g})",
            "",
        )
    return None, digest.hexdigest()


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


def write_image(path: str, shape: tuple[int, ...], dtype: str, seed: int = IMAGE_SEED) -> None:
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


# -- the other kinds' files ------------------------------------------------------------------------


def write_random(path: str, shape: tuple[int, ...], seed: int) -> None:
    """A ``.npy`` file of float64 uniform random numbers in [0, 1), written slab by slab (each
    slab from a generator of its own, seeded with ``[seed, first element]``)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=shape)
    flat = out.reshape(-1)
    step = CHECK_SLAB_BYTES // 8
    for start in range(0, flat.size, step):
        stop = min(start + step, flat.size)
        np.random.default_rng([seed, start]).random(out=flat[start:stop])
    out.flush()
    del flat, out


def write_files(w: Workload, ram_dir: str, disk_dir: str | None) -> Workload:
    """Write what workload ``w`` reads, and its reference result where it has one, before
    anything is timed; ``w`` with their paths.

    - stencil: the input image (and the smaller one of its warm-up) and the serial blur, in
      ``ram_dir``;
    - heat: the initial state and :func:`heat_reference` of it, in ``ram_dir``;
    - empty step: the initial state, a sparse file of zeros in ``ram_dir`` (the kernel never
      reads it, so it takes no memory);
    - reduction: the array, in ``disk_dir``, made durable (fsync) so that no write-back runs
      while anything is timed; :func:`reference` then reads it once, which warms the page
      cache.
    """
    if w.stencil:
        return write_stencil_files(w, ram_dir)
    if w.kind == "heat":
        path = os.path.join(ram_dir, f"{w.key}.initial.npy")
        write_random(path, w.shape, HEAT_SEED)
        expected = os.path.join(ram_dir, f"{w.key}.expected.npy")
        np.save(expected, heat_reference(np.load(path, mmap_mode="r"), w.steps))
        return replace(w, input=path, expected=expected)
    if w.kind == "empty_step":
        path = os.path.join(ram_dir, f"{w.key}.initial.npy")
        np.lib.format.open_memmap(path, mode="w+", dtype=w.dtype, shape=w.shape).flush()
        return replace(w, input=path)
    if w.kind == "reduction":
        path = os.path.join(disk_dir or ram_dir, f"{w.key}.input.npy")
        write_random(path, w.shape, REDUCTION_SEED)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return replace(w, input=path)
    return w


def mini(w: Workload) -> Workload:
    """What warms up a started pool (imports, the first mapping) before the timed runs.

    Two chunks of a fill or a stencil; two steps of heat and of the empty step; the whole of a
    reduction (which also warms the page cache) and of the normals: the fingerprint of that
    run is the first one the timed runs must reproduce.
    """
    if w.kind in ("reduction", "normals"):
        return w
    if w.kind in ("heat", "empty_step"):
        return replace(w, steps=2, expected="")
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
