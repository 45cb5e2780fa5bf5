"""Compare MemmapPool with every other way of doing the same work, in one run.

Usage (from the repository root)::

    python -m benchmarks                        # full run: writes docs/performance.md and .png
    python -m benchmarks --smoke                # tiny sizes, 1 repeat: does every approach run
                                                # and compute the right values? (< 60 s)
    python -m benchmarks --out-of-core 32G      # also fill a 32 GiB output on disk
    python -m benchmarks --workloads stencil    # only the stencil (any subset of workloads)
    python -m benchmarks --workloads heat,empty_step,reduction,normals

Each approach runs in a process of its own (see ``_runner.py``). This process computes the
serial reference, starts one runner per approach, and then, workload by workload, has every
runner warm up and sends the timed runs round-robin (run 1 of every approach, then run 2, ...),
so that the changing load of a shared machine falls on all approaches alike. Then it checks the
targets and writes the report. The files workloads read (the stencil's input image, the initial
states of heat and of the empty step, the reduction's array, on a disk) and the reference results
they are checked against are written before anything is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import multiprocessing
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import numpy as np

from benchmarks import report
from benchmarks._runner import PRELOAD
from benchmarks.approaches import APPROACHES, REQUIRES
from benchmarks.workloads import (
    HEAT_ALPHA,
    STENCIL_DEPTH,
    STENCIL_MODE,
    STENCIL_SIGMA,
    Workload,
    format_size,
    full_workloads,
    normals_tolerance,
    reference,
    resize_reduction,
    smoke_workloads,
    write_files,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN_TIMEOUT = 900.0
"""Seconds one command to a runner (a warm-up, one timed run) may take before the runner is
stopped; only a hang gets near it. Out-of-core runs get :data:`OUT_OF_CORE_TIMEOUT`."""

OUT_OF_CORE_TIMEOUT = 3600.0

SMOKE_TIMEOUT = 120.0

SHORT_NAMES = {
    "fill": "fill {size}\n(start-up incl.)",
    "gil": "GIL-bound",
    "compute": "compute-bound\n(GIL released)",
    "tiny": "{n_chunks:,} tiny\nchunks",
    "ooc": "out-of-core fill\n{size} on disk",
    "stencil": "Gaussian blur\n{size} image",
    "heat": "heat equation\n{size}, {steps} steps",
    "empty_step_small": "empty step\n{size} state",
    "empty_step_large": "empty step\n{size} state",
    "reduction": "sum of a {size}\n.npy on disk",
    "normals": "{count}\nnormals",
}

WORKLOADS = (
    "fill",
    "gil",
    "compute",
    "tiny",
    "stencil",
    "heat",
    "empty_step",
    "reduction",
    "normals",
)
"""Every workload that ``--workloads`` can pick (ooc is added by ``--out-of-core``);
"empty_step" is two, a small state and a large one."""

GiB = 2**30

REDUCTION_MARGIN = 2 * GiB
"""Disk space the reduction's file leaves free, at least (and a tenth of what is free)."""

REDUCTION_MIN = 64 * 2**20
"""The smallest reduction's file worth timing: with less room, the reduction is left out."""


def parse_size(text: str) -> int:
    """``32G``, ``32GiB``, ``500M``, ``1048576`` -> bytes (binary units)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        msg = f"not a size: {text!r} (examples: 32G, 500M, 1048576)"
        raise argparse.ArgumentTypeError(msg) from None
    if value <= 0:
        msg = f"size must be positive (got {text!r})"
        raise argparse.ArgumentTypeError(msg)
    return int(value)


def _fs_type(path: str) -> str:
    """Filesystem type of the mount holding ``path`` (longest matching mount point)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mount, fstype = parts[1], parts[2]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
                    best
                ):
                    best, kind = mount, fstype
    except OSError:
        pass
    return kind


