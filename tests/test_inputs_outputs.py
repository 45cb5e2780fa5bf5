"""Inputs of each kind and outputs of each kind: what the kernel sees, what is copied (only
in-memory inputs, once), where files go and with which permissions."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from memmap_pool import MemmapPool


def pool_files(chunk):
    """Names of the files in the pool's private dirs next to the chunk's (temp) output."""
    directory = os.path.dirname(chunk.path)
    return sorted(os.listdir(directory))


def copy_input(out, chunk, values):
    out[...] = values


def copy_input_and_list_files(out, chunk, values):
    out[...] = values
    return pool_files(chunk)


def inspect_input(out, chunk, values):
    """Report the input view's flags and shape, and check it is the chunk's region."""
    out[...] = values
    return {
        "writeable": values.flags.writeable,
        "shape": values.shape,
        "out_shape": out.shape,
        "slices": chunk.slices,
    }


def grid(shape, dtype="float64"):
    """An array whose values tell where each element is."""
    return np.arange(np.prod(shape), dtype=dtype).reshape(shape)


@pytest.fixture
def temp_pool(tmp_path):
    """A fork pool whose temporary files go to a directory of the test's own."""
    temp = tmp_path / "pool-temp"
    temp.mkdir()
    with MemmapPool(2, mp_context="fork", temp_dir=temp) as pool:
        yield pool, temp


def dumped_inputs(listings):
    return {name for names in listings for name in names if name.startswith("in")}


# -- inputs ---------------------------------------------------------------------------------------


def test_in_memory_input_is_written_once_and_removed_after_the_job(temp_pool):
    """An in-memory array is dumped to a single file that all chunks share, then removed."""
    pool, temp = temp_pool
    values = grid((40, 6))
    job = pool.submit_chunks(copy_input_and_list_files, values.shape, inputs=[values], chunks=5)
    listings = job.chunk_results(timeout=60)
    np.testing.assert_array_equal(job.result(), values)
    assert len(dumped_inputs(listings)) == 1
    (private,) = os.listdir(temp)
    assert not [name for name in os.listdir(temp / private) if name.startswith("in")]


def test_memmap_inputs_are_passed_by_reference(temp_pool, tmp_path):
    """np.memmap inputs (made directly or by np.load) are mapped from their own files."""
    pool, _ = temp_pool
    source = np.memmap(tmp_path / "source.bin", dtype="int32", mode="w+", shape=(30, 7))
    source[...] = grid((30, 7), "int32")
    source.flush()
    np.save(tmp_path / "saved.npy", source * 3)
    loaded = np.load(tmp_path / "saved.npy", mmap_mode="r")  # a memmap at offset 128
    job = pool.submit_chunks(
        lambda out, chunk, a, b: copy_input_and_list_files(out, chunk, a + b),
        (30, 7),
        "int32",
        inputs=[source, loaded],
        chunks=4,
    )
    listings = job.chunk_results(timeout=60)
    np.testing.assert_array_equal(job.result(), source * 4)
    assert dumped_inputs(listings) == set()


@pytest.mark.parametrize(
    "view",
    [
        pytest.param(lambda mm: mm[10:50], id="row-slice"),
        pytest.param(lambda mm: mm[5:45, 3:9], id="block"),
        pytest.param(lambda mm: mm[::2, ::3], id="strided"),
        pytest.param(lambda mm: mm.T[:, :40], id="transposed"),
    ],
)
def test_view_of_a_memmap_input_is_passed_by_reference(temp_pool, tmp_path, view):
    """A slice, a strided view or a transpose of a memmap is read in place, not copied."""
    pool, _ = temp_pool
    source = np.memmap(tmp_path / "source.bin", dtype="float64", mode="w+", shape=(80, 12))
    source[...] = grid((80, 12))
    source.flush()
    values = view(source)
    job = pool.submit_chunks(copy_input_and_list_files, values.shape, inputs=[values], chunks=3)
    listings = job.chunk_results(timeout=60)
    np.testing.assert_array_equal(job.result(), values)
    assert dumped_inputs(listings) == set()


