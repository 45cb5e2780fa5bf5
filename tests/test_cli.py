"""The memmap-pool command, end to end in subprocesses: run (from a module or a .py file, with
inputs, kwargs and block chunks), resume after the process is killed, info, demo, and each
exit code with and without --verbose."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest

from memmap_pool._resume import Journal, journal_path

WAIT = 60.0
"""Seconds a command may take; only a hang reaches it."""

KERNELS = textwrap.dedent(
    '''
    """Kernels for the command-line tests."""
    import os
    import time

    import numpy as np

    NOT_A_FUNCTION = 42


    def record(log, index):
        if log:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, f"{index}\\n".encode())
            finally:
                os.close(fd)


    def fill(out, chunk, value=0, delay=0.0, log=None, fail_at=None):
        record(log, chunk.index)
        if chunk.index == fail_at:
            raise ValueError("bad value")
        if delay:
            time.sleep(delay)
        rows = np.arange(chunk.slices[0].start, chunk.slices[0].stop) + value
        out[...] = rows.reshape((-1,) + (1,) * (out.ndim - 1))


    def add(out, chunk, a, b, scale=1):
        out[...] = (a + b) * scale


    def smooth(out, chunk, img, weight):
        # A 3x3 weighted sum of a halo input (a correlation: exact whatever the chunks).
        from scipy.ndimage import correlate

        kernel = np.full((3, 3), 1.0) * weight[chunk.interior(1)].mean()
        out[...] = correlate(img, kernel, mode="nearest")[chunk.interior(0)]


    def typed(out, chunk, label="", flag=False, items=(), ratio=0.0):
        if not (isinstance(label, str) and flag is True and items == [1, 2, 3]
                and isinstance(ratio, float)):
            raise TypeError(f"kwargs arrived as {label!r} {flag!r} {items!r} {ratio!r}")
        out[...] = len(label) + sum(items) + ratio
    '''
)


@pytest.fixture
def env(tmp_path):
    """The subprocesses' environment: their temporary files go to a directory of the test."""
    temp = tmp_path / "temp"
    temp.mkdir()
    e = os.environ.copy()
    e["MEMMAP_POOL_TEMP_DIR"] = str(temp)
    e.pop("PYTHONWARNINGS", None)
    return e


@pytest.fixture
def kernels(tmp_path):
    """The kernels as a .py file in a directory of their own, also importable from there."""
    where = tmp_path / "kernels"
    where.mkdir()
    path = where / "clikernels.py"
    path.write_text(KERNELS)
    return path


def temp_files(env) -> list[str]:
    found = []
    for root, _dirs, files in os.walk(env["MEMMAP_POOL_TEMP_DIR"]):
        found += [os.path.join(root, f) for f in files]
    return found