def _mem_available() -> int | None:
    """MemAvailable of /proc/meminfo, bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reduction_size(wanted: int, directory: str, reserved: int = 0) -> tuple[int, str]:
    """The most of ``wanted`` bytes the reduction's file can have in ``directory``: what fits
    on its disk, keeping :data:`REDUCTION_MARGIN` (or a tenth of the free space) free besides
    ``reserved`` bytes, and in half of the available memory (the page cache must hold it); a
    note for the report when that is less than ``wanted``. ``(0, why)`` when not even
    :data:`REDUCTION_MIN` fits."""
    free = shutil.disk_usage(directory).free - reserved
    fits = free - max(REDUCTION_MARGIN, free // 10)
    size, notes = wanted, []
    if size > fits:
        size = fits
        besides = " besides the out-of-core output" if reserved else ""
        notes.append(f"{format_size(max(free, 0))} free in {directory}{besides}")
    available = _mem_available()
    if available is not None and size > available // 2:
        size = available // 2
        notes.append(f"{format_size(available)} of memory available for the page cache")
    if size < wanted:
        if size < min(wanted, REDUCTION_MIN):
            return (
                0,
                f"not even {format_size(min(wanted, REDUCTION_MIN))} fits ({'; '.join(notes)})",
            )
        unit = 64 * 2**20 if size >= 64 * 2**20 else 8
        size = size // unit * unit
        note = (
            f"{format_size(size)} instead of {format_size(wanted)}: the most that fits "
            f"({'; '.join(notes)})"
        )
        return size, note
    return size, ""


def _ram_dir(needed: int) -> str:
    """Where file-backed outputs go when they fit in RAM: /dev/shm, as MemmapPool chooses."""
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * needed:
        return "/dev/shm"
    return tempfile.gettempdir()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Compare MemmapPool with the other ways of filling a numpy array on "
        "several cores, on the same work, and write docs/performance.md.",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and 1 repeat: checks that every approach runs and computes "
        "the right values; writes no docs unless --docs-dir is given",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="timed runs per approach and workload; the median is reported "
        "(default 3, 1 with --smoke)",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes or threads (default 2)")
    p.add_argument(
        "--start-method",
        default=multiprocessing.get_start_method(),
        choices=multiprocessing.get_all_start_methods(),
        help="start method of every process pool (default: the platform's, %(default)s)",
    )
    p.add_argument(
        "--approaches",
        default=",".join(APPROACHES),
        help="comma-separated subset of: " + ", ".join(APPROACHES),
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated subset of: " + ", ".join(WORKLOADS) + " (e.g. --workloads "
        "stencil runs the stencil alone; ooc is added by --out-of-core)",
    )
    p.add_argument(
        "--out-of-core",
        type=parse_size,
        metavar="SIZE",
        default=None,
        help="also fill an output of SIZE (e.g. 32G, more than the RAM) in --disk-dir",
    )
    p.add_argument(
        "--disk-dir",
        default=None,
        help="directory on a disk (not tmpfs) for --out-of-core and for the reduction's "
        "input file (default: the system temp dir, if it is on a disk)",
    )
    p.add_argument(
        "--no-startup",
        action="store_true",
        help="skip the pool start-up measurement per start method",
    )
    p.add_argument(
        "--json", metavar="PATH", default=None, help="also write every measurement as JSON to PATH"
    )
    p.add_argument(
        "--docs-dir",
        default=None,
        help="where performance.md and performance.png go (default: docs/ of the "
        "repository for a full run, nowhere for --smoke)",
    )
    p.add_argument("--no-docs", action="store_true", help="write no docs")
    p.add_argument("--no-plot", action="store_true", help="write the docs without the PNG plot")
    p.add_argument(
        "--from-json",
        metavar="PATH",
        default=None,
        help="run nothing: rewrite the report from a --json file of an earlier run",
    )
    return p


def _missing_module(name: str) -> str | None:
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else name


class RunnerProcess:
    """One ``benchmarks._runner`` process and the line-by-line conversation with it."""

    def __init__(self, cfg: dict[str, Any], work: str, name: str) -> None:
        self.name = name
        config_path = os.path.join(work, f"{name}.config.json")
        with open(config_path, "w") as f:
            json.dump(cfg, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # A session of its own, so that a runner that hangs is stopped with all its workers.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._runner", config_path],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.dead: str | None = None
        self._answers: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name=f"read-{name}").start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._answers.put(line)
        self._answers.put(None)

    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one command and wait for its answer; ``{"error": ...}`` if there is none."""
        if self.dead:
            return {"error": self.dead}
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self._answers.get(timeout=timeout)
        except BrokenPipeError:
            line = None
        except queue.Empty:
            self.kill()
            self.dead = f"no answer to {msg['cmd']!r} within {timeout:.0f} s (runner stopped)"
            return {"error": self.dead}
        if line is None:  # the runner closed its answers: it is exiting
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            code = self.proc.returncode
            self.kill()
            self.dead = f"the runner exited with code {code} (its output is above)"
            return {"error": self.dead}
        return json.loads(line)  # type: ignore[no-any-return]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.dead is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of its session (a worker that outlived its pool) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def summarize(runs: list[dict[str, Any]], error: str | None) -> dict[str, Any]:
    """One approach on one workload: the timed runs folded into what the report shows."""
    if not runs:
        return {"status": "error", "detail": error or "no run"}
    problems = [r["problem"] for r in runs if r["problem"]]
    times = [r["time"] for r in runs]
    status = "error" if error else "wrong" if problems else "ok"
    return {
        "status": status,
        "detail": error or (problems[0] if problems else ""),
        "times": times,
        "median": statistics.median(times),
        # The whole call, where the time reported is not (the empty step's time per step).
        "wall_median": statistics.median(r.get("wall", r["time"]) for r in runs),
        "info": runs[-1].get("info") or {},
        "parent_peak": max(r["parent_peak"] for r in runs),
        "parent_anon": max(r["parent_anon"] for r in runs),
        "worker_peak": max(r["worker_peak"] for r in runs),
        "worker_anon": max(r["worker_anon"] for r in runs),
        "workers_seen": max(r["workers_seen"] for r in runs),
        "cpu_parent": statistics.median(r["cpu_parent"] for r in runs),
        "cpu_workers": statistics.median(r["cpu_workers"] for r in runs),
        "peaks_exact": all(r["exact"] for r in runs),
    }


