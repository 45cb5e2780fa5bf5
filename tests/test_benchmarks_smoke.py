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
    "memmap_pool_threads",
    "processes",
}
"""The approaches of the block fills (fill, gil, compute, tiny)."""

STENCIL_APPROACHES = {
    "memmap_pool",
    "memmap_pool_view",
    "memmap_pool_blocks",
    "memmap_pool_threads",
    "serial",
    "dask_threads",
    "dask",
    "skimage",
}
"""The approaches of the stencil workload."""

KIND_APPROACHES = {
    "heat": {"memmap_pool", "memmap_pool_threads", "serial", "hand_steps", "processes"},
    "empty_step": {"memmap_pool", "memmap_pool_threads"},
    "reduction": {"memmap_pool", "memmap_pool_threads", "serial", "dask_threads", "processes"},
    "normals": {"memmap_pool", "memmap_pool_threads", "serial", "processes"},
}
"""The approaches of the other kinds of workload: heat (iterate), the empty step (MemmapPool
alone), the reduction (reduce_chunks) and the normals (chunk.random)."""

KIND_WORKLOADS = {
    "heat": {"heat"},
    "empty_step": {"empty_step_small", "empty_step_large"},
    "reduction": {"reduction"},
    "normals": {"normals"},
}

APPROACHES = FILL_APPROACHES | STENCIL_APPROACHES | set().union(*KIND_APPROACHES.values())

FILL_WORKLOADS = {"fill", "gil", "compute", "tiny"}

IN_PROCESS = {"serial", "threads", "dask_threads", "skimage", "memmap_pool_threads"}
"""Approaches that run no worker processes."""

TARGETS = 25
"""Rows of the targets table: 15 of the fills (the process limit among them) and the stencil,
3 of the threads backend, heat, the empty step at two sizes, the reduction, the normals."""

SMOKE_TIMEOUT = 280
"""Seconds the smoke run may take; it needs well under a minute, only a hang gets here."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _has_chunk_random() -> bool:
    """Whether this memmap-pool has ``chunk.random``, which MemmapPool's normals use."""
    from memmap_pool import Chunk

    return hasattr(Chunk, "random")


NO_CHUNK_RANDOM = (
    "MemmapPool's normals wait for chunk.random, which this memmap-pool does not have yet: the "
    "suite reports them as skipped"
)


def _expected_workloads(key: str, stencil: set[str]) -> set[str]:
    expected = (FILL_WORKLOADS if key in FILL_APPROACHES else set()) | (
        stencil if key in STENCIL_APPROACHES else set()
    )
    for kind, keys in KIND_APPROACHES.items():
        if key in keys:
            expected |= KIND_WORKLOADS[kind]
    return expected


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
    assert set(smoke_run["workloads"]) == FILL_WORKLOADS | stencil | set().union(
        *KIND_WORKLOADS.values()
    )
    for key, per_workload in smoke_run["results"].items():
        assert set(per_workload) == _expected_workloads(key, stencil), key


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
        want = expected
        if key == "memmap_pool" and wkey == "normals" and not _has_chunk_random():
            want = "skipped"  # see test_smoke_run_draws_normals_with_chunk_random
        assert r["status"] == want, f"{key} on {wkey}: {r['status']} {r.get('detail', '')}"
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
            # The empty step is a difference of two job times: at smoke sizes it is noise
            # around zero, either side.
            assert r["median"] > 0 or wkey.startswith("empty_step"), (key, wkey)
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
    assert len(smoke_run["targets"]) == TARGETS
    assert "Targets" in smoke_run["_stdout"]
    import multiprocessing

    assert set(smoke_run["startup"]) >= set(multiprocessing.get_all_start_methods())
    for method, s in smoke_run["startup"].items():
        assert "error" not in s, (method, s)
        assert s["memmap_pool"]["later"] > 0


@pytest.mark.timeout(SMOKE_TIMEOUT + 20)
def test_smoke_run_times_the_empty_step_per_step_without_its_buffers(smoke_run: dict) -> None:
    """The empty step's time is per step (the difference of a long and a 1-step job), less
    than the whole call; MemmapPool alone runs it, and the chunks of a step are recorded."""
    for wkey in KIND_WORKLOADS["empty_step"]:
        w = smoke_run["workloads"][wkey]
        assert w["kind"] == "empty_step"
        assert w["steps"] > 1
        r = smoke_run["results"]["memmap_pool"][wkey]
        assert r["status"] == "ok", r
        assert 0 < r["median"] < r["wall_median"]
        assert r["info"]["chunks"] >= 1
        assert r["info"]["steps"] == w["steps"]
    assert {row["target"] for row in smoke_run["targets"]} >= {
        f"empty step, {smoke_run['workloads'][k]['size']} state: <= 1 ms per step"
        for k in KIND_WORKLOADS["empty_step"]
    }


@pytest.mark.timeout(SMOKE_TIMEOUT + 20)
def test_smoke_run_checks_heat_and_the_reduction_against_serial(smoke_run: dict) -> None:
    """Heat (bit for bit against its reference) and the reduction (to rounding, and the same
    bits on every run) are right for every approach that runs them."""
    for kind in ("heat", "reduction"):
        for key in KIND_APPROACHES[kind]:
            if not _installed(smoke_run["requires"][key]):
                continue
            r = smoke_run["results"][key][kind]
            assert r["status"] == "ok", (key, kind, r.get("detail"))
    assert smoke_run["results"]["memmap_pool"]["reduction"]["info"]["chunks"] > 1


@pytest.mark.timeout(SMOKE_TIMEOUT + 20)
def test_smoke_run_draws_normals_with_chunk_random(smoke_run: dict) -> None:
    """MemmapPool's normals (chunk.random) pass the checks: moments, the same values in chunks
    of another size, the same bits on every run. Until chunk.random exists they are skipped,
    with the reason, and the other approaches still run."""
    for key in KIND_APPROACHES["normals"] - {"memmap_pool"}:
        assert smoke_run["results"][key]["normals"]["status"] == "ok", key
    r = smoke_run["results"]["memmap_pool"]["normals"]
    if not _has_chunk_random():
        assert r["status"] == "skipped"
        assert "chunk.random" in r["detail"]
        pytest.skip(NO_CHUNK_RANDOM)
    assert r["status"] == "ok", r.get("detail")
    assert r["info"]["chunks"] > 1
