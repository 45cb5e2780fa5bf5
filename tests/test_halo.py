"""Halo inputs end to end, with real worker processes and real files: each chunk's view is
the same window of ``np.pad`` of the whole input (or of the input, clipped, for
``boundary="none"``); scipy.ndimage filters computed through halos equal the filter of the
whole array; inputs of every kind and start method; interior views are views of the
worker's mapping of the input file, not copies; a worker's memory stays within a few
chunks; bad arguments fail before any work; and halos work with jobs, retries and resume.
"""

from __future__ import annotations

import gc
import itertools
import mmap
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage as ndi

import faults
from helpers import BOUND, wait_until
from memmap_pool import Halo, MemmapPool
from memmap_pool._halo import border_copies, padded_shape, refresh_border

BOUNDARIES = ["none", "edge", "reflect", "symmetric", "wrap", -3]
"""Every boundary: the names, and a constant every dtype used here holds exactly."""

# (id, input shape, output shape, chunks, depth, dtype): the job's chunks split the output;
# the input follows them on the output's axes and is seen whole on its others.
LAYOUTS = [
    ("1d-rows", (23,), (23,), 5, 3, "float64"),
    ("1d-depth-beyond-the-array", (11,), (11,), 4, 30, "int32"),
    ("2d-rows-int-depth", (17, 9), (17, 9), 4, 2, "float32"),
    ("2d-blocks-tuple-depth-with-0", (17, 9), (17, 9), (5, 4), (3, 0), "int16"),
    ("2d-blocks-smaller-than-the-depth", (9, 7), (9, 7), (2, 2), 5, "float64"),
    ("2d-dict-depth", (12, 10), (12, 10), (4, 3), {0: 1, -1: 4}, "int64"),
    ("3d-blocks", (6, 5, 4), (6, 5, 4), (2, 3, None), (1, 2, 3), "float64"),
    ("3d-depth-beyond-every-axis", (5, 1, 4), (5, 1, 4), (2, None, 3), (6, 2, 9), "int32"),
    ("input-with-more-axes", (7, 5, 3), (7, 5), (3, 2), (1, 2, 1), "float32"),
    ("input-with-fewer-axes", (13,), (13, 4), 3, 2, "int64"),  # rows only: it lacks axis 1
    ("2d-auto-chunks", (40, 6), (40, 6), "auto", 3, "float64"),
]


# -- fixtures and references ----------------------------------------------------------------------


def nap_and_tell_pid(out, chunk):
    time.sleep(0.02)
    return os.getpid()


@pytest.fixture(scope="module")
def shared_pool(tmp_path_factory: pytest.TempPathFactory):
    """One two-worker fork pool for the tests that neither kill workers nor measure them,
    and its temp dir. Both workers are started here, so that the leak check of the first
    test using the pool doesn't count them as the test's."""
    temp = tmp_path_factory.mktemp("halo-pool")
    with MemmapPool(2, mp_context="fork", temp_dir=temp) as pool:

        def both_workers_ran() -> bool:
            job = pool.submit_chunks(nap_and_tell_pid, (8,), "uint8", chunks=1)
            return len(set(job.chunk_results(timeout=BOUND))) == 2

        assert wait_until(both_workers_ran), "the pool's two workers did not start"
        yield pool, temp


@pytest.fixture
def halo_pool(shared_pool) -> MemmapPool:
    """The module's shared pool."""
    return shared_pool[0]


def values(shape: tuple[int, ...], dtype: Any = "float64") -> np.ndarray:
    """An array whose elements all differ (so a window taken from the wrong place shows)."""
    return (np.arange(int(np.prod(shape))).reshape(shape) * 3 - 7).astype(dtype)


def per_axis(depth: Any, ndim: int) -> tuple[int, ...]:
    """A Halo depth (int, tuple or dict) as one int per axis of an ``ndim``-d input."""
    if isinstance(depth, int):
        return (depth,) * ndim
    if isinstance(depth, dict):
        return tuple(depth.get(a, depth.get(a - ndim, 0)) for a in range(ndim))
    return tuple(depth)


def pad_kwargs(boundary: Any) -> dict[str, Any]:
    """The ``np.pad`` arguments of a padding boundary."""
    if isinstance(boundary, str):
        return {"mode": boundary}
    return {"mode": "constant", "constant_values": boundary}


