"""Bad arguments are refused with a clear TypeError or ValueError naming the offending value,
before any work starts and before any file is touched; a full disk is refused the same way."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from memmap_pool import MemmapPool, NotEnoughSpaceError

SHAPE = (10, 4)


def mark_and_fill(out, chunk, *inputs, marker):
    """A kernel that leaves a trace, so a test can tell that it ran."""
    with open(marker, "a") as f:
        f.write(f"{chunk.index}\n")
    out[...] = 1


class Scene:
    """A pool whose temp dir, a pre-existing .npy output and a marker file are watched."""

    def __init__(self, tmp_path):
        self.temp = tmp_path / "pool-temp"
        self.temp.mkdir()
        self.out = tmp_path / "out.npy"
        np.save(self.out, np.full(SHAPE, 7.0))
        self.out_bytes = self.out.read_bytes()
        self.marker = tmp_path / "kernel-ran"
        self.pool = MemmapPool(2, mp_context="fork", temp_dir=self.temp)

    def call(self, **overrides):
        arguments = {
            "fn": mark_and_fill,
            "shape": SHAPE,
            "dtype": "float64",
            "out": str(self.out),
            "kwargs": {"marker": str(self.marker)},
        }
        arguments.update(overrides)
        fn, shape = arguments.pop("fn"), arguments.pop("shape")
        return self.pool.map_chunks(fn, shape, **arguments)

    def assert_untouched(self):
        assert not self.marker.exists(), "the kernel ran"
        assert self.out.read_bytes() == self.out_bytes, "the existing output was changed"
        assert not os.path.exists(f"{self.out}.journal")
        assert os.listdir(self.temp) == [], "files were created in the temp dir"
        assert sorted(os.listdir(self.out.parent)) == ["out.npy", "pool-temp"]


@pytest.fixture
def scene(tmp_path):
    s = Scene(tmp_path)
    try:
        yield s
    finally:
        s.pool.shutdown()


BAD_ARGUMENTS = [
    # shape
    ("shape-negative", {"shape": (-1, 4)}, ValueError, r"\(-1, 4\)"),
    ("shape-float", {"shape": (2.5, 4)}, TypeError, r"2\.5"),
    ("shape-bool", {"shape": (True, 4)}, TypeError, r"True"),
    ("shape-none", {"shape": (None, 4)}, TypeError, r"None"),
    ("shape-string", {"shape": "10x4"}, TypeError, r"10x4"),
    ("shape-float-scalar", {"shape": 10.0}, TypeError, r"10\.0"),
    # dtype and order
    ("dtype-object", {"dtype": object}, TypeError, r"object"),
    ("dtype-unknown", {"dtype": "float99"}, TypeError, r"float99"),
    ("dtype-no-size", {"dtype": "S"}, TypeError, r"S0"),
    ("order", {"order": "K"}, ValueError, r"'K'"),
    # chunks
    ("chunks-too-large", {"chunks": 11}, ValueError, r"chunks=11.*\b10\b"),
    ("chunks-zero", {"chunks": 0}, ValueError, r"chunks=0"),
    ("chunks-negative", {"chunks": -3}, ValueError, r"-3"),
    ("chunks-block-too-large", {"chunks": (5, 9)}, ValueError, r"\(5, 9\)"),
    ("chunks-block-zero", {"chunks": (0, 2)}, ValueError, r"\(0, 2\)"),
    ("chunks-too-few-axes", {"chunks": (5,)}, ValueError, r"\(5,\).*1 axes"),
    ("chunks-too-many-axes", {"chunks": (5, 2, 1)}, ValueError, r"\(5, 2, 1\)"),
    ("chunks-float", {"chunks": 2.5}, TypeError, r"2\.5"),
    ("chunks-float-in-tuple", {"chunks": (2.5, None)}, TypeError, r"2\.5"),
    ("chunks-bool", {"chunks": True}, TypeError, r"True"),
    ("chunks-unknown-word", {"chunks": "big"}, ValueError, r"'big'"),
    # fn
    ("fn-int", {"fn": 42}, TypeError, r"42"),
    ("fn-none", {"fn": None}, TypeError, r"None"),
    ("fn-string", {"fn": "mark_and_fill"}, TypeError, r"mark_and_fill"),
    # inputs
    ("inputs-shape", {"inputs": [np.zeros((9, 4))]}, ValueError, r"\(9, 4\).*\(10, 4\)"),
    ("inputs-missing-axis", {"inputs": [np.zeros(10)], "chunks": (5, 2)}, ValueError, r"\(10,\)"),
    ("inputs-nested-list", {"inputs": [[1, 2, 3]]}, TypeError, r"list"),
    ("inputs-int", {"inputs": 42}, TypeError, r"int"),
    ("inputs-object-array", {"inputs": [np.empty(SHAPE, dtype=object)]}, TypeError, r"object"),
    ("inputs-not-npy", {"inputs": ["table.csv"]}, ValueError, r"table\.csv"),
    ("inputs-missing-npy", {"inputs": ["nowhere.npy"]}, FileNotFoundError, r"nowhere\.npy"),
    # out (given instead of the existing .npy path)
    ("out-ndarray", {"out": np.zeros(SHAPE)}, TypeError, r"np\.memmap"),
    ("out-txt", {"out": "result.txt"}, ValueError, r"result\.txt"),
    ("out-int", {"out": 42}, TypeError, r"int"),
    # retries, timeout and the rest
    ("retries-negative", {"retries": -1}, ValueError, r"-1"),
    ("retries-float", {"retries": 1.5}, ValueError, r"1\.5"),
    ("retries-bool", {"retries": True}, ValueError, r"True"),
    ("timeout-zero", {"timeout": 0}, ValueError, r"\b0\b"),
    ("timeout-negative", {"timeout": -2.5}, ValueError, r"-2\.5"),
    ("timeout-string", {"timeout": "5"}, ValueError, r"'5'"),
    ("resume-without-npy", {"resume": True, "out": None}, ValueError, r"resume"),
    ("args-int", {"args": 5}, TypeError, r"int"),
    ("kwargs-list", {"kwargs": [("marker", "x")]}, TypeError, r"list"),
    ("progress-word", {"progress": "maybe"}, ValueError, r"'maybe'"),
]


@pytest.mark.parametrize(
    ("overrides", "error", "match"), [pytest.param(o, e, m, id=i) for i, o, e, m in BAD_ARGUMENTS]
)
def test_bad_argument_is_refused_before_anything_is_touched(scene, overrides, error, match):
    """Each bad argument raises a clear error naming the value; nothing runs or is written."""
    with pytest.raises(error, match=match):
        scene.call(**overrides)
    scene.assert_untouched()
    # The pool is fine afterwards.
    assert scene.call(out=None).sum() == 40


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(
            lambda p: np.memmap(p, "float64", "r", shape=SHAPE), r"read-only", id="read-only"
        ),
        pytest.param(
            lambda p: np.memmap(p, "float64", "r+", shape=(5, 8)),
            r"\(5, 8\).*\(10, 4\)",
            id="wrong-shape",
        ),
        pytest.param(
            lambda p: np.memmap(p, "float32", "r+", shape=SHAPE),
            r"float32.*float64",
            id="wrong-dtype",
        ),
        pytest.param(
            lambda p: np.memmap(p, "float64", "c", shape=SHAPE),
            r"copy-on-write",
            id="copy-on-write",
        ),
        pytest.param(
            lambda p: np.memmap(p, "float64", "r+", shape=(10, 8))[:, ::2],
            r"contiguous",
            id="strided-view",
        ),
    ],
)
def test_unusable_memmap_out_is_refused_and_left_unchanged(scene, tmp_path, make, match):
    """A memmap out that is read-only, of another shape or dtype, copy-on-write or strided is
    refused, and its file is not written."""
    path = tmp_path / "target.bin"
    np.arange(80, dtype="float64").tofile(path)
    before = path.read_bytes()
    target = make(path)
    with pytest.raises(ValueError, match=match):
        scene.call(out=target)
    assert path.read_bytes() == before
    assert not scene.marker.exists()
    assert os.listdir(scene.temp) == []


def test_resume_with_a_memmap_out_is_refused(scene, tmp_path):
    """resume=True needs a .npy path: with an np.memmap out it is a ValueError."""
    target = np.lib.format.open_memmap(tmp_path / "t.npy", mode="w+", dtype="float64", shape=SHAPE)
    with pytest.raises(ValueError, match="resume"):
        scene.call(out=target, resume=True)
    assert not scene.marker.exists()
    assert not (tmp_path / "t.npy.journal").exists()


def test_missing_out_directory_is_refused_before_work(scene, tmp_path):
    """A .npy out in a directory that does not exist fails before the kernel runs."""
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scene.call(out=str(tmp_path / "nowhere" / "out.npy"))
    scene.assert_untouched()


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        pytest.param({"max_workers": 0}, ValueError, r"\b0\b", id="max-workers-zero"),
        pytest.param({"max_workers": 1.5}, ValueError, r"1\.5", id="max-workers-float"),
        pytest.param({"retries": -1}, ValueError, r"-1", id="retries"),
        pytest.param({"timeout": 0}, ValueError, r"\b0\b", id="timeout"),
        pytest.param({"worker_threads": 0}, ValueError, r"\b0\b", id="worker-threads"),
        pytest.param({"executor": "pool"}, TypeError, r"'pool'", id="executor"),
        pytest.param({"temp_dir": "/no/such/dir"}, ValueError, r"/no/such/dir", id="temp-dir"),
        pytest.param({"mp_context": "teleport"}, ValueError, r"teleport", id="mp-context"),
    ],
)
def test_bad_pool_options_are_refused_without_starting_workers(arguments, error, match):
    """MemmapPool's own options are checked before any process starts."""
    with pytest.raises(error, match=match):
        MemmapPool(**arguments)


