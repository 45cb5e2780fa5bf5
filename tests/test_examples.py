"""Smoke tests of the examples: each runs as a script, small, and says it worked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *arguments, tmp_path):
    """Run examples/<name> in a fresh interpreter with its files kept under tmp_path."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), MEMMAP_POOL_TEMP_DIR=str(scratch))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *arguments],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr == "", proc.stderr
    assert os.listdir(scratch) == [], "the example left files behind"
    return proc.stdout


@pytest.mark.timeout(120)
def test_parent_child_update_example_shows_the_childrens_updates(tmp_path):
    """The parent/child tutorial prints the array before and after and reports success."""
    out = run_example("parent_child_update.py", "--rows", "6", tmp_path=tmp_path)
    parent_pid = int(re.search(r"parent \(pid (\d+)\) created", out).group(1))
    children = re.findall(r"child \(pid (\d+)\) multiplied rows (\d+):(\d+) by 10", out)
    assert [(int(a), int(b)) for _, a, b in children] == [(0, 2), (2, 4), (4, 6)]
    assert parent_pid not in {int(pid) for pid, _, _ in children}
    assert "[ 40.  50.  60.  70.]" in out.split("parent now sees:")[1]
    assert out.rstrip().endswith("OK: the parent sees every child's update")


@pytest.mark.timeout(120)
def test_many_workers_inplace_example_loses_no_update(tmp_path):
    """The many-workers example, small, finds every value equal to the number of rounds."""
    out = run_example(
        "many_workers_inplace.py",
        "--size",
        "2000000",
        "--workers",
        "3",
        "--rounds",
        "4",
        tmp_path=tmp_path,
    )
    assert "2,000,000 float32 values" in out
    rounds = re.findall(r"round (\d+): (\d+) chunks on 3 workers", out)
    assert [int(r) for r, _ in rounds] == [1, 2, 3, 4]
    assert all(int(chunks) > 3 for _, chunks in rounds)
    taking_part = int(re.search(r"(\d+) worker processes took part", out).group(1))
    assert 1 <= taking_part <= 3
    assert "every value is between 4 and 4, expected exactly 4" in out
    assert out.rstrip().endswith("OK: no update was lost or doubled, without any lock")


@pytest.mark.timeout(120)
def test_edge_detection_example_writes_a_png_equal_to_scipy(tmp_path):
    """The blur and gradient of the edge example equal scipy's on the whole image, and the
    picture is a PNG of the image's size."""
    out = run_example(
        "edge_detection.py", "--size", "600", "--png", "e.png", "--check", tmp_path=tmp_path
    )
    assert "blurred and differentiated a 600x600 float32 image" in out
    assert out.rstrip().endswith("OK: equal to scipy on the whole image, bit for bit")
    png = (tmp_path / "e.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png[16:24] == (600).to_bytes(4, "big") * 2  # IHDR: width, height


@pytest.mark.timeout(120)
def test_heat_equation_example_equals_the_serial_loop_and_resumes(tmp_path):
    """The heat example, small: equal to the serial loop; run again with --resume and more
    steps, it continues from the state it kept."""
    out = run_example(
        "heat_equation.py", "--size", "128", "--steps", "40", "--png", "h.png", "--check",
        "--out", "state.npy", tmp_path=tmp_path,
    )  # fmt: skip
    assert "40 steps of a 128x128 plate" in out
    assert out.rstrip().endswith("OK: equal to the serial loop, bit for bit")
    start, end = re.search(r"total heat: (\S+) at the start, (\S+) at the end", out).groups()
    assert float(start) == pytest.approx(float(end), rel=1e-9)  # insulated edges
    (tmp_path / "scratch").rmdir()
    more = run_example(
        "heat_equation.py", "--size", "128", "--steps", "60", "--png", "h.png", "--check",
        "--out", "state.npy", "--resume", tmp_path=tmp_path,
    )  # fmt: skip
    assert re.search(r"60 steps of a 128x128 plate .*\((\d+) chunks", more)
    assert more.rstrip().endswith("OK: equal to the serial loop, bit for bit")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(120)
def test_monte_carlo_example_is_reproducible_across_chunkings(tmp_path):
    """The Monte Carlo example counts the same points with two chunkings, and its estimate
    of pi is within a few standard errors."""
    out = run_example("monte_carlo.py", "--samples", "2000000", tmp_path=tmp_path)
    estimate, error = map(float, re.search(r"pi ~ (\S+) \+- (\S+)", out).groups())
    assert abs(estimate - np.pi) < 5 * error
    assert "OK:" in out


def test_examples_have_a_docstring_explaining_the_scenario():
    """Each tutorial example opens with a docstring that says how to run it."""
    for name in (
        "parent_child_update.py",
        "many_workers_inplace.py",
        "edge_detection.py",
        "heat_equation.py",
        "monte_carlo.py",
    ):
        source = (EXAMPLES / name).read_text()
        assert source.startswith('"""'), name
        docstring = source.split('"""')[1]
        assert f"python examples/{name}" in docstring
        assert len(docstring.splitlines()) > 5


@pytest.mark.timeout(90)
def test_reduction_example_agrees_with_a_full_pass(tmp_path):
    """examples/reduction.py, small: its chunk results match a second pass over the array."""
    out = run_example("reduction.py", "--size", "2000003", "--check", tmp_path=tmp_path)
    assert "2,000,003 samples" in out
    assert out.rstrip().endswith("OK: the chunk results agree with a full pass over the array")


@pytest.mark.timeout(90)
def test_demo_example_writes_the_image(tmp_path):
    """examples/demo.py, small: writes the .npy and the PNG and reports the set's pixels."""
    out = run_example(
        "demo.py", "--size", "128", "--out", "demo", "--workers", "2", tmp_path=tmp_path
    )
    assert np.load(tmp_path / "demo" / "mandelbrot.npy").shape == (128, 128)
    assert (tmp_path / "demo" / "mandelbrot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    inside = int(re.search(r"OK: ([\d,]+) of 16,384 pixels", out).group(1).replace(",", ""))
    assert 0 < inside < 128 * 128
