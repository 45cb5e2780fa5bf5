"""CPython's ProcessPoolExecutor tests, run against MemmapPool under fork, forkserver and spawn.

MemmapPool says its ``submit``, ``map``, ``shutdown`` and ``with`` behave as
``ProcessPoolExecutor``'s; this holds it to the tests CPython itself runs on
``ProcessPoolExecutor``. CPython 3.11's ``test_concurrent_futures.py`` is not part of this
repository: ``tests/cpython/fetch_suite.sh`` takes it from Debian's ``libpython3.11-testsuite``
package into ``.cache/cpython-tests/``, and ``tests/cpython/cpython_executor_suite.py`` runs
its process pool test cases with ``executor_type = MemmapPool`` (the tests it leaves out, and
why, are its ``SKIPS``). Each start method runs in a child process of its own, all three at
once, each bounded in time, so a hang in a test can't hang pytest.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import memmap_pool

HERE = Path(__file__).resolve().parent
CPYTHON_DIR = HERE / "cpython"
CACHE_DIR = Path(
    os.environ.get("MEMMAP_POOL_CPYTHON_CACHE") or HERE.parent / ".cache" / "cpython-tests"
)
SUITE_VERSION = (3, 11)
START_METHODS = ("fork", "forkserver", "spawn")

FETCH_TIMEOUT = 300.0
RUN_TIMEOUT = 240.0
"""Seconds one start method's run may take; it takes about a minute with all three at once
on two cores."""

DETAIL_LINES = 25
"""Lines of each failure's traceback quoted in the assertion message (the logs have all)."""