# -- not enough space -----------------------------------------------------------------------------


def check_space_error(exc, directory, needed, free):
    assert isinstance(exc, OSError)
    assert exc.errno == errno.ENOSPC
    message = str(exc)
    assert str(directory) in message
    assert needed in message
    assert free in message
    assert exc.path == str(directory)


@pytest.mark.timeout(60)
def test_temp_output_larger_than_the_free_space_is_refused_before_work(tiny_tmpfs, tmp_path):
    """An 8 MiB output on a 1 MiB tmpfs raises NotEnoughSpaceError naming the directory, the
    size needed and the space free; no worker runs and nothing is left on the tmpfs."""
    marker = tmp_path / "kernel-ran"
    with MemmapPool(2, mp_context="fork", temp_dir=tiny_tmpfs) as pool:
        with pytest.raises(NotEnoughSpaceError) as info:
            pool.map_chunks(mark_and_fill, (1024, 1024), "float64", kwargs={"marker": str(marker)})
        check_space_error(info.value, tiny_tmpfs, "8.0 MiB", "1.0 MiB free")
        assert os.listdir(tiny_tmpfs) == []
        # A job that fits still runs in the same pool.
        small = pool.map_chunks(mark_and_fill, (64, 64), "float64", kwargs={"marker": str(marker)})
        assert small.sum() == 64 * 64
        del small
    assert os.listdir(tiny_tmpfs) == []


