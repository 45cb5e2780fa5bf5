"""The benchmark suite's smoke mode: every approach runs and computes the right values.

Nothing here is about speed: the smoke mode uses tiny sizes, and only the correctness of each
approach's result (checked by the suite against the serial reference) is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# Runs every benchmark approach once: deselect with -m "not slow" for a quick run.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FILL_APPROACHES = {
    "memmap_pool",
    "serial",
    "threads",
    "ppe_return",
    "hand_memmap",
    "shared_memory",
    "joblib_return",
    "joblib_memmap",
    "dask",
}
"""The approaches of the block fills (fill, gil, compute, tiny)."""

STENCIL_APPROACHES = {
    "memmap_pool",
    "memmap_pool_view",
    "memmap_pool_blocks",
    "serial",
    "dask_threads",
    "dask",
    "skimage",
}
"""The approaches of the stencil workload."""

APPROACHES = FILL_APPROACHES | STENCIL_APPROACHES

FILL_WORKLOADS = {"fill", "gil", "compute", "tiny"}

IN_PROCESS = {"serial", "threads", "dask_threads", "skimage"}
"""Approaches that run no worker processes."""

SMOKE_TIMEOUT = 280
"""Seconds the smoke run may take; it needs well under a minute, only a hang gets here."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The result of one ``python -m benchmarks --smoke`` run, shared by the tests here."""
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
    )
    assert proc.returncode == 0, f"smoke run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(out) as f:
        run = json.load(f)
    run["_stdout"] = proc.stdout
    return run


@pytest.mark.timeout(SMOKE_TIMEOUT + 20)
def test_smoke_run_has_every_approach_and_workload(smoke_run: dict) -> None:
    """Every approach is in the run, with a result on each workload of its kind."""
    assert set(smoke_run["results"]) == APPROACHES
    # The stencil needs scipy (its filter and its serial reference); the suite leaves it out
    # without.
    stencil = {"stencil"} if _installed("scipy") else set()
    assert set(smoke_run["workloads"]) == FILL_WORKLOADS | stencil
    for key, per_workload in smoke_run["results"].items():
        expected = (FILL_WORKLOADS if key in FILL_APPROACHES else set()) | (
            stencil if key in STENCIL_APPROACHES else set()
        )
        assert set(per_workload) == expected, key


@pytest.mark.timeout(SMOKE_TIMEOUT + 20)
@pytest.mark.parametrize("key", sorted(APPROACHES))
def test_smoke_run_gives_a_correct_result_for_every_installed_approach(
    smoke_run: dict, key: str
) -> None:
    """An approach whose library is installed reports "ok" on every workload it runs; one
    whose library is missing is skipped by the suite, and this test says so."""
    module = smoke_run["requires"][key]
    per_workload = smoke_run["results"][key]
    expected = "ok" if _installed(module) else "skipped"
    for wkey, r in per_workload.items():
        assert r["status"] == expected, f"{key} on {wkey}: {r['status']} {r.get('detail', '')}"
    if expected == "skipped":
        pytest.skip(f"{module} is not installed: the suite skipped {key}")


@pytest.mark.timeout(SMOKE_TIMEOUT + 20)
def test_smoke_run_measures_time_and_memory_of_parent_and_workers(smoke_run: dict) -> None:
    """Each correct result carries its timings and peak RSS; process pools report workers."""
    for key, per_workload in smoke_run["results"].items():
        for wkey, r in per_workload.items():
            if r["status"] != "ok":
                continue
            assert len(r["times"]) == smoke_run["repeat"] == 1, (key, wkey)
            assert r["median"] > 0
            assert r["parent_peak"] >= r["parent_anon"] > 0
            if key in IN_PROCESS:
                assert r["workers_seen"] == 0, (key, wkey)
            else:
                assert r["workers_seen"] >= 1, (key, wkey)
                assert r["worker_peak"] > 0


@pytest.mark.timeout(SMOKE_TIMEOUT + 20)
def test_smoke_run_prints_a_target_check_and_start_up_per_start_method(smoke_run: dict) -> None:
    """The report lists every target with a verdict, and start-up times per start method."""
    verdicts = {row["verdict"] for row in smoke_run["targets"]}
    assert verdicts <= {"met", "NOT met", "not measured"}
    assert len(smoke_run["targets"]) == 14
    assert "Targets" in smoke_run["_stdout"]
    import multiprocessing

    assert set(smoke_run["startup"]) >= set(multiprocessing.get_all_start_methods())
    for method, s in smoke_run["startup"].items():
        assert "error" not in s, (method, s)
        assert s["memmap_pool"]["later"] > 0
