"""Runs one approach, in a process of its own, on the orchestrator's command.

``python -m benchmarks._runner CONFIG.json`` reads one JSON command per line on stdin and answers
each with one JSON line on stdout:

- ``{"cmd": "prepare", "workload": KEY}``: start the approach's shared pool if the workload
  wants a started pool and there is none yet, and warm up (one untimed run on two chunks, see
  ``workloads.mini``); answers ``{"skipped": why}`` if the approach cannot run the workload
  here;
- ``{"cmd": "run", "workload": KEY}``: one timed run, then the check against the reference
  (and, for results that are not compared with a reference bit for bit, against the first
  run's fingerprint: every run must give the same bits);
- ``{"cmd": "release"}``: shut the shared pool down;
- ``{"cmd": "startup", "method": M, "repeat": N}``: pool start-up times under start method M;
- ``{"cmd": "exit"}``.

A process per approach keeps the measurements apart: the parent's peak memory is that of a
process that imported only numpy and the approach's own library, and a crash or a leak of one
approach cannot touch the next. The orchestrator keeps all the runners alive and sends the
timed runs round-robin, so that the load of a shared machine, which changes from minute to
minute, falls on every approach alike.
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing
import os
import statistics
import sys
import time
import traceback
import warnings
from typing import Any

import numpy as np

from .approaches import APPROACHES, Approach
from .memory import Sampler, record_reaped_children
from .workloads import Workload, check_run, mini, workload_from_dict

# fork() with the sampler thread running is what is measured on purpose (Python >= 3.12 warns).
warnings.filterwarnings("ignore", message=".*multi-threaded.*fork.*", category=DeprecationWarning)


def _load_reference(path: str, key: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {
            name.split(".", 1)[1]: data[name] for name in data.files if name.split(".", 1)[0] == key
        }


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class Runner:
    """The state of one approach between commands: its shared pool, if started."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.approach: Approach | None = None
        if cfg.get("approach"):
            cls = APPROACHES[cfg["approach"]]
            self.approach = cls(cfg["workers"], cfg["start_method"], cfg["temp_dir"])
            self.approach.prepare()
        self.workloads = {d["key"]: workload_from_dict(d) for d in cfg.get("workloads", [])}
        self._stack = contextlib.ExitStack()
        self._pool: Any = None
        self._started = False
        self._sampler = Sampler()
        self._fingerprints: dict[str, str] = {}  # workload -> the first run's

    def _out_dir(self, w: Workload) -> str:
        return self.cfg["disk_dir"] if w.on_disk else self.cfg["temp_dir"]

    def prepare(self, key: str) -> dict[str, Any]:
        assert self.approach is not None
        w = self.workloads[key]
        why = self.approach.unavailable(w)
        if why:
            return {"skipped": why}
        if not w.startup and not self._started:
            self._pool = self._stack.enter_context(self.approach.pool(w, self.cfg["temp_dir"]))
            self._started = True
        # Warm-up (not timed): imports in the workers, the first mapping, thread creation.
        warm = mini(w)
        out_dir = self._out_dir(w)
        if w.startup:
            with self.approach.pool(warm, out_dir) as p:
                self.approach.compute(p, warm, out_dir).close()
            return {}
        output = self.approach.compute(self._pool, warm, out_dir)
        try:
            if warm == w:
                # A warm-up of the whole workload: the first result the timed runs must
                # reproduce, where results are compared by fingerprint.
                ref = _load_reference(self.cfg["reference"], key)
                problem, fingerprint = check_run(w, output.array, ref)
                if fingerprint and not problem:
                    self._fingerprints[key] = fingerprint
        finally:
            output.close()
        return {}

    def run(self, key: str) -> dict[str, Any]:
        """One timed run of workload ``key``, then the check of its result."""
        assert self.approach is not None
        w = self.workloads[key]
        out_dir = self._out_dir(w)
        gc.collect()
        self._sampler.start()
        t0 = time.perf_counter()
        if w.startup:
            with self.approach.pool(w, out_dir) as p:
                output = self.approach.compute(p, w, out_dir)
        else:
            output = self.approach.compute(self._pool, w, out_dir)
        wall = time.perf_counter() - t0
        peaks = self._sampler.stop()
        elapsed = wall if output.measured is None else output.measured
        try:
            # The reference is loaded only now, after the clock and the memory sampler have
            # stopped: it must not count in this process's memory (nor in forked workers').
            ref = _load_reference(self.cfg["reference"], key)
            problem, fingerprint = check_run(w, output.array, ref)
            del ref
            if problem is None:
                problem = self.approach.verify(None if w.startup else self._pool, w, output)
            if problem is None and fingerprint:
                first = self._fingerprints.setdefault(key, fingerprint)
                if fingerprint != first:
                    problem = (
                        "not the same result as the first run (its warm-up or first timed "
                        f"run): fingerprint {fingerprint[:16]}, first {first[:16]}"
                    )
            info = output.info
        finally:
            output.close()
            del output
        return {
            "time": elapsed,
            "wall": wall,
            "info": info,
            "problem": problem,
            "parent_peak": peaks.parent.hwm,
            "parent_anon": peaks.parent.anon,
            "worker_peak": peaks.worker_hwm,
            "worker_anon": peaks.worker_anon,
            "workers_seen": len(peaks.workers),
            "cpu_parent": peaks.parent_cpu,
            "cpu_workers": peaks.workers_cpu,
            "exact": peaks.exact,
        }

    def release(self) -> dict[str, Any]:
        self._stack.close()
        self._pool, self._started = None, False
        return {}

    def startup(self, method: str, repeat: int) -> dict[str, Any]:
        return measure_startup(method, self.cfg["workers"], repeat, self.cfg["temp_dir"])