def _fetch_suite() -> Path:
    """Path of CPython's test_concurrent_futures.py, or skip saying why it can't be had."""
    if sys.version_info[:2] != SUITE_VERSION:
        pytest.skip(
            "CPYTHON EXECUTOR SUITE NOT RUN: it runs CPython "
            f"{'.'.join(map(str, SUITE_VERSION))}'s test file, and this is Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}"
        )
    version = ".".join(map(str, SUITE_VERSION))
    try:
        proc = subprocess.run(
            ["bash", str(CPYTHON_DIR / "fetch_suite.sh"), version, str(CACHE_DIR)],
            capture_output=True,
            text=True,
            timeout=FETCH_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(
            "CPYTHON EXECUTOR SUITE NOT RUN: fetching CPython's test_concurrent_futures.py "
            f"took over {FETCH_TIMEOUT:g} s"
        )
    if proc.returncode == 3:
        ours = [line for line in proc.stderr.splitlines() if line.startswith("fetch_suite:")]
        pytest.skip(
            "CPYTHON EXECUTOR SUITE NOT RUN: CPython's test_concurrent_futures.py can't be "
            f"obtained here: {ours[-1] if ours else proc.stderr.strip()}"
        )
    assert proc.returncode == 0, f"fetch_suite.sh failed ({proc.returncode}):\n{proc.stderr}"
    path = Path(proc.stdout.strip())
    assert path.is_file(), f"fetch_suite.sh printed {path}, which is no file"
    return path


def _start(method: str, suite: Path, out_dir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    results = out_dir / f"{method}.jsonl"
    log = open(out_dir / f"{method}.log", "wb")  # noqa: SIM115 - closed in _finish
    env = dict(os.environ)
    env["MEMMAP_POOL_CPYTHON_SUITE"] = str(suite)
    # The runner must test the memmap_pool this test session imports.
    package_src = str(Path(memmap_pool.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_src, env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        str(CPYTHON_DIR / "run.py"),
        "--start-method",
        method,
        "--results",
        str(results),
    ]
    if method == START_METHODS[0]:
        cmd.append("--future-tests")  # FutureTests use no executor: once is enough
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=out_dir,
        start_new_session=True,  # so a hung run is killed with all its processes
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc, results


def _finish(proc: subprocess.Popen[bytes], deadline: float) -> str | None:
    """Wait for a run; kill it and say so if it is still going at ``deadline``."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        problem = None if proc.returncode == 0 else f"runner exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        problem = f"runner still going after {RUN_TIMEOUT:g} s: killed"
    proc.log.close()  # type: ignore[attr-defined]
    return problem


class Run:
    """One start method's outcomes, read from the runner's JSON lines."""

    def __init__(self, method: str, results: Path, problem: str | None) -> None:
        self.method = method
        self.problems = [problem] if problem else []
        self.outcomes: dict[str, tuple[str, str]] = {}
        self.warnings: list[str] = []
        planned = None
        started: list[str] = []
        ended = False
        lines = results.read_text().splitlines() if results.exists() else []
        for line in lines:
            record = json.loads(line)
            event = record["event"]
            if event == "plan":
                planned = record["count"]
            elif event == "start":
                started.append(record["id"])
            elif event == "result":
                self.outcomes[record["id"]] = (record["outcome"], record["detail"])
            elif event == "warning":
                self.warnings.append(f"{record['id']}: {record['text']}")
            elif event == "end":
                ended = True
                if record["leftover_processes"]:
                    self.problems.append(
                        "processes still running after the last test (killed): "
                        f"{record['leftover_processes']}"
                    )
        for test in started:
            if test not in self.outcomes:
                self.outcomes[test] = ("error", "started and never finished (hang or crash)")
        if planned is None:
            self.problems.append("the runner never got to run a test (see its log)")
        elif not ended:
            self.problems.append(
                f"the run stopped after {len(self.outcomes)} of {planned} tests (see its log)"
            )
        elif len(self.outcomes) != planned:
            self.problems.append(f"{planned} tests planned, {len(self.outcomes)} reported")

    def count(self, outcome: str) -> int:
        return sum(1 for o, _ in self.outcomes.values() if o == outcome)

    def bad(self) -> list[tuple[str, str, str]]:
        return [
            (test, o, detail)
            for test, (o, detail) in sorted(self.outcomes.items())
            if o in ("failed", "error")
        ]


def _summary(runs: list[Run], suite: Path) -> str:
    source = suite.with_suffix(".source")
    origin = source.read_text().strip() if source.exists() else str(suite)
    lines = [f"CPython executor suite ({origin}) against MemmapPool:"]
    skips: collections.Counter[str] = collections.Counter()
    for run in runs:
        skipped = run.count("skipped")
        lines.append(
            f"  {run.method:<10} {len(run.outcomes)} run: {run.count('passed')} passed, "
            f"{run.count('failed')} failed, {run.count('error')} errors, {skipped} skipped"
        )
        for outcome, detail in run.outcomes.values():
            if outcome == "skipped":
                skips[detail] += 1
    lines.append("  skipped, by reason:")
    lines.extend(f"    {n:>3}  {reason}" for reason, n in sorted(skips.items()))
    for run in runs:
        lines.extend(f"  [{run.method}] environment warning: {w}" for w in run.warnings)
    return "\n".join(lines)


@pytest.mark.timeout(FETCH_TIMEOUT + RUN_TIMEOUT + 60)
def test_cpython_executor_suite(tmp_path: Path) -> None:
    """Every CPython ProcessPoolExecutor test the harness doesn't list as skipped passes
    against MemmapPool, under each start method."""
    suite = _fetch_suite()
    started = [(method, *_start(method, suite, tmp_path)) for method in START_METHODS]
    deadline = time.monotonic() + RUN_TIMEOUT
    runs = [Run(method, results, _finish(proc, deadline)) for method, proc, results in started]
    summary = _summary(runs, suite)
    print(summary)

    report = []
    for run in runs:
        for problem in run.problems:
            report.append(f"[{run.method}] {problem}")
        for test, outcome, detail in run.bad():
            tail = "\n".join(detail.rstrip().splitlines()[-DETAIL_LINES:])
            report.append(f"[{run.method}] {outcome.upper()}: {test}\n{tail}")
    if report:
        pytest.fail(
            f"{summary}\n\n" + "\n\n".join(report) + f"\n\nfull logs: {tmp_path}", pytrace=False
        )
    assert all(run.count("passed") > 0 for run in runs), summary