def test_memmap_input_with_an_odd_file_offset_is_read_at_the_right_place(fork_pool, tmp_path):
    """A memmap that starts mid-page in its file (offset= not page-aligned) reads right."""
    path = tmp_path / "offset.bin"
    header = 4096 + 24
    full = np.arange(header // 8 + 200, dtype="float64")
    full.tofile(path)
    source = np.memmap(path, dtype="float64", mode="r", offset=header, shape=(20, 10))
    expected = full[header // 8 :].reshape(20, 10)
    result = fork_pool.map_chunks(copy_input, (20, 10), inputs=[source], chunks=3)
    np.testing.assert_array_equal(result, expected)


def test_reversed_memmap_view_input_is_read_correctly(fork_pool, tmp_path):
    """A view with negative strides (not mappable as is) still gives the right values."""
    source = np.memmap(tmp_path / "source.bin", dtype="int64", mode="w+", shape=(25, 4))
    source[...] = grid((25, 4), "int64")
    values = source[::-1]
    result = fork_pool.map_chunks(copy_input, (25, 4), "int64", inputs=[values], chunks=6)
    np.testing.assert_array_equal(result, values)


@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_path_input_is_passed_by_reference(temp_pool, tmp_path, order):
    """A .npy path (str or Path, C or Fortran order) is mapped from its file, not dumped."""
    pool, _ = temp_pool
    values = np.asarray(grid((33, 5)), order=order)
    path = tmp_path / "values.npy"
    np.save(path, values)
    for given in (path, str(path)):
        job = pool.submit_chunks(copy_input_and_list_files, values.shape, inputs=[given], chunks=4)
        listings = job.chunk_results(timeout=60)
        np.testing.assert_array_equal(job.result(), values)
        assert dumped_inputs(listings) == set()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: np.asfortranarray(a), id="fortran"),
        pytest.param(lambda a: a[:, ::2], id="strided"),
        pytest.param(lambda a: a.T.copy().T, id="transposed-copy"),
        pytest.param(lambda a: a[::-1, ::-1], id="reversed"),
    ],
)
def test_non_contiguous_in_memory_inputs_give_the_same_values(fork_pool, make):
    """Fortran-ordered, strided and reversed in-memory inputs are dumped with their values."""
    values = make(grid((24, 10)))
    result = fork_pool.map_chunks(copy_input, values.shape, inputs=[values], chunks=(5, 3))
    np.testing.assert_array_equal(result, values)


def test_input_views_are_read_only_and_cover_the_chunks_region(fork_pool, tmp_path):
    """Each input view has the chunk's shape, holds the chunk's values and can't be written."""
    in_memory = grid((21, 8))
    np.save(tmp_path / "second.npy", in_memory * 2)
    job = fork_pool.submit_chunks(
        lambda out, chunk, a, b: (
            inspect_input(out, chunk, a),
            not b.flags.writeable,
            np.array_equal(b, in_memory[chunk.slices] * 2),
        ),
        (21, 8),
        inputs=[in_memory, tmp_path / "second.npy"],
        chunks=(5, 3),
    )
    for info, second_read_only, second_equal in job.chunk_results(timeout=60):
        assert info["writeable"] is False
        assert second_read_only
        assert second_equal
        assert info["shape"] == info["out_shape"]
        assert info["shape"] == tuple(s.stop - s.start for s in info["slices"])
    np.testing.assert_array_equal(job.result(), in_memory)


def test_writing_an_input_view_raises_in_the_kernel(fork_pool):
    """A kernel that writes its input gets numpy's read-only error, with its own type."""
    with pytest.raises(ValueError, match="read-only"):
        fork_pool.map_chunks(
            lambda out, chunk, values: values.fill(0), (10,), inputs=[np.ones(10)], chunks=5
        )


def test_inputs_with_extra_trailing_axes_are_sliced_on_the_chunked_axes(fork_pool, tmp_path):
    """An input may have more axes than the output: the kernel sees them whole."""
    rgb = grid((30, 8, 3))
    np.save(tmp_path / "rgb.npy", rgb)

    def luminance(out, chunk, pixels):
        assert pixels.shape == (*out.shape, 3)
        out[...] = pixels.sum(axis=-1)

    for chunks in (7, (7, 3), "auto"):
        for given in (rgb, tmp_path / "rgb.npy"):
            result = fork_pool.map_chunks(luminance, (30, 8), inputs=[given], chunks=chunks)
            np.testing.assert_array_equal(result, rgb.sum(axis=-1))


def test_a_single_input_may_be_given_without_a_list(fork_pool):
    """inputs=array is one input, not a sequence of its rows."""
    values = grid((12, 4))
    result = fork_pool.map_chunks(copy_input, (12, 4), inputs=values, chunks=5)
    np.testing.assert_array_equal(result, values)


# -- outputs --------------------------------------------------------------------------------------


def fill_rows(out, chunk):
    rows = chunk.slices[0]
    out[...] = np.arange(rows.start, rows.stop).reshape((-1,) + (1,) * (out.ndim - 1))