def _progress(key: str, w: Workload, i: int, n: int, answer: dict[str, Any]) -> None:
    if "error" in answer:
        text = f"error: {answer['error']}"
    else:
        text = (
            f"{answer['time']:8.3f} s  cpu {answer['cpu_parent']:.2f}+"
            f"{answer['cpu_workers']:.2f} s  parent {answer['parent_peak'] / 2**20:6.0f} MiB"
            + (
                f"  worker {answer['worker_peak'] / 2**20:6.0f} MiB"
                if answer["workers_seen"]
                else ""
            )
            + (f"  WRONG: {answer['problem']}" if answer["problem"] else "")
        )
    print(f"  {w.key:<8} {i + 1}/{n} {key:<18} {text}", file=sys.stderr, flush=True)


def run_all(
    wanted: list[str],
    workloads: list[Workload],
    repeat: int,
    base_cfg: dict[str, Any],
    work: str,
    smoke: bool,
) -> dict[str, Any]:
    """Every approach on every workload, timed runs interleaved round-robin."""
    results: dict[str, dict[str, Any]] = {key: {} for key in wanted}
    runners: dict[str, RunnerProcess] = {}
    try:
        for key in wanted:
            missing = _missing_module(REQUIRES.get(key, "numpy"))
            if missing:
                for w in workloads:
                    if not APPROACHES[key].runs(w):
                        continue
                    results[key][w.key] = {
                        "status": "skipped",
                        "detail": f"{missing} is not installed",
                    }
                print(f"  {key}: skipped ({missing} is not installed)", file=sys.stderr)
                continue
            runners[key] = RunnerProcess({**base_cfg, "approach": key}, work, key)
        for n, w in enumerate(workloads):
            timeout = SMOKE_TIMEOUT if smoke else OUT_OF_CORE_TIMEOUT if w.on_disk else RUN_TIMEOUT
            active = []
            for key in runners:
                if not APPROACHES[key].runs(w):
                    continue  # not this kind of workload: no entry in the results
                if w.on_disk and APPROACHES[key].ram_only:
                    results[key][w.key] = {
                        "status": "n/a",
                        "detail": "holds the whole output in RAM: cannot fill an output larger "
                        "than memory",
                    }
                else:
                    active.append(key)
            runs: dict[str, list[dict[str, Any]]] = {key: [] for key in active}
            errors: dict[str, str] = {}
            for key in list(active):
                answer = runners[key].call({"cmd": "prepare", "workload": w.key}, timeout)
                if "error" in answer:
                    errors[key] = f"warm-up failed: {answer['error']}"
                    print(f"  {w.key:<8} {key}: {errors[key]}", file=sys.stderr, flush=True)
                elif "skipped" in answer:
                    results[key][w.key] = {"status": "skipped", "detail": answer["skipped"]}
                    active.remove(key)
                    print(
                        f"  {w.key:<8} {key}: skipped ({answer['skipped']})",
                        file=sys.stderr,
                        flush=True,
                    )
            reps = 1 if w.on_disk else repeat
            for i in range(reps):
                # Each round starts with the next approach, so none is always first.
                for key in active[i % len(active) :] + active[: i % len(active)]:
                    if key in errors:
                        continue
                    answer = runners[key].call({"cmd": "run", "workload": w.key}, timeout)
                    _progress(key, w, i, reps, answer)
                    if "error" in answer:
                        errors[key] = answer["error"]
                    else:
                        runs[key].append(answer)
            for key in active:
                results[key][w.key] = summarize(runs[key], errors.get(key))
            # Started pools are shared by the workloads that want one; stop them after the
            # last, so that they do not stand by during the others (every runner's: one that
            # skipped this workload may have started its pool for an earlier one).
            if not any(not later.startup for later in workloads[n + 1 :]):
                for key in runners:
                    runners[key].call({"cmd": "release"}, timeout)
    finally:
        for runner in runners.values():
            runner.close()
    return results


