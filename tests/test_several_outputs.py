"""Kernels that write several outputs at once (``outputs=[Output(...), ...]``): values,
dtypes, trailing axes, every kind of output, resume, and the errors before any work."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy.ndimage import correlate

from memmap_pool import Halo, MemmapPool, Output

IMG = np.random.default_rng(7).random((123, 45)).astype("float32")


def mean_and_square(outs, chunk, img):
    """A 3x3 local mean (exact: a correlation) and the pixel squared."""
    mean, square = outs
    weights = np.full((3, 3), 1 / 9, dtype="float32")
    mean[...] = correlate(img, weights, mode="nearest")[chunk.interior(0)]
    square[...] = img[chunk.interior(0)] ** 2


def rgb_and_mask(outs, chunk, img):
    """A per-pixel RGB output (a trailing axis) beside a boolean mask."""
    rgb, mask = outs
    rgb[...] = img[..., None] * np.array([1, 2, 3], dtype="float64")
    mask[...] = img > 0.5


def where_am_i(outs, chunk):
    """Each output gets its chunk's index: shows every output covers the same region."""
    for out in outs:
        out[...] = chunk.index


def test_two_outputs_of_different_dtypes_with_a_halo_input(fork_pool):
    """Each output holds what the kernel wrote, in its own dtype; a tuple comes back."""
    mean, square = fork_pool.map_chunks(
        mean_and_square,
        IMG.shape,
        outputs=[Output("float32"), Output("float64")],
        inputs=[Halo(IMG, 1, "edge")],
        chunks=(17, 20),
    )
    weights = np.full((3, 3), 1 / 9, dtype="float32")
    assert mean.dtype == np.float32
    assert square.dtype == np.float64
    assert np.array_equal(mean, correlate(IMG, weights, mode="nearest"))
    assert np.array_equal(square, (IMG**2).astype("float64"))
    assert not mean.flags.writeable
    assert not square.flags.writeable


def test_an_output_with_trailing_axes_is_chunked_on_the_call_axes_only(fork_pool):
    """An output of shape (*shape, 3) gets whole trailing axes per chunk."""
    rgb, mask = fork_pool.map_chunks(
        rgb_and_mask,
        IMG.shape,
        outputs=[Output("float64", shape=(*IMG.shape, 3)), Output("bool")],
        inputs=[IMG],
        chunks=10,
    )
    assert rgb.shape == (*IMG.shape, 3)
    assert np.array_equal(rgb, IMG[..., None] * np.array([1.0, 2.0, 3.0]))
    assert np.array_equal(mask, IMG > 0.5)