def test_npy_output_is_created_and_readable_with_np_load(fork_pool, tmp_path):
    """out="x.npy" writes a .npy that np.load maps; the resume journal is gone afterwards."""
    path = tmp_path / "result.npy"
    result = fork_pool.map_chunks(fill_rows, (50, 9), "int16", chunks=8, out=str(path))
    loaded = np.load(path, mmap_mode="r")
    expected = np.arange(50, dtype="int16")[:, None].repeat(9, axis=1)
    np.testing.assert_array_equal(loaded, expected)
    assert loaded.dtype == np.int16
    np.testing.assert_array_equal(result, expected)
    assert not result.flags.writeable
    assert sorted(os.listdir(tmp_path)) == ["result.npy"]


def test_npy_output_in_fortran_order_is_loaded_as_fortran(fork_pool, tmp_path):
    """order="F" with a .npy out gives a Fortran-ordered .npy with the same values."""
    path = tmp_path / "result.npy"
    fork_pool.map_chunks(fill_rows, (20, 6), "float32", chunks=(4, 3), order="F", out=path)
    loaded = np.load(path)
    assert loaded.flags.f_contiguous
    np.testing.assert_array_equal(loaded, np.arange(20, dtype="float32")[:, None].repeat(6, 1))


def test_npy_output_replaces_an_existing_file(fork_pool, tmp_path):
    """An existing .npy of another shape and dtype is replaced by the new array."""
    path = tmp_path / "result.npy"
    np.save(path, np.full((3, 3), 7, dtype="complex64"))
    fork_pool.map_chunks(fill_rows, (40,), "int64", chunks=9, out=str(path))
    loaded = np.load(path)
    assert loaded.dtype == np.int64
    np.testing.assert_array_equal(loaded, np.arange(40))
    assert sorted(os.listdir(tmp_path)) == ["result.npy"]


def add_one(out, chunk):
    """A read-modify-write kernel: it needs the current values of the output."""
    out += 1
    return chunk.path


@pytest.mark.parametrize("order", ["C", "F"])
def test_existing_w_plus_memmap_is_updated_in_place(temp_pool, tmp_path, order):
    """out=np.memmap(mode="w+"): the kernel sees current values, the caller sees the update."""
    pool, temp = temp_pool
    path = tmp_path / "data.bin"
    data = np.memmap(path, dtype="float32", mode="w+", shape=(60, 5), order=order)
    data[...] = grid((60, 5), "float32")
    job = pool.submit_chunks(add_one, data.shape, out=data, chunks=7)
    paths = job.chunk_results(timeout=60)
    result = job.result()
    assert result is data
    np.testing.assert_array_equal(data, grid((60, 5), "float32") + 1)
    # The workers wrote to the caller's own file: no output file was made in the temp dir.
    assert set(paths) == {str(path)}
    (private,) = os.listdir(temp)
    assert not [n for n in os.listdir(temp / private) if n.startswith("out")]
    on_disk = np.fromfile(path, dtype="float32").reshape((60, 5), order=order)
    np.testing.assert_array_equal(on_disk, grid((60, 5), "float32") + 1)


@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_loaded_r_plus_is_updated_in_place(fork_pool, tmp_path, order):
    """np.load(path, mmap_mode="r+") of a file written by np.save is updated in place."""
    path = tmp_path / "data.npy"
    np.save(path, np.asarray(grid((45, 4), "int64"), order=order))
    data = np.load(path, mmap_mode="r+")
    result = fork_pool.map_chunks(add_one, data.shape, out=data, chunks=(6, 3))
    assert result is data
    expected = grid((45, 4), "int64") + 1
    np.testing.assert_array_equal(data, expected)
    np.testing.assert_array_equal(np.load(path), expected)


def test_in_place_updates_accumulate_over_several_jobs(fork_pool, tmp_path):
    """Each job sees what the previous one wrote: three jobs of out += 1 add three."""
    data = np.lib.format.open_memmap(tmp_path / "acc.npy", mode="w+", dtype="int32", shape=(100, 3))
    for _ in range(3):
        fork_pool.map_chunks(add_one, data.shape, out=data, chunks=9)
    assert (data == 3).all()