def cli(*args, env, cwd=None, timeout=WAIT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memmap_pool", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def start_cli(*args, env) -> subprocess.Popen[str]:
    """Start the command in the background, with Ctrl-C acting as on a terminal (a shell
    starts background jobs with SIGINT ignored, and children inherit that)."""
    return subprocess.Popen(
        [sys.executable, "-m", "memmap_pool", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def journal_done(out) -> set[int]:
    """Chunks the journal beside ``out`` records as done (empty while it doesn't exist)."""
    try:
        journal = Journal.load(journal_path(str(out)))
    except FileNotFoundError:
        return set()
    return {int(i) for i in np.flatnonzero(journal.done)}


def wait_for_chunks(out, n: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT
    while len(journal_done(out)) < n:
        if proc.poll() is not None:
            pytest.fail(f"the command ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the job did not get {n} chunks done")
        time.sleep(0.02)


def expected_rows(shape, dtype, value=0):
    rows = np.arange(shape[0]) + value
    return np.broadcast_to(rows.reshape((-1,) + (1,) * (len(shape) - 1)), shape).astype(dtype)


def read_lines(path) -> list[int]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(x) for x in f.read().split()]


# -- run ---------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_run_with_a_py_file_writes_the_npy_and_prints_a_summary(tmp_path, kernels, env):
    """run path/to/file.py:fill under spawn (the kernel travels by value) writes the .npy and
    prints one summary line with time, GB/s and chunks."""
    out = tmp_path / "result.npy"
    proc = cli(
        "run",
        f"{kernels}:fill",
        "--shape",
        "50,6",
        "--dtype",
        "float32",
        "--chunks",
        "7",
        "--kwarg",
        "value=2.5",
        "--out",
        out,
        "--workers",
        "2",
        "--start-method",
        "spawn",
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        rf"wrote {re.escape(str(out))}: 50x6 float32, .* in [0-9.]+ s, [0-9.e+-]+ GB/s, "
        r"8 of 8 chunks run, 2 workers",
        lines[0],
    ), lines[0]
    np.testing.assert_array_equal(np.load(out), expected_rows((50, 6), "float32", 2.5))
    assert not os.path.exists(journal_path(str(out)))
    assert temp_files(env) == []


@pytest.mark.timeout(60)
def test_run_with_a_module_inputs_kwargs_and_block_chunks(tmp_path, kernels, env):
    """run MODULE:FUNCTION imports from the current directory; --input files are read in
    order, --chunks AxB gives blocks, --kwarg reaches the kernel."""
    rng = np.random.default_rng(1)
    a, b = rng.random((40, 24)), rng.random((40, 24))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = tmp_path / "sum.npy"
    proc = cli(
        "run",
        "clikernels:add",
        "--shape",
        "40,24",
        "--chunks",
        "16x8",
        "--input",
        tmp_path / "a.npy",
        tmp_path / "b.npy",
        "--kwarg",
        "scale=3",
        "--out",
        out,
        env=env,
        cwd=kernels.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert "9 of 9 chunks run" in proc.stdout  # 3 x 3 blocks, ragged on both axes
    np.testing.assert_allclose(np.load(out), (a + b) * 3)


@pytest.mark.timeout(60)
def test_halo_gives_an_input_its_neighbourhood(tmp_path, kernels, env):
    """--halo NAME=DEPTH:BOUNDARY wraps that input (named by file name here) in a Halo; the
    other input stays plain, and the result equals the filter on the whole array."""
    from scipy.ndimage import correlate

    rng = np.random.default_rng(2)
    img, weight = rng.random((70, 33)), np.full((70, 33), 2.0)
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "weight.npy", weight)
    out = tmp_path / "smooth.npy"
    proc = cli(
        "run", f"{kernels}:smooth", "--shape", "70,33", "--chunks", "9x10",
        "--input", tmp_path / "img.npy", tmp_path / "weight.npy",
        "--halo", "img.npy=1:edge", "--out", out,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    expected = correlate(img, np.full((3, 3), 2.0), mode="nearest")
    assert np.array_equal(np.load(out), expected)


@pytest.mark.timeout(60)
def test_kwarg_values_are_read_as_python_literals_else_strings(tmp_path, kernels, env):
    """--kwarg values become ints, bools, lists and floats when they read as literals, and
    stay strings otherwise."""
    out = tmp_path / "typed.npy"
    proc = cli(
        "run",
        f"{kernels}:typed",
        "--shape",
        "8",
        "--out",
        out,
        "--kwarg",
        "label=hello world",
        "--kwarg",
        "flag=True",
        "--kwarg",
        "items=[1, 2, 3]",
        "--kwarg",
        "ratio=0.5",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(out), np.full(8, 11 + 6 + 0.5))


# -- resume and info ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_killed_run_resumes_computing_only_the_missing_chunks(tmp_path, kernels, env):
    """A run killed with SIGKILL leaves its journal; info reports it unfinished, and --resume
    runs exactly the chunks the journal lacks, giving the full result."""
    out = tmp_path / "slow.npy"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    common = [
        "run",
        f"{kernels}:fill",
        "--shape",
        "60,5",
        "--dtype",
        "int32",
        "--chunks",
        "1",
        "--out",
        out,
        "--workers",
        "2",
        "--kwarg",
        "delay=0.05",
    ]
    proc = start_cli(*common, "--kwarg", f"log={first_log}", env=env)
    try:
        wait_for_chunks(out, 6, proc)
    finally:
        proc.kill()
        proc.communicate(timeout=WAIT)
    assert proc.returncode == -signal.SIGKILL
    done = journal_done(out)
    assert 6 <= len(done) < 60

    info = cli("info", out, env=env)
    assert info.returncode == 0, info.stderr
    assert f"unfinished: {len(done)} of 60 chunks done" in info.stdout
    assert "shape:  (60, 5)" in info.stdout

    proc2 = cli(*common, "--kwarg", f"log={second_log}", "--resume", env=env)
    assert proc2.returncode == 0, proc2.stderr
    assert f"{60 - len(done)} of 60 chunks run, {len(done)} already done" in proc2.stdout
    rerun = read_lines(second_log)
    assert sorted(rerun) == sorted(set(range(60)) - done)
    np.testing.assert_array_equal(np.load(out), expected_rows((60, 5), "int32"))
    assert not os.path.exists(journal_path(str(out)))
    # The resumed run's pool also removed the killed run's leftover files.
    assert temp_files(env) == []
    assert "status: complete" in cli("info", out, env=env).stdout


@pytest.mark.timeout(60)
def test_info_describes_a_finished_output(tmp_path, env):
    """info prints shape, dtype, order and size of a complete .npy."""
    path = tmp_path / "done.npy"
    np.save(path, np.zeros((3, 4, 5), dtype="<i2", order="F"))
    proc = cli("info", path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "shape:  (3, 4, 5)" in proc.stdout
    assert "dtype:  int16" in proc.stdout
    assert "order:  F" in proc.stdout
    assert "(120 bytes)" in proc.stdout
    assert "status: complete" in proc.stdout


# -- exit codes --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_kernel_error_exits_1_with_the_error_and_chunk_on_one_line(tmp_path, kernels, env):
    """A failing kernel gives exit code 1 and one line naming the error and the chunk, with
    no traceback; --verbose adds the traceback (the worker's too)."""
    args = [
        "run",
        f"{kernels}:fill",
        "--shape",
        "128,64",
        "--dtype",
        "float32",
        "--chunks",
        "32x64",
        "--out",
        tmp_path / "bad.npy",
        "--kwarg",
        "fail_at=2",
    ]
    proc = cli(*args, env=env)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "memmap-pool: error: ValueError: bad value (raised by the kernel in chunk 2 "
        "(region [64:96, 0:64]) of 4)"
    ]
    verbose = cli(*args, "--verbose", env=env)
    assert verbose.returncode == 1
    assert "Traceback (most recent call last)" in verbose.stderr
    # The worker's traceback: the kernel's frame, by line (it travelled by value, so its
    # file name is cloudpickle's placeholder).
    assert re.search(r"line \d+, in fill\nValueError: bad value", verbose.stderr)
    assert verbose.stderr.splitlines()[-1] == proc.stderr.splitlines()[0]
    first = cli("-v", *args, env=env)  # also accepted before the command
    assert first.returncode == 1
    assert "Traceback (most recent call last)" in first.stderr
    assert temp_files(env) == []


USAGE_ERRORS = {
    "unknown module": (["run", "no_such_module_xyz:fill"], "no module named 'no_such_module_xyz'"),
    "unknown function": (["run", "{kernels}:nope"], "has no function 'nope'"),
    "not a function": (["run", "{kernels}:NOT_A_FUNCTION"], "is not a function"),
    "missing .py file": (["run", "{tmp}/missing.py:fill"], "no such file"),
    "no colon": (["run", "{kernels}"], "MODULE:FUNCTION"),
    "bad shape": (["run", "{kernels}:fill", "--shape", "10,-3"], "--shape"),
    "shape not ints": (["run", "{kernels}:fill", "--shape", "ten"], "--shape"),
    "bad dtype": (["run", "{kernels}:fill", "--dtype", "floot32"], "not a numpy dtype"),
    "object dtype": (["run", "{kernels}:fill", "--dtype", "object"], "Python objects"),
    "chunks not ints": (["run", "{kernels}:fill", "--chunks", "AxB"], "--chunks"),
    "chunks too big": (["run", "{kernels}:fill", "--chunks", "500"], "does not fit"),
    "chunks wrong rank": (["run", "{kernels}:fill", "--chunks", "2x2x2"], "has 3 axes"),
    "bad kwarg": (["run", "{kernels}:fill", "--kwarg", "novalue"], "name=value"),
    "out not .npy": (["run", "{kernels}:fill", "--out", "{tmp}/x.bin"], "ending in .npy"),
    "missing input": (["run", "{kernels}:fill", "--input", "{tmp}/nope.npy"], "no such file"),
    "bad workers": (["run", "{kernels}:fill", "--workers", "0"], "--workers"),
    "halo without =": (["run", "{kernels}:fill", "--halo", "16"], "NAME=DEPTH"),
    "halo of no input": (
        ["run", "{kernels}:fill", "--input", "{tmp}/a.npy", "--halo", "b.npy=2"],
        "'b.npy' is not one of the --input files",
    ),
    "halo bad depth": (
        ["run", "{kernels}:fill", "--input", "{tmp}/a.npy", "--halo", "0=two"],
        "DEPTH must be an int",
    ),
    "halo negative depth": (
        ["run", "{kernels}:fill", "--input", "{tmp}/a.npy", "--halo", "0=-2"],
        "Halo depth must be a non-negative int (got -2)",
    ),
    "halo bad boundary": (
        ["run", "{kernels}:fill", "--input", "{tmp}/a.npy", "--halo", "a.npy=2:mirror"],
        "Halo boundary must be one of",
    ),
    "halo depth per axis of another rank": (
        ["run", "{kernels}:fill", "--input", "{tmp}/a.npy", "--halo", "0=1,1,1"],
        "has 3 entries but the input has 2 axes",
    ),
    "scheduler alone": (
        ["run", "{kernels}:fill", "--scheduler", "tcp://127.0.0.1:1"],
        "--shared-dir",
    ),
    "missing --shape": (["run", "{kernels}:fill", "--out", "{tmp}/o.npy"], "--shape"),
    "unknown command": (["frobnicate"], "invalid choice"),
    "info on a missing file": (["info", "{tmp}/none.npy"], "no such file"),
    "info on a non-npy file": (["info", "{kernels}"], "not a .npy file"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_bad_usage_exits_2_with_a_one_line_reason(case, tmp_path, kernels, env):
    """Bad command lines exit with 2 and say what is wrong, without a traceback."""
    args, reason = USAGE_ERRORS[case]
    args = [a.format(kernels=kernels, tmp=tmp_path) for a in args]
    np.save(tmp_path / "a.npy", np.zeros((10, 4)))  # an input for the --halo cases
    if args[0] == "run":
        defaults = {"--shape": "10,4", "--out": str(tmp_path / "o.npy")}
        args += [
            x
            for k, v in defaults.items()
            if k not in args and case != "missing --shape"
            for x in (k, v)
        ]
    proc = cli(*args, env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert reason in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "o.npy")


@pytest.mark.timeout(60)
def test_resume_with_a_different_plan_is_bad_usage(tmp_path, kernels, env):
    """--resume of an unfinished output with other chunks is refused with exit code 2."""
    out = tmp_path / "plan.npy"
    failed = cli(
        "run",
        f"{kernels}:fill",
        "--shape",
        "40,4",
        "--chunks",
        "4",
        "--out",
        out,
        "--kwarg",
        "fail_at=5",
        "--workers",
        "1",
        env=env,
    )
    assert failed.returncode == 1
    assert os.path.exists(journal_path(str(out)))
    proc = cli(
        "run",
        f"{kernels}:fill",
        "--shape",
        "40,4",
        "--chunks",
        "8",
        "--out",
        out,
        "--resume",
        env=env,
    )
    assert proc.returncode == 2
    assert "different plan" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("signum", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_signal_stops_the_run_with_its_exit_code(signum, code, word, tmp_path, kernels, env):
    """SIGINT exits with 130 and SIGTERM with 143: the workers stop, temporary files go, the
    output keeps its journal for a resume, and no traceback is shown."""
    out = tmp_path / "stopped.npy"
    log = tmp_path / "log"
    proc = start_cli(
        "run",
        f"{kernels}:fill",
        "--shape",
        "400,3",
        "--chunks",
        "1",
        "--out",
        out,
        "--workers",
        "2",
        "--kwarg",
        "delay=0.05",
        "--kwarg",
        f"log={log}",
        env=env,
    )
    try:
        wait_for_chunks(out, 2, proc)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert f"memmap-pool: {word}" in stderr
    assert "rerun with --resume" in stderr
    assert "Traceback" not in stderr
    assert stdout == ""
    assert temp_files(env) == []
    done = journal_done(out)
    assert 2 <= len(done) < 400
    assert len(read_lines(log)) < 400  # the job stopped early


# -- demo and entry points ---------------------------------------------------------------------


def _png_pixels(path) -> tuple[int, int, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) == (8, 2)  # 8-bit RGB
            size = (width, height)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert kind == b"IEND"
    assert size is not None
    return size[0], size[1], zlib.decompress(idat)


@pytest.mark.timeout(90)
def test_demo_writes_a_valid_npy_and_png(tmp_path, env):
    """demo computes the Mandelbrot escape times into a .npy and an RGB PNG of the same size,
    and prints time, throughput and where the files are."""
    proc = cli("demo", "--size", "96", "--out", tmp_path / "demo", "--workers", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Mpixel/s" in proc.stdout
    assert "GB/s" in proc.stdout
    npy, png = tmp_path / "demo" / "mandelbrot.npy", tmp_path / "demo" / "mandelbrot.png"
    assert str(npy) in proc.stdout
    assert str(png) in proc.stdout
    escape = np.load(npy)
    assert escape.shape == (96, 96)
    assert escape.dtype == np.float32
    assert escape.min() >= 0
    assert (escape == escape.max()).any()  # points of the set
    assert (escape < 10).any()  # points that escape at once
    np.testing.assert_array_equal(escape, escape[::-1])  # symmetric about the real axis
    width, height, raw = _png_pixels(png)
    assert (width, height) == (96, 96)
    assert len(raw) == height * (1 + width * 3)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + width * 3)
    assert (rows[:, 0] == 0).all()  # filter type "none" on every row
    rgb = rows[:, 1:].reshape(height, width, 3)
    inside = escape >= escape.max()
    assert (rgb[inside] == 0).all()  # the set is black
    assert rgb[~inside].any()
    assert temp_files(env) == []


def test_help_exits_0_and_no_command_exits_2(env):
    """--help prints the commands; no command at all is bad usage."""
    helped = cli("--help", env=env)
    assert helped.returncode == 0
    for command in ("run", "demo", "info"):
        assert command in helped.stdout
    bare = cli(env=env)
    assert bare.returncode == 2
    assert "Traceback" not in bare.stderr


def test_console_script_runs(tmp_path, env):
    """The installed memmap-pool script is the same command."""
    script = os.path.join(os.path.dirname(sys.executable), "memmap-pool")
    if not os.path.exists(script):
        pytest.skip("the package is not installed with its console script in this environment")
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(3))
    proc = subprocess.run(
        [script, "info", str(path)], capture_output=True, text=True, env=env, timeout=WAIT
    )
    assert proc.returncode == 0, proc.stderr
    assert "shape:  (3,)" in proc.stdout