def expected_window(
    whole: np.ndarray, region: tuple[slice, ...], depth: tuple[int, ...], boundary: Any
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The view the kernel should get for ``region`` (the chunk's slices) and where the
    region lies in it: ``region ± depth`` of ``np.pad(whole, depth, mode)``, or of
    ``whole`` clipped at its edges for "none". Axes beyond the region's are seen whole."""
    lo, hi, interior = [], [], []
    for axis, (n, d) in enumerate(zip(whole.shape, depth)):
        start, stop = (region[axis].start, region[axis].stop) if axis < len(region) else (0, n)
        a, b = start - d, stop + d
        if boundary == "none":
            a, b = max(a, 0), min(b, n)
        lo.append(a)
        hi.append(b)
        interior.append(slice(start - a, stop - a))
    if boundary == "none":
        window = whole[tuple(slice(a, b) for a, b in zip(lo, hi))]
    else:
        padded = np.pad(whole, [(d, d) for d in depth], **pad_kwargs(boundary))
        window = padded[tuple(slice(a + d, b + d) for a, b, d in zip(lo, hi, depth))]
    return window, tuple(interior)


def own_region(whole: np.ndarray, region: tuple[slice, ...]) -> np.ndarray:
    """The chunk's region of an input (whole on the axes beyond the region's)."""
    return whole[region[: whole.ndim]]


def report_view(out, chunk, view):
    """Everything the parent needs to check a halo view (small arrays only)."""
    return chunk.index, chunk.slices, view.copy(), chunk.interior(0), view.flags.writeable


def laplacian(view: np.ndarray) -> np.ndarray:
    """The 5-point Laplacian of the interior of a view with a halo of 1 on both axes."""
    c = view[1:-1, 1:-1]
    return view[:-2, 1:-1] + view[2:, 1:-1] + view[1:-1, :-2] + view[1:-1, 2:] - 4 * c


def laplacian_kernel(out, chunk, view):
    """Write the Laplacian of the chunk's region, computed from its halo view."""
    assert chunk.interior(0) == (slice(1, 1 + out.shape[0]), slice(1, 1 + out.shape[1]))
    out[...] = laplacian(view)


def files_under(directory: Path) -> list[str]:
    """Every file and dir below ``directory``, as relative paths."""
    gc.collect()  # results of earlier jobs still referenced only by garbage
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# -- 1. the view is np.pad's window ---------------------------------------------------------------


@pytest.mark.parametrize("boundary", BOUNDARIES, ids=str)
@pytest.mark.parametrize(
    ("in_shape", "out_shape", "chunks", "depth", "dtype"),
    [pytest.param(*layout[1:], id=layout[0]) for layout in LAYOUTS],
)
def test_view_is_the_window_of_np_pad(
    halo_pool, in_shape, out_shape, chunks, depth, dtype, boundary
):
    """Each chunk's view is its region ± depth of np.pad(whole) (of whole, clipped, for
    "none"), read-only, with chunk.interior(0) locating the region's own values."""
    whole = values(in_shape, dtype)
    depths = per_axis(depth, whole.ndim)
    job = halo_pool.submit_chunks(
        report_view, out_shape, "uint8", chunks=chunks, inputs=[Halo(whole, depth, boundary)]
    )
    reports = job.chunk_results(timeout=BOUND)
    assert [r[0] for r in reports] == list(range(len(reports)))
    for index, region, view, interior, writeable in reports:
        window, where = expected_window(whole, region, depths, boundary)
        assert view.dtype == whole.dtype
        assert view.shape == window.shape, f"chunk {index} {region}"
        np.testing.assert_array_equal(view, window, err_msg=f"chunk {index} {region}")
        assert interior == where, f"chunk {index} {region}"
        np.testing.assert_array_equal(view[interior], own_region(whole, region))
        assert writeable is False


# -- 2. scipy.ndimage filters through halos -------------------------------------------------------

CORRELATE_WEIGHTS = np.arange(15.0).reshape(3, 5) - 7  # asymmetric: a flipped window shows

# name: (depth the filter needs, filter(x, mode, cval))
FILTERS = {
    # sigma 2, truncate 4: a radius of 8.
    "gaussian": (
        8,
        lambda x, mode, cval: ndi.gaussian_filter(x, 2, truncate=4.0, mode=mode, cval=cval),
    ),
    "median": (2, lambda x, mode, cval: ndi.median_filter(x, size=5, mode=mode, cval=cval)),
    "sobel": (1, lambda x, mode, cval: ndi.sobel(x, axis=0, mode=mode, cval=cval)),
    "correlate": (
        (1, 2),
        lambda x, mode, cval: ndi.correlate(x, CORRELATE_WEIGHTS, mode=mode, cval=cval),
    ),
}

# (Halo boundary, scipy mode): the same values beyond the edges. scipy's "wrap" and
# "grid-wrap" are the same for filters (they differ for interpolation only).
PADDED_MODES = [
    ("symmetric", "reflect"),
    ("reflect", "mirror"),
    ("edge", "nearest"),
    ("wrap", "grid-wrap"),
    ("wrap", "wrap"),
    (1.5, "constant"),
]

# The zero-copy route: boundary="none" (edge views clipped, never copied) and scipy
# extending the clipped view itself. Only modes that look at the near edge work so: "wrap"
# would wrap a clipped view onto itself instead of onto the array's far side.
CLIPPED_MODES = ["reflect", "mirror", "nearest", "constant"]

IMAGE = np.random.default_rng(7).random((48, 40))
IMAGE_CHUNKS = (20, 16)  # ragged on both axes: last blocks of 8 rows and 8 columns
CVAL = 1.5


@pytest.mark.parametrize(
    ("boundary", "mode"),
    [pytest.param(b, m, id=f"halo-{b}-scipy-{m}") for b, m in PADDED_MODES]
    + [pytest.param("none", m, id=f"halo-none-scipy-{m}") for m in CLIPPED_MODES],
)
@pytest.mark.parametrize("name", list(FILTERS))
def test_scipy_filter_through_halos_equals_the_whole_array_filter(halo_pool, name, boundary, mode):
    """A scipy.ndimage filter of each chunk's halo view, trimmed to its interior, equals
    the filter of the whole array exactly (of the padded array, for a constant halo),
    padded by the halo or by scipy itself."""
    depth, apply = FILTERS[name]
    cval = CVAL

    def kernel(out, chunk, view):
        out[...] = apply(view, mode, cval)[chunk.interior(0)]

    result = halo_pool.map_chunks(
        kernel, IMAGE.shape, IMAGE.dtype, chunks=IMAGE_CHUNKS, inputs=[Halo(IMAGE, depth, boundary)]
    )
    if boundary == cval:
        # scipy's "constant" pads each pass of a separable filter with cval (sobel smooths
        # its derivative's cval-padded rows, not the derivative of the padded image), so
        # the reference of np.pad's constant padding is the filter of the padded image.
        d = per_axis(depth, 2)
        padded = np.pad(IMAGE, [(n, n) for n in d], mode="constant", constant_values=cval)
        expected = apply(padded, mode, cval)[tuple(slice(n, n + m) for n, m in zip(d, IMAGE.shape))]
    else:
        expected = apply(IMAGE, mode, cval)
    assert np.array_equal(result, expected), np.abs(result - expected).max()


def test_uniform_filter_through_halos_equals_the_whole_array_filter_up_to_rounding(halo_pool):
    """uniform_filter through halos matches the whole-array filter to rounding only."""

    def kernel(out, chunk, view):
        out[...] = ndi.uniform_filter(view, size=7, mode="reflect")[chunk.interior(0)]

    result = halo_pool.map_chunks(
        kernel, IMAGE.shape, chunks=IMAGE_CHUNKS, inputs=[Halo(IMAGE, 3, "symmetric")]
    )
    # uniform_filter keeps a running sum along each line, so its rounding depends on where
    # the line starts: chunked results differ from the whole array's by ~1e-16, not exactly.
    np.testing.assert_allclose(
        result, ndi.uniform_filter(IMAGE, size=7, mode="reflect"), rtol=1e-12
    )


# -- 3. inputs of every kind ----------------------------------------------------------------------

STENCIL_SHAPE = (26, 11)
STENCIL_CHUNKS = (6, 4)


def stencil_reference(whole: np.ndarray) -> np.ndarray:
    return laplacian(np.pad(whole, 1, mode="edge"))


def make_input(kind: str, whole: np.ndarray, where: Path) -> Any:
    """``whole`` as an input of ``kind``, with its files (if any) in ``where``."""
    if kind == "array":
        return whole
    if kind in ("memmap", "memmap-transposed"):
        stored = whole if kind == "memmap" else whole.T
        mm = np.memmap(where / "input.bin", dtype=whole.dtype, mode="w+", shape=stored.shape)
        mm[...] = stored
        mm.flush()
        return mm if kind == "memmap" else mm.T  # a strided view, still mapped from its file
    npy = where / "input.npy"
    np.save(npy, np.asfortranarray(whole) if kind == "npy-fortran" else whole)
    if kind == "npy-loaded":
        return np.load(npy, mmap_mode="r")  # a memmap 128 bytes into its file
    return str(npy) if kind == "npy-str" else npy


@pytest.mark.parametrize(
    "kind",
    ["array", "memmap", "memmap-transposed", "npy-path", "npy-str", "npy-fortran", "npy-loaded"],
)
def test_halo_of_each_input_kind(halo_pool, tmp_path, kind):
    """A Halo of an in-memory array, an np.memmap (or a transposed view of one), a .npy
    path (Path or str, C or Fortran order) or an np.load'ed memmap gives the same stencil
    as the whole-array reference."""
    whole = values(STENCIL_SHAPE, "int64")
    result = halo_pool.map_chunks(
        laplacian_kernel,
        STENCIL_SHAPE,
        "int64",
        chunks=STENCIL_CHUNKS,
        inputs=[Halo(make_input(kind, whole, tmp_path), 1, "edge")],
    )
    np.testing.assert_array_equal(result, stencil_reference(whole))


def test_halo_beside_plain_inputs(halo_pool):
    """Between plain inputs, the Halo input gets its halo and the plain ones their region:
    chunk.interior(k) of a plain input covers its whole view."""
    shape = (20, 9)
    scale = values(shape, "int64") % 5
    offsets = values((*shape, 2), "int64") % 7
    image = values(shape, "int64")

    def kernel(out, chunk, s, view, o):
        assert s.shape == out.shape
        assert o.shape == (*out.shape, 2)
        out[...] = laplacian(view) * s + o.sum(axis=-1)
        return chunk.interior(0), chunk.interior(1), chunk.interior(2), s.shape, o.shape

    job = halo_pool.submit_chunks(
        kernel,
        shape,
        "int64",
        chunks=(6, 4),
        inputs=[scale, Halo(image, 1, "edge"), offsets],
    )
    for first, halo, third, s_shape, o_shape in job.chunk_results(timeout=BOUND):
        assert first == tuple(slice(0, n) for n in s_shape)
        assert third == tuple(slice(0, n) for n in o_shape)
        assert halo == tuple(slice(1, 1 + n) for n in s_shape)
    expected = stencil_reference(image) * scale + offsets.sum(axis=-1)
    np.testing.assert_array_equal(job.result(), expected)


def test_halo_of_an_input_with_more_axes_than_the_output(halo_pool, tmp_path):
    """A (H, W, 3) image with depth (2, 2, 0) under a (H, W) output: every chunk sees its
    rows and columns ± 2 and all three channels, reflected at the edges."""
    rgb = values((19, 14, 3), "int64") % 101
    np.save(tmp_path / "rgb.npy", rgb)

    def box_of_luminance(pixels: np.ndarray) -> np.ndarray:
        lum = pixels[..., 0] + 2 * pixels[..., 1] + pixels[..., 2]
        windows = np.lib.stride_tricks.sliding_window_view(lum, (5, 5))
        return windows.sum(axis=(-1, -2))

    def kernel(out, chunk, view):
        assert view.shape[2] == 3
        assert chunk.interior(0)[2] == slice(0, 3)
        out[...] = box_of_luminance(view)

    result = halo_pool.map_chunks(
        kernel,
        rgb.shape[:2],
        "int64",
        chunks=(5, 4),
        inputs=[Halo(tmp_path / "rgb.npy", (2, 2, 0), "reflect")],
    )
    expected = box_of_luminance(np.pad(rgb, ((2, 2), (2, 2), (0, 0)), mode="reflect"))
    np.testing.assert_array_equal(result, expected)


# -- 4. every start method ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_halo_job_under_each_start_method(pool, start_method):
    """Under fork, forkserver and spawn a closure kernel over a Halo input computes the
    same 3x3 maximum filter as numpy on the whole padded array, in the workers."""
    image = values((21, 13), "float32")
    size = 3

    def max_filter(x: np.ndarray) -> np.ndarray:
        return np.lib.stride_tricks.sliding_window_view(x, (size, size)).max(axis=(-1, -2))

    def kernel(out, chunk, view):
        out[...] = max_filter(view)
        return os.getpid()

    job = pool.submit_chunks(
        kernel, image.shape, "float32", chunks=(5, 6), inputs=[Halo(image, 1, "symmetric")]
    )
    pids = set(job.chunk_results(timeout=BOUND))
    assert os.getpid() not in pids
    np.testing.assert_array_equal(job.result(), max_filter(np.pad(image, 1, mode="symmetric")))


# -- 5. zero copy ---------------------------------------------------------------------------------


def mapped_from_file(view: np.ndarray, path: str) -> tuple[bool, bool]:
    """Whether ``view`` is a view of an mmap.mmap (following its bases), and whether all
    its bytes lie in a mapping of the file ``path`` (per /proc/self/maps)."""
    base: Any = view
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    lo = hi = view.__array_interface__["data"][0]
    hi += view.itemsize
    for n, stride in zip(view.shape, view.strides):
        if stride > 0:
            hi += (n - 1) * stride
        else:
            lo += (n - 1) * stride
    real = os.path.realpath(path)
    in_file = False
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == real:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                in_file = in_file or (start <= lo and hi <= end)
    return isinstance(base, mmap.mmap), in_file


def report_mapping(out, chunk, view, path):
    return chunk.index, chunk.slices, mapped_from_file(view, path)


@pytest.mark.parametrize("boundary", ["none", "reflect", 0.0], ids=str)
def test_interior_views_are_views_of_the_workers_mapping_of_the_input_file(
    halo_pool, tmp_path, boundary
):
    """Views inside the array are slices of the worker's mmap of the input file (no copy);
    views reaching beyond an edge are padded copies, except with boundary="none"."""
    shape, chunks, depth = (24, 20), (6, 5), 2
    path = tmp_path / "input.npy"
    np.save(path, values(shape))
    job = halo_pool.submit_chunks(
        report_mapping,
        shape,
        "uint8",
        chunks=chunks,
        inputs=[Halo(path, depth, boundary)],
        args=(str(path),),
    )
    interior_chunks = 0
    for index, region, (is_mmap, in_file) in job.chunk_results(timeout=BOUND):
        inside = all(s.start >= depth and s.stop + depth <= n for s, n in zip(region, shape))
        interior_chunks += inside
        if inside or boundary == "none":
            assert is_mmap, f"chunk {index} {region}: the view is not a view of the mmap"
            assert in_file, f"chunk {index} {region}: the view is not in the file's mapping"
        else:
            assert not is_mmap, f"chunk {index} {region}: an edge view should be a padded copy"
            assert not in_file, f"chunk {index} {region}: an edge view should be a padded copy"
    assert interior_chunks == 4  # the 2 x 2 blocks in the middle of the 4 x 4 grid


# -- 6. memory ------------------------------------------------------------------------------------


def memory_of_this_process() -> tuple[int, int]:
    """(resident bytes now: RssAnon + RssFile + RssShmem, peak resident bytes: VmHWM)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                fields[key] = int(rest.split()[0]) * 1024  # kB
    resident = fields["RssAnon"] + fields["RssFile"] + fields["RssShmem"]
    return resident, fields["VmHWM"]


def read_view_and_report_memory(out, chunk, view, step):
    """Read every element of the halo view, write every ``step``-th column of the region,
    and report this worker's memory."""
    assert np.isfinite(view.sum(dtype=np.float64))
    out[...] = view[chunk.interior(0)][:, ::step]
    resident, peak = memory_of_this_process()
    return os.getpid(), time.monotonic(), resident, peak


BIG_ROWS, BIG_WIDTH = 16384, 4096  # float32: 256 MiB
BIG_CHUNK_ROWS, BIG_DEPTH = 512, 16  # 8 MiB chunks, 16 rows of halo on each side


@pytest.fixture(scope="module")
def big_input(tmp_path_factory: pytest.TempPathFactory):
    """A 256 MiB float32 .npy whose rows hold their index, removed after the module."""
    path = tmp_path_factory.mktemp("big") / "big.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(BIG_ROWS, BIG_WIDTH))
    for start in range(0, BIG_ROWS, 1024):
        big[start : start + 1024] = np.arange(start, start + 1024, dtype="float32")[:, None]
    big.flush()
    del big
    yield path
    os.unlink(path)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "out_width",
    [
        pytest.param(BIG_WIDTH // 4, id="output-a-quarter-of-the-input-2MiB-chunks"),
        pytest.param(BIG_WIDTH // 64, id="output-1/64-of-the-input-128KiB-chunks"),
    ],
)
def test_worker_memory_stays_within_a_few_chunks_and_halos(fork_pool, big_input, out_width):
    """Over a 256 MiB input read chunk by chunk with halos, a worker's resident memory
    (and its peak) grows by a few chunks at most: the pages it read are released, whether
    the output's chunks are large or much smaller than the input's."""
    step = BIG_WIDTH // out_width
    job = fork_pool.submit_chunks(
        read_view_and_report_memory,
        (BIG_ROWS, out_width),
        "float32",
        chunks=BIG_CHUNK_ROWS,
        inputs=[Halo(big_input, (BIG_DEPTH, 0), "symmetric")],
        args=(step,),
    )
    reports = job.chunk_results(timeout=BOUND)
    assert len(reports) == BIG_ROWS // BIG_CHUNK_ROWS
    by_worker: dict[int, list[tuple[float, int, int]]] = {}
    for pid, when, resident, peak in reports:
        by_worker.setdefault(pid, []).append((when, resident, peak))
    view_bytes = (BIG_CHUNK_ROWS + 2 * BIG_DEPTH) * BIG_WIDTH * 4
    out_bytes = BIG_CHUNK_ROWS * out_width * 4
    bound = 4 * (view_bytes + out_bytes)  # <= 42 MiB; keeping every page read: ~128 MiB
    for pid, seen in by_worker.items():
        seen.sort()  # growth from the worker's first chunk of the job (not its start-up)
        growth = max(r for _, r, _ in seen) - seen[0][1]
        peak_growth = max(p for _, _, p in seen) - seen[0][2]
        what = f"worker {pid} over {len(seen)} chunks"
        assert growth < bound, f"{what}: resident memory grew by {growth >> 20} MiB"
        assert peak_growth < bound, f"{what}: peak memory grew by {peak_growth >> 20} MiB"
    result = job.result()
    expected = np.arange(BIG_ROWS, dtype="float32")[:, None].repeat(out_width, axis=1)
    np.testing.assert_array_equal(result, expected)
    del result


# -- 7. bad arguments, before any work -------------------------------------------------------------

INTS = np.arange(12, dtype="int64").reshape(4, 3)
FLOATS32 = np.arange(12, dtype="float32").reshape(4, 3)
BYTES = np.arange(12, dtype="uint8").reshape(4, 3)

BAD_HALOS = [
    pytest.param(lambda: Halo(INTS, -1), (4, 3), ValueError, r"depth.*-1", id="negative-depth"),
    pytest.param(lambda: Halo(INTS, 1.5), (4, 3), TypeError, r"depth.*1\.5", id="float-depth"),
    pytest.param(
        lambda: Halo(INTS, (1, -2)), (4, 3), ValueError, r"depth\[1\].*-2", id="negative-in-tuple"
    ),
    pytest.param(
        lambda: Halo(INTS, (1, 2, 3)),
        (4, 3),
        ValueError,
        r"inputs\[0\].*depth \(1, 2, 3\) has 3 entries.*2 axes",
        id="tuple-of-wrong-length",
    ),
    pytest.param(
        lambda: Halo(INTS, {2: 1}),
        (4, 3),
        ValueError,
        r"inputs\[0\].*depth \{2: 1\} names axis 2.*2 axes",
        id="dict-axis-missing",
    ),
    pytest.param(
        lambda: Halo(INTS, 1, "mirror"),
        (4, 3),
        ValueError,
        r"boundary.*'mirror'",
        id="unknown-name",
    ),
    pytest.param(
        lambda: Halo(INTS, 1, [0]), (4, 3), TypeError, r"boundary.*\[0\]", id="boundary-list"
    ),
    pytest.param(
        lambda: Halo(INTS, 1, 0.5),
        (4, 3),
        ValueError,
        r"inputs\[0\].*boundary=0\.5.*int64",
        id="half-for-int",
    ),
    pytest.param(
        lambda: Halo(BYTES, 1, 300), (4, 3), ValueError, r"boundary=300.*uint8", id="300-for-uint8"
    ),
    pytest.param(
        lambda: Halo(FLOATS32, 1, 0.1),
        (4, 3),
        ValueError,
        r"boundary=0\.1.*float32",
        id="0.1-for-float32",
    ),
    pytest.param(
        lambda: Halo(Halo(INTS, 1), 1), (4, 3), TypeError, r"another Halo", id="halo-of-halo"
    ),
    pytest.param(
        lambda: Halo(np.zeros((6, 0)), (1, 1), "edge"),
        (6,),
        ValueError,
        r"inputs\[0\].*boundary='edge'.*axis 1.*empty",
        id="padding-an-empty-axis",
    ),
]


@pytest.mark.parametrize(("make", "shape", "error", "match"), BAD_HALOS)
def test_bad_halo_is_refused_before_any_work(shared_pool, tmp_path, make, shape, error, match):
    """A bad depth or boundary, a Halo of a Halo, or padding an empty axis raises a clear
    error naming the argument and its value; no file is made, no kernel runs."""
    pool, temp = shared_pool
    marker = tmp_path / "ran"

    def must_not_run(out, chunk, *views):
        marker.touch()

    before = files_under(temp)
    with pytest.raises(error, match=match):
        pool.map_chunks(must_not_run, shape, "int64", chunks=2, inputs=[make()])
    assert files_under(temp) == before
    assert not marker.exists()


@pytest.mark.parametrize(
    ("dtype", "constant"),
    [
        ("float32", np.float32(0.1)),
        ("float32", 0.5),
        ("float32", np.nan),
        ("float64", 0.1),
        ("uint8", 255),
        ("int16", -300),
    ],
    ids=str,
)
def test_constant_the_dtype_holds_pads_with_that_value(halo_pool, dtype, constant):
    """A constant the input's dtype holds exactly (np.float32(0.1) for float32, nan, 255 for
    uint8) pads the edge views with that very value."""
    whole = values((7, 5), dtype)
    job = halo_pool.submit_chunks(
        report_view, whole.shape, "uint8", chunks=(3, 2), inputs=[Halo(whole, 2, constant)]
    )
    for index, region, view, _interior, _writeable in job.chunk_results(timeout=BOUND):
        window, _ = expected_window(whole, region, (2, 2), constant)
        assert view.dtype == whole.dtype
        assert np.array_equal(view, window, equal_nan=True), f"chunk {index} {region}"


@pytest.mark.parametrize("boundary", ["none", 0], ids=str)
def test_constant_or_no_boundary_may_have_depth_on_an_empty_axis(halo_pool, boundary):
    """With boundary "none" or a constant, depth on an empty axis of the input is allowed:
    the views are clipped to nothing, or hold only the constant, along it."""
    whole = np.zeros((6, 0), dtype="int16")
    job = halo_pool.submit_chunks(
        report_view, (6,), "uint8", chunks=2, inputs=[Halo(whole, (1, 2), boundary)]
    )
    for index, region, view, interior, _writeable in job.chunk_results(timeout=BOUND):
        window, where = expected_window(whole, region, (1, 2), boundary)
        assert view.shape == window.shape, f"chunk {index} {region}"
        np.testing.assert_array_equal(view, window)
        assert interior == where


# -- 8. chunk.interior out of range ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_inputs", "k", "match"),
    [
        (0, 0, r"chunk\.interior\(0\): the job has 0 inputs"),
        (1, 1, r"chunk\.interior\(1\): the job has 1 input(?!s)"),
        (2, 5, r"chunk\.interior\(5\): the job has 2 inputs"),
        (1, -2, r"chunk\.interior\(-2\): the job has 1 input(?!s)"),
    ],
)
def test_interior_of_an_input_the_job_lacks_raises_index_error(halo_pool, n_inputs, k, match):
    """chunk.interior(k) for a k beyond the job's inputs raises IndexError, naming how many
    inputs the job has; the job raises it."""
    inputs = [Halo(INTS, 1, "edge"), INTS][:n_inputs]
    with pytest.raises(IndexError, match=match):
        halo_pool.map_chunks(lambda out, chunk, *views: chunk.interior(k), (4, 3), inputs=inputs)


# -- 9. jobs, retries, resume ---------------------------------------------------------------------


def test_halo_input_with_submit_chunks_and_two_jobs_at_once(halo_pool):
    """Two jobs with Halo inputs of other depths and boundaries run at once; each Job's
    result, chunk results and progress are its own."""
    a = values((30, 8))
    b = values((25, 6)) * -1

    def shapes(out, chunk, view):
        out[...] = view[chunk.interior(0)] * 2
        return view.shape

    job_a = halo_pool.submit_chunks(shapes, a.shape, chunks=7, inputs=[Halo(a, 3, "wrap")])
    job_b = halo_pool.submit_chunks(shapes, b.shape, chunks=(5, 3), inputs=[Halo(b, 1)])
    assert job_a.chunk_results(timeout=BOUND) == [(13, 14)] * 4 + [(8, 14)]
    # boundary "none": clipped at the edges, so edge chunks' views are smaller.
    rows = [6, 7, 7, 7, 6]
    assert job_b.chunk_results(timeout=BOUND) == [(r, c) for r in rows for c in (4, 4)]
    np.testing.assert_array_equal(job_a.result(), a * 2)
    np.testing.assert_array_equal(job_b.result(), b * 2)
    assert tuple(job_a.progress) == (5, 5)
    assert tuple(job_b.progress) == (10, 10)


def laplacian_exit_once(out, chunk, view, marker, victim):
    """The Laplacian kernel, whose worker dies (os._exit) the first time it runs ``victim``."""
    if chunk.index == victim and faults.first_time(marker):
        os._exit(3)
    out[...] = laplacian(view)


@pytest.mark.timeout(60)
def test_halo_job_is_retried_after_a_worker_dies(fork_pool, tmp_path):
    """A worker that dies mid-job is replaced and its chunk re-run with the same halo
    view: the result equals the whole-array stencil."""
    whole = values(STENCIL_SHAPE, "int64")
    job = fork_pool.submit_chunks(
        laplacian_exit_once,
        STENCIL_SHAPE,
        "int64",
        chunks=STENCIL_CHUNKS,
        inputs=[Halo(whole, 1, "edge")],
        kwargs={"marker": str(tmp_path / "marker"), "victim": 5},
    )
    np.testing.assert_array_equal(job.result(timeout=BOUND), stencil_reference(whole))
    assert job.stats.retries == 1
    assert (tmp_path / "marker").exists()


def laplacian_logged(out, chunk, view, log, fail_on=None):
    """The Laplacian kernel, logging each chunk it finishes; raises on chunk ``fail_on``."""
    if chunk.index == fail_on:
        # A builtin type: faults.InjectedError would come back as a copy of the class, as
        # this kernel is pickled by reference and so never sends the parent's class.
        raise ValueError(f"injected failure in chunk {chunk.index}")
    out[...] = laplacian(view)
    faults.record(log, chunk.index)


def journal_flags(path: Path) -> np.ndarray:
    """The done-flags of the journal beside the .npy output ``path`` (one page of header,
    then one byte per chunk)."""
    with open(f"{path}.journal", "rb") as f:
        f.seek(mmap.PAGESIZE)
        return np.frombuffer(f.read(), dtype=np.uint8).copy()


@pytest.mark.timeout(60)
def test_halo_job_resumes_a_npy_output_after_a_failed_run(halo_pool, tmp_path):
    """A Halo job into out="x.npy" that fails on its last chunk, run again with
    resume=True, runs only the chunks its journal lacks and gives the whole stencil."""
    whole = values(STENCIL_SHAPE, "int64")
    out = tmp_path / "x.npy"
    count = 5 * 3  # STENCIL_CHUNKS over STENCIL_SHAPE

    def run(log: Path, fail_on: int | None = None, resume: bool = False) -> Any:
        return halo_pool.map_chunks(
            laplacian_logged,
            STENCIL_SHAPE,
            "int64",
            chunks=STENCIL_CHUNKS,
            inputs=[Halo(whole, 1, "edge")],
            out=out,
            resume=resume,
            kwargs={"log": str(log), "fail_on": fail_on},
        )

    with pytest.raises(ValueError, match=f"injected failure in chunk {count - 1}"):
        run(tmp_path / "first", fail_on=count - 1)
    done_first = set(np.flatnonzero(journal_flags(out)).tolist())
    assert done_first, "the failed run finished no chunk"
    assert count - 1 not in done_first
    result = run(tmp_path / "second", resume=True)
    assert sorted(faults.read_log(tmp_path / "second")) == sorted(set(range(count)) - done_first)
    np.testing.assert_array_equal(result, stencil_reference(whole))
    del result
    np.testing.assert_array_equal(np.load(out), stencil_reference(whole))


@pytest.mark.parametrize("mode", ["edge", "reflect", "symmetric", "wrap"])
@pytest.mark.parametrize(
    ("shape", "pad", "step"),
    [((5, 7), (1, 2), 2), ((1, 3), (3, 0), 1), ((6,), (9,), 4), ((3, 4, 5), (2, 1, 3), 2)],
)
def test_border_refreshed_chunk_by_chunk_is_np_pad(mode, shape, pad, step):
    """Chunks that partition a state, each refreshing the border cells it is the source of,
    give np.pad's border (pads deeper than the axis included), each cell written once."""
    state = np.random.default_rng(3).random(shape)
    padded = np.full(padded_shape(shape, pad), np.nan)
    padded[tuple(slice(p, p + n) for n, p in zip(shape, pad))] = state
    writes = np.zeros(padded.shape, dtype=int)
    starts = [range(0, n, step) for n in shape]
    for corner in itertools.product(*starts):
        region = tuple(slice(a, min(a + step, n)) for a, n in zip(corner, shape))
        copies = border_copies(shape, pad, region, mode)
        refresh_border(padded, copies)
        for dst, _src in copies:
            np.add.at(writes, dst, 1)
    assert np.array_equal(padded, np.pad(state, [(p, p) for p in pad], mode=mode))
    inside = tuple(slice(p, p + n) for n, p in zip(shape, pad))
    border = np.ones(padded.shape, dtype=bool)
    border[inside] = False
    assert (writes[border] == 1).all()
    assert (writes[inside] == 0).all()