@pytest.mark.timeout(60)
def test_parent_creates_children_update_parent_sees(pool, tmp_path):
    """The tutorial scenario, under each start method: np.memmap made by the parent, updated
    in place by the workers through map_chunks, read back by the parent."""
    path = tmp_path / "shared.npy"
    shared = np.lib.format.open_memmap(path, mode="w+", dtype="float64", shape=(16, 4))
    shared[...] = grid((16, 4))

    def square_and_sign(out, chunk):
        out[...] = out**2
        return os.getpid()

    job = pool.submit_chunks(square_and_sign, shared.shape, out=shared, chunks=4)
    pids = set(job.chunk_results(timeout=60))
    assert os.getpid() not in pids
    np.testing.assert_array_equal(shared, grid((16, 4)) ** 2)
    np.testing.assert_array_equal(np.load(path), grid((16, 4)) ** 2)


# -- where files go -------------------------------------------------------------------------------


def where_and_modes(out, chunk, *inputs):
    directory = os.path.dirname(chunk.path)
    files = {
        name: stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
        for name in os.listdir(directory)
    }
    return chunk.path, stat.S_IMODE(os.stat(directory).st_mode), files


def test_temp_dir_is_honoured_and_private(tmp_path):
    """temp_dir= holds the pool's files, in a 0700 dir of 0600 files while a job runs."""
    temp = tmp_path / "chosen"
    temp.mkdir()
    with MemmapPool(2, mp_context="fork", temp_dir=temp) as pool:
        job = pool.submit_chunks(where_and_modes, (20, 5), inputs=[np.ones((20, 5))], chunks=5)
        seen = job.chunk_results(timeout=60)
        for path, dir_mode, files in seen:
            assert os.path.dirname(os.path.dirname(path)) == str(temp)
            assert os.path.basename(os.path.dirname(path)).startswith(f"memmap-pool-{os.getpid()}-")
            assert dir_mode == 0o700
            assert files, "the kernel saw no files"
            assert set(files.values()) == {0o600}, files
        kinds = {name.split("-")[0] for _, _, files in seen for name in files}
        assert {"out", "in0", "spec", "status"} <= kinds
    assert os.listdir(temp) == []


def test_environment_variable_chooses_the_temp_dir(tmp_path, monkeypatch):
    """MEMMAP_POOL_TEMP_DIR is used when temp_dir= is not given."""
    temp = tmp_path / "from-env"
    temp.mkdir()
    monkeypatch.setenv("MEMMAP_POOL_TEMP_DIR", str(temp))
    with MemmapPool(2, mp_context="fork") as pool:
        job = pool.submit_chunks(where_and_modes, (8, 8), chunks=4)
        for path, dir_mode, _ in job.chunk_results(timeout=60):
            assert os.path.dirname(os.path.dirname(path)) == str(temp)
            assert dir_mode == 0o700
    assert os.listdir(temp) == []


def test_temp_dir_argument_wins_over_the_environment_variable(tmp_path, monkeypatch):
    """An explicit temp_dir= is preferred to MEMMAP_POOL_TEMP_DIR."""
    env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
    env_dir.mkdir()
    arg_dir.mkdir()
    monkeypatch.setenv("MEMMAP_POOL_TEMP_DIR", str(env_dir))
    with MemmapPool(2, mp_context="fork", temp_dir=arg_dir) as pool:
        result = pool.map_chunks(fill_rows, (8, 2), chunks=4)
        assert os.path.dirname(os.path.dirname(result.filename)) == str(arg_dir)
        assert os.listdir(env_dir) == []
    assert os.listdir(arg_dir) == []


def test_copy_on_write_memmap_input_is_read_with_the_callers_values(fork_pool, tmp_path):
    """A mode="c" memmap keeps changes in private pages: its values are sent, not its file."""
    np.arange(40, dtype="float64").tofile(tmp_path / "base.bin")
    private = np.memmap(tmp_path / "base.bin", dtype="float64", mode="c", shape=(10, 4))
    private[:3] = -1.0  # only in this process, never in the file
    result = fork_pool.map_chunks(copy_input, (10, 4), inputs=[private], chunks=3)
    np.testing.assert_array_equal(result, private)
    assert np.fromfile(tmp_path / "base.bin")[0] == 0.0


def test_field_names_outside_latin1_work_in_npy_inputs_and_outputs(fork_pool, tmp_path):
    """Structured dtypes with non-Latin-1 field names (.npy format 3.0) read and write."""
    dtype = np.dtype([("température", "<f4"), ("€", "<i2")])
    values = np.zeros(12, dtype)
    values["température"] = np.arange(12) / 2
    values["€"] = np.arange(12)
    with pytest.warns(UserWarning, match="format 3.0"):
        np.save(tmp_path / "in.npy", values)
    fork_pool.map_chunks(
        copy_input, (12,), dtype, inputs=[tmp_path / "in.npy"], chunks=5, out=tmp_path / "out.npy"
    )
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), values)