def test_a_subarray_dtype_adds_trailing_axes_to_its_output(fork_pool):
    """Output("3f8") is an output with a trailing axis of 3, as numpy's rule says."""
    idx, rgb = fork_pool.map_chunks(
        where_am_i, (40, 7), outputs=[Output("int32"), Output("3f8")], chunks=(9, 7)
    )
    assert rgb.shape == (40, 7, 3)
    assert rgb.dtype == np.float64
    assert np.array_equal(rgb, np.repeat(idx[..., None], 3, axis=-1))
    assert np.array_equal(idx[:, 0], np.arange(40) // 9)


def test_outputs_may_have_their_own_layout(fork_pool):
    """An F-ordered output beside a C-ordered one: both hold the same values."""
    c, f = fork_pool.map_chunks(
        where_am_i, (50, 33), outputs=[Output("int64"), Output("int64", order="F")], chunks=(8, 11)
    )
    assert f.flags.f_contiguous
    assert c.flags.c_contiguous
    assert np.array_equal(c, f)
    assert len(np.unique(c)) == 7 * 3


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_several_outputs_under_other_start_methods(start_method):
    """The tuple of views reaches kernels in workers started by forkserver and spawn."""
    with MemmapPool(2, mp_context=start_method) as pool:
        a, b = pool.map_chunks(
            lambda outs, chunk: [o.fill(k + 1) for k, o in enumerate(outs)],
            (64, 8),
            outputs=[Output("u1"), Output("f4", shape=(64, 8, 2))],
            chunks=16,
        )
    assert (np.asarray(a) == 1).all()
    assert (np.asarray(b) == 2).all()


def test_npy_and_in_place_outputs_beside_a_temporary_one(fork_pool, tmp_path):
    """Each output's out= means what out= means for one output."""
    inplace = np.lib.format.open_memmap(tmp_path / "inplace.npy", "w+", "int64", (30, 4))
    inplace[:] = 100
    inplace.flush()

    def kernel(outs, chunk):
        temp, npy, mem = outs
        temp[...] = chunk.index
        npy[...] = chunk.index * 2
        mem[...] += chunk.index  # an in-place output: the kernel sees its values

    temp, _npy, mem = fork_pool.map_chunks(
        kernel,
        (30, 4),
        outputs=[
            Output("int64"),
            Output("int64", out=str(tmp_path / "b.npy")),
            Output("int64", out=inplace),
        ],
        chunks=7,
    )
    assert mem is inplace
    assert np.array_equal(np.load(tmp_path / "b.npy"), 2 * np.asarray(temp))
    assert np.array_equal(np.asarray(inplace), 100 + np.asarray(temp))
    assert not os.path.exists(tmp_path / "b.npy.journal")


def test_resume_continues_every_npy_output_from_their_journals(tmp_path):
    """A job killed part way resumes: the chunks done are not run again, and both .npy
    outputs end complete."""
    a_path, b_path = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    outputs = [Output("int64", out=a_path), Output("float32", out=b_path, shape=(60, 3, 2))]

    def kernel(outs, chunk, fail_at=None):
        if chunk.index == fail_at:
            raise RuntimeError("interrupted")
        a, b = outs
        a[...] = chunk.index + 1
        b[...] = -(chunk.index + 1)

    with MemmapPool(1, mp_context="fork") as pool:
        with pytest.raises(RuntimeError, match="interrupted"):
            pool.map_chunks(kernel, (60, 3), outputs=outputs, chunks=(6, 3), kwargs={"fail_at": 4})
        assert os.path.exists(a_path + ".journal")
        assert os.path.exists(b_path + ".journal")
        job = pool.submit_chunks(kernel, (60, 3), outputs=outputs, chunks=(6, 3), resume=True)
        a, b = job.result(timeout=60)
        assert job.stats.chunks_resumed > 0
    expected = np.repeat(np.arange(1, 11), 6)[:, None] * np.ones((1, 3), dtype="int64")
    assert np.array_equal(a, expected)
    assert np.array_equal(b, -np.repeat(expected[..., None], 2, axis=-1).astype("float32"))
    assert not os.path.exists(a_path + ".journal")
    assert not os.path.exists(b_path + ".journal")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"outputs": [Output("f4")], "dtype": "f4"},
            TypeError,
            r"outputs= and dtype= can't be given together",
        ),
        (
            {"outputs": [Output("f4")], "out": "x.npy"},
            TypeError,
            r"outputs= and out= can't be given together",
        ),
        ({"outputs": []}, TypeError, r"non-empty list of Output"),
        ({"outputs": ["f4"]}, TypeError, r"outputs\[0\] must be an Output"),
        (
            {"outputs": [Output("f4"), Output("f4", shape=(3, 10))]},
            ValueError,
            r"outputs\[1\] has shape \(3, 10\), which does not start with the job's shape",
        ),
        (
            {"outputs": [Output("f4"), Output("f4", out="o.txt")]},
            ValueError,
            r"outputs\[1\]\.out: out must be a path ending in \.npy",
        ),
        (
            {"outputs": [Output("f4", out="same.npy"), Output("f8", out="same.npy")]},
            ValueError,
            r"outputs\[0\] and outputs\[1\] are the same file",
        ),
        (
            {"outputs": [Output("f4"), Output("f4", out="r.npy")], "resume": True},
            ValueError,
            r"resume=True needs every output's out= to be a \.npy path",
        ),
    ],
)
def test_bad_outputs_are_refused_before_any_work(fork_pool, tmp_path, kwargs, error, match):
    """Each mistake is a clear error naming the output, and nothing is created."""
    os.chdir(tmp_path)
    ran = []
    with pytest.raises(error, match=match):
        fork_pool.map_chunks(lambda outs, chunk: ran.append(1), (10, 4), **kwargs)
    assert os.listdir(tmp_path) == []


def test_a_bad_output_dtype_is_refused_when_the_output_is_described():
    """Output() checks its dtype at once."""
    with pytest.raises(TypeError, match="not a numpy dtype"):
        Output("not-a-dtype")


def test_an_in_place_output_of_the_wrong_shape_names_the_output(fork_pool, tmp_path):
    """The checks of out= apply to each output, and say which one failed."""
    wrong = np.lib.format.open_memmap(tmp_path / "w.npy", "w+", "int64", (5, 5))
    with pytest.raises(ValueError, match=r"outputs\[1\]\.out: out has shape \(5, 5\)"):
        fork_pool.map_chunks(
            lambda outs, chunk: None, (10, 4), outputs=[Output("i8"), Output("i8", out=wrong)]
        )


def test_an_empty_trailing_axis_beside_a_real_output(fork_pool):
    """An output with a zero-length trailing axis is returned empty; the other is filled."""
    full, empty = fork_pool.map_chunks(
        where_am_i, (12,), outputs=[Output("i4"), Output("f8", shape=(12, 0))], chunks=5
    )
    assert empty.shape == (12, 0)
    assert np.array_equal(full, np.arange(12) // 5)