# -- pool start-up -----------------------------------------------------------------------------

PRELOAD = "forkserver+preload"
"""The forkserver start method with ``multiprocessing.set_forkserver_preload``."""

PROBE_SLEEP = 0.01
"""A probe task sleeps this long, so that one worker cannot take every probe while another is
still starting."""


def _probe() -> tuple[int, float]:
    started = time.monotonic()  # system-wide clock on Linux: comparable across processes
    time.sleep(PROBE_SLEEP)
    return os.getpid(), started


def _time_until_ready(executor: Any, workers: int, t0: float) -> float:
    """Seconds from ``t0`` until every worker has started a task."""
    first: dict[int, float] = {}
    for _ in range(1000):
        futures = [executor.submit(_probe) for _ in range(workers)]
        for f in futures:
            pid, started = f.result(timeout=120)
            first.setdefault(pid, started)
        if len(first) >= workers:
            break
    return max(sorted(first.values())[:workers]) - t0


def _measure_pools(make: Any, workers: int, repeat: int) -> dict[str, Any]:
    starts, stops = [], []
    for _ in range(repeat + 1):
        t0 = time.monotonic()
        pool = make()
        starts.append(_time_until_ready(pool, workers, t0))
        t1 = time.monotonic()
        pool.shutdown(wait=True)
        stops.append(time.monotonic() - t1)
    return {
        "first": starts[0],
        "later": statistics.median(starts[1:]),
        "shutdown": statistics.median(stops),
    }


def measure_startup(method: str, workers: int, repeat: int, temp_dir: str) -> dict[str, Any]:
    """Start-up of MemmapPool and of a bare ProcessPoolExecutor under ``method`` (a start
    method, or :data:`PRELOAD`): the first pool of this process, then the median of
    ``repeat`` more."""
    from concurrent.futures import ProcessPoolExecutor

    from memmap_pool import MemmapPool

    if method == PRELOAD:
        # Workers fork from a server that has imported these already, instead of importing
        # them each; this must be said before the server starts (the first pool).
        method = "forkserver"
        multiprocessing.set_forkserver_preload(["numpy", "memmap_pool", "memmap_pool._worker"])
    context = multiprocessing.get_context(method)
    return {
        "memmap_pool": _measure_pools(
            lambda: MemmapPool(workers, mp_context=method, temp_dir=temp_dir), workers, repeat
        ),
        "ppe": _measure_pools(
            lambda: ProcessPoolExecutor(workers, mp_context=context), workers, repeat
        ),
    }


# -- the command loop --------------------------------------------------------------------------


def serve(cfg: dict[str, Any], commands: Any, answers: Any) -> None:
    runner = Runner(cfg)
    try:
        for line in commands:
            if not line.strip():
                continue
            msg = json.loads(line)
            cmd = msg["cmd"]
            if cmd == "exit":
                break
            try:
                if cmd == "prepare":
                    answer = runner.prepare(msg["workload"])
                elif cmd == "run":
                    answer = runner.run(msg["workload"])
                elif cmd == "release":
                    answer = runner.release()
                elif cmd == "startup":
                    answer = runner.startup(msg["method"], msg["repeat"])
                else:
                    answer = {"error": f"unknown command {cmd!r}"}
            except Exception as exc:
                answer = {"error": describe(exc), "traceback": traceback.format_exc()}
            answers.write(json.dumps(answer) + "\n")
            answers.flush()
    finally:
        runner.release()


def main(argv: list[str]) -> int:
    (config_path,) = argv
    with open(config_path) as f:
        cfg = json.load(f)
    record_reaped_children()
    # Answers go to a private copy of stdout; fd 1 itself now points at stderr, so that
    # anything printed by a library or a worker cannot get mixed into them.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(cfg, sys.stdin, answers)
    answers.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