@pytest.mark.timeout(60)
def test_npy_output_larger_than_the_free_space_keeps_the_existing_file(tiny_tmpfs, tmp_path):
    """A .npy out that can't fit raises NotEnoughSpaceError and leaves the old file whole."""
    target = tiny_tmpfs / "result.npy"
    np.save(target, np.arange(10))
    before = target.read_bytes()
    marker = tmp_path / "kernel-ran"
    with (
        MemmapPool(2, mp_context="fork", temp_dir=tmp_path) as pool,
        pytest.raises(NotEnoughSpaceError) as info,
    ):
        pool.map_chunks(
            mark_and_fill, (1024, 512), "float64", out=target, kwargs={"marker": str(marker)}
        )
    check_space_error(info.value, tiny_tmpfs, "4.0 MiB", "free")
    assert not marker.exists()
    assert target.read_bytes() == before
    assert os.listdir(tiny_tmpfs) == ["result.npy"]


@pytest.mark.timeout(60)
def test_in_memory_input_too_large_for_the_temp_dir_is_refused(tiny_tmpfs, tmp_path):
    """An in-memory input that can't be written to the temp dir fails before work starts."""
    marker = tmp_path / "kernel-ran"
    with (
        MemmapPool(2, mp_context="fork", temp_dir=tiny_tmpfs) as pool,
        pytest.raises(NotEnoughSpaceError) as info,
    ):
        pool.map_chunks(
            mark_and_fill,
            (1024, 1),
            "float64",
            chunks=64,
            inputs=[np.zeros((1024, 256))],
            kwargs={"marker": str(marker)},
        )
    check_space_error(info.value, tiny_tmpfs, "2.0 MiB", "1.0 MiB free")
    assert not marker.exists()
    assert os.listdir(tiny_tmpfs) == []


@pytest.mark.parametrize(
    "option",
    [
        {"mp_context": "fork"},
        {"initializer": print},
        {"initargs": (1,)},
        {"worker_threads": 2},
        {"max_tasks_per_child": 5},
    ],
    ids=lambda o: next(iter(o)),
)
def test_worker_options_are_refused_with_a_user_executor(option):
    """Options that shape the pool's own worker processes are a ValueError naming the option
    when the pool runs on a user's executor, whose workers it does not start."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as executor:
        with pytest.raises(ValueError, match=next(iter(option))):
            MemmapPool(executor=executor, **option)
        # The executor is untouched and still usable.
        assert executor.submit(int, "3").result(timeout=10) == 3