def measure_startup_all(workers: int, repeat: int, work: str, smoke: bool) -> dict[str, Any]:
    """Pool start-up per start method, each in a fresh process (so "first" is cold)."""
    out: dict[str, Any] = {}
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        methods.append(PRELOAD)
    for n, method in enumerate(methods):
        runner = RunnerProcess({"workers": workers, "temp_dir": work}, work, f"startup-{n}")
        try:
            answer = runner.call(
                {"cmd": "startup", "method": method, "repeat": repeat},
                SMOKE_TIMEOUT if smoke else RUN_TIMEOUT,
            )
        finally:
            runner.close()
        out[method] = answer
        print(
            f"  start-up {method}: {'error: ' + answer['error'] if 'error' in answer else 'done'}",
            file=sys.stderr,
            flush=True,
        )
    return out


def _workload_info(w: Workload, repeat: int) -> dict[str, Any]:
    n = int(np.prod(w.shape))
    return {
        "key": w.key,
        "title": w.title,
        "short": SHORT_NAMES.get(w.key, w.key),
        "kind": w.kind,
        "group": w.name,
        "steps": w.steps,
        "note": w.note,
        "count": f"{n / 1e6:g} M" if n >= 10**6 else f"{n:,}",
        "shape": list(w.shape),
        "dtype": w.dtype,
        "chunk_rows": w.chunk_rows,
        "n_chunks": w.n_chunks,
        "chunk_bytes": w.chunk_bytes,
        "chunk_size": format_size(w.chunk_bytes),
        "size": format_size(w.nbytes),
        "task_batch": w.task_batch,
        "startup": w.startup,
        "on_disk": w.on_disk,
        "repeat": 1 if w.on_disk else repeat,
        "stencil": w.stencil,
        **(
            {"sigma": STENCIL_SIGMA, "depth": STENCIL_DEPTH, "mode": STENCIL_MODE}
            if w.stencil
            else {}
        ),
        **({"alpha": HEAT_ALPHA} if w.kind == "heat" else {}),
        **({"tolerance": normals_tolerance(n)} if w.kind == "normals" else {}),
    }


def write_docs(run: dict[str, Any], docs_dir: str, with_plot: bool) -> None:
    """docs_dir/performance.md (keeping its analysis section) and performance.png."""
    os.makedirs(docs_dir, exist_ok=True)
    png = None
    if with_plot:
        problem = report.plot(run, os.path.join(docs_dir, "performance.png"))
        if problem:
            print(f"no plot: {problem}", file=sys.stderr)
        else:
            png = "performance.png"
    md_path = os.path.join(docs_dir, "performance.md")
    analysis = report.kept_analysis(md_path)
    with open(md_path, "w") as f:
        f.write(report.markdown(run, png, analysis))
    print(f"wrote {md_path}", file=sys.stderr)


def _statuses(run: dict[str, Any]) -> int:
    bad = [
        (a, w, r["status"])
        for a, rs in run["results"].items()
        for w, r in rs.items()
        if r["status"] in ("wrong", "error")
    ]
    for a, w, status in bad:
        print(f"{status}: {run['approach_labels'][a]} on {w}", file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            run = json.load(f)
        run["targets"] = report.check_targets(run["results"], run["workloads"])
        print(report.console_report(run))
        if not args.no_docs:
            write_docs(run, args.docs_dir or os.path.join(ROOT, "docs"), not args.no_plot)
        return _statuses(run)
    repeat = args.repeat or (1 if args.smoke else 3)
    if repeat < 1:
        print("--repeat must be at least 1", file=sys.stderr)
        return 2
    wanted = [k.strip() for k in args.approaches.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in APPROACHES]
    if unknown:
        print(
            f"unknown approaches: {', '.join(unknown)}; choose from {', '.join(APPROACHES)}",
            file=sys.stderr,
        )
        return 2
    if "memmap_pool" not in wanted:
        wanted.insert(0, "memmap_pool")  # the one every ratio refers to
    make = smoke_workloads if args.smoke else full_workloads
    chosen = [k.strip() for k in args.workloads.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in WORKLOADS]
    if unknown:
        print(
            f"unknown workloads: {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}",
            file=sys.stderr,
        )
        return 2
    workloads = [w for w in make(args.out_of_core) if w.name in chosen or w.key == "ooc"]
    if any(w.stencil for w in workloads) and _missing_module("scipy"):
        # The stencil function and the serial reference are scipy's.
        print("  stencil: skipped (scipy is not installed)", file=sys.stderr)
        workloads = [w for w in workloads if not w.stencil]
    if not workloads:
        print(f"no workloads selected from {args.workloads!r}", file=sys.stderr)
        return 2
    # Approaches that run none of these workloads get no runner and no row.
    left_out = [k for k in wanted if not any(APPROACHES[k].runs(w) for w in workloads)]
    if left_out:
        print(f"  not run on these workloads: {', '.join(left_out)}", file=sys.stderr)
        wanted = [k for k in wanted if k not in left_out]

    disk_dir = None
    reducing = any(w.kind == "reduction" for w in workloads)
    if args.out_of_core or reducing:
        disk_dir = os.path.abspath(args.disk_dir or tempfile.gettempdir())
    if args.out_of_core:
        assert disk_dir is not None
        if not os.path.isdir(disk_dir):
            print(f"--disk-dir {disk_dir} is not a directory", file=sys.stderr)
            return 2
        kind = _fs_type(disk_dir)
        if kind in ("tmpfs", "ramfs"):
            print(
                f"--out-of-core needs a directory on a disk, and {disk_dir} is on {kind} "
                "(RAM); pass --disk-dir",
                file=sys.stderr,
            )
            return 2
        free = shutil.disk_usage(disk_dir).free
        if free < args.out_of_core * 1.05:
            print(
                f"--out-of-core {format_size(args.out_of_core)} does not fit in {disk_dir} "
                f"({format_size(free)} free); pass --disk-dir or a smaller size",
                file=sys.stderr,
            )
            return 2
    if reducing:
        assert disk_dir is not None
        if not os.path.isdir(disk_dir):
            print(f"--disk-dir {disk_dir} is not a directory", file=sys.stderr)
            return 2
        # The reduction's file goes on a disk; without one (the temp dir on tmpfs), in RAM,
        # which the report says.
        kind = _fs_type(disk_dir)
        ram_note = (
            f"{disk_dir} is on {kind} (RAM), not a disk: pass --disk-dir"
            if kind in ("tmpfs", "ramfs")
            else ""
        )
        kept = []
        for w in workloads:
            if w.kind == "reduction":
                size, note = reduction_size(w.nbytes, disk_dir, reserved=args.out_of_core or 0)
                if not size:
                    print(f"  reduction: left out, its file does not fit: {note}", file=sys.stderr)
                    continue
                if note:
                    w = resize_reduction(size, note) if not args.smoke else replace(w, note=note)
                if ram_note:
                    w = replace(w, note="; ".join(filter(None, [w.note, ram_note])))
            kept.append(w)
        workloads = kept
        if not workloads:
            print("no workloads left to run", file=sys.stderr)
            return 2

    # Workloads' input and reference files are there too, beside their outputs.
    largest = max((w.ram_bytes for w in workloads if not w.on_disk), default=0)
    ram_base = _ram_dir(largest)
    work = tempfile.mkdtemp(prefix="mmpbench-", dir=ram_base)
    disk_work = tempfile.mkdtemp(prefix="mmpbench-", dir=disk_dir) if disk_dir else None
    started = time.time()
    load_before = report.load_average()
    machine = report.machine_info()
    print(
        f"memmap-pool benchmarks ({'smoke' if args.smoke else 'full'}): {machine['cpu']}, "
        f"{machine['cores']} cores, {machine['ram_gib']} GiB, Python {machine['python']}, "
        f"numpy {machine['numpy']}; {args.workers} workers, start method "
        f"{args.start_method}, repeat {repeat}",
        file=sys.stderr,
        flush=True,
    )
    try:
        # 1. What the workloads read and the results they must equal (before anything is
        # timed: the stencil's image and its serial blur, heat's initial state and its
        # reference, the reduction's file on a disk), and the serial reference of the fills,
        # once, chunk by chunk (the reduction's: its serial sum, which warms the page cache).
        workloads = [write_files(w, work, disk_work) for w in workloads]
        ref_path = os.path.join(work, "reference.npz")
        refs: dict[str, np.ndarray] = {}
        for w in workloads:
            for name, arr in reference(w).items():
                refs[f"{w.key}.{name}"] = arr
        np.savez(ref_path, **refs)
        del refs

        # 2. Pool start-up per start method.
        startup: dict[str, Any] = {}
        if not args.no_startup:
            startup = measure_startup_all(args.workers, repeat, work, args.smoke)

        # 3. Every approach, one process each, timed runs interleaved.
        labels = {key: APPROACHES[key].label for key in wanted}
        kinds = list(dict.fromkeys(w.kind for w in workloads))
        patterns = {
            kind: {
                key: APPROACHES[key].patterns[kind]
                for key in wanted
                if kind in APPROACHES[key].patterns
            }
            for kind in kinds
        }
        base_cfg = {
            "workers": args.workers,
            "start_method": args.start_method,
            "temp_dir": work,
            "disk_dir": disk_work,
            "reference": ref_path,
            "workloads": [w.__dict__ for w in workloads],
        }
        results = run_all(wanted, workloads, repeat, base_cfg, work, args.smoke)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if disk_work:
            shutil.rmtree(disk_work, ignore_errors=True)

    winfo = {w.key: _workload_info(w, repeat) for w in workloads}
    run: dict[str, Any] = {
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "duration": time.time() - started,
        "machine": machine,
        "load_before": load_before,
        "load_after": report.load_average(),
        "workers": args.workers,
        "start_method": args.start_method,
        "repeat": repeat,
        "ram_dir": ram_base,
        "disk_dir": disk_dir if args.out_of_core else None,
        "workloads": winfo,
        "reduction_dir": disk_dir if reducing else None,
        "approach_labels": labels,
        "patterns": patterns,
        "requires": {key: REQUIRES.get(key, "numpy") for key in wanted},
        "results": results,
        "startup": startup,
    }
    run["targets"] = report.check_targets(results, winfo)
    print(report.console_report(run))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(run, f, indent=1)
    docs_dir = args.docs_dir or (None if args.smoke else os.path.join(ROOT, "docs"))
    if docs_dir and not args.no_docs:
        write_docs(run, docs_dir, not args.no_plot)
    return _statuses(run)


if __name__ == "__main__":
    raise SystemExit(main())
