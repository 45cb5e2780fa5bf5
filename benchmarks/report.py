"""What a run found, as text: the machine, the tables, the target check, the plot."""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

MiB = 2**20


# -- the machine ---------------------------------------------------------------------------------


def _first_line_with(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip() if ":" in line else line.strip()
    except OSError:
        pass
    return None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, memory, OS, Python, numpy, BLAS, versions."""
    import numpy as np

    info: dict[str, Any] = {
        "cpu": _first_line_with("/proc/cpuinfo", "model name") or platform.processor() or "?",
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": None,
        "os": platform.platform(),
        "distro": (_first_line_with("/etc/os-release", "PRETTY_NAME=") or "")
        .replace("PRETTY_NAME=", "")
        .strip('"'),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "memmap_pool": _version("memmap-pool"),
        "joblib": _version("joblib"),
        "dask": _version("dask"),
        "scipy": _version("scipy"),
        "skimage": _version("scikit-image"),
        "blas": [],
        "env": {
            k: os.environ[k]
            for k in (
                "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE",
                "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS",
            )
            if k in os.environ
        },
    }
    total = _first_line_with("/proc/meminfo", "MemTotal")
    if total:
        info["ram_gib"] = round(int(total.split()[0]) / 2**20, 1)
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    info["distro"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {
                k: d.get(k)
                for k in (
                    "internal_api",
                    "version",
                    "architecture",
                    "num_threads",
                    "threading_layer",
                )
            }
            for d in threadpool_info()
        ]
    except ImportError:
        pass
    return info


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


# -- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One target of the performance issue, checked against a run's results."""

    text: str
    measure: Callable[[dict[str, Any]], tuple[float | None, str]]
    # (value, how it was obtained) from the results; value None: could not be measured
    limit: float
    higher_is_better: bool = False
    unit: str = "x"

    def check(self, results: dict[str, Any]) -> dict[str, Any]:
        value, how = self.measure(results)
        if value is None:
            return {"target": self.text, "value": None, "how": how, "verdict": "not measured"}
        if math.isnan(value):  # MemmapPool itself failed or gave wrong values
            return {"target": self.text, "value": None, "how": how, "verdict": "NOT met"}
        met = value >= self.limit if self.higher_is_better else value <= self.limit
        return {
            "target": self.text,
            "value": value,
            "how": how,
            "verdict": "met" if met else "NOT met",
        }


def _ok(results: dict[str, Any], approach: str, workload: str) -> dict[str, Any] | None:
    r = results.get(approach, {}).get(workload)
    return r if r and r.get("status") == "ok" else None


def _kind(w: dict[str, Any]) -> str:
    """A workload's kind (runs recorded before there were kinds: a fill or the stencil)."""
    return str(w.get("kind") or ("stencil" if w.get("stencil") else "fill"))


def _missing(results: dict[str, Any], approach: str, workload: str, name: str = "") -> str:
    """Why there is no correct result of ``approach`` on ``workload``, for the targets."""
    r = results.get(approach, {}).get(workload)
    why = f" ({r['status']}: {r.get('detail', '')})" if r and r.get("status") else ""
    return f"no correct {workload} result for {name or approach}{why}"


def _failed(results: dict[str, Any], workload: str, key: str = "memmap_pool") -> str | None:
    """How MemmapPool's own result on ``workload`` failed, if it did."""
    r = results.get(key, {}).get(workload)
    if r and r.get("status") in ("wrong", "error"):
        return f"MemmapPool's result is {r['status']}: {r.get('detail', '')}"
    return None


def _ratio(
    workload: str, peer: str, invert: bool = False, mine_key: str = "memmap_pool"
) -> Callable[..., tuple[float | None, str]]:
    name = "MemmapPool" if mine_key == "memmap_pool" else f"MemmapPool ({mine_key})"

    def measure(results: dict[str, Any]) -> tuple[float | None, str]:
        failed = _failed(results, workload, mine_key)
        if failed:
            return math.nan, failed
        mine, theirs = _ok(results, mine_key, workload), _ok(results, peer, workload)
        if mine is None:
            return None, _missing(results, mine_key, workload, name)
        if theirs is None:
            return None, _missing(results, peer, workload)
        a, b = mine["median"], theirs["median"]
        if invert:
            return b / a, f"{peer} {b:.3f} s / {name} {a:.3f} s"
        return a / b, f"{name} {a:.3f} s / {peer} {b:.3f} s"

    return measure


def _per_chunk(results: dict[str, Any], workloads: dict[str, Any]) -> tuple[float | None, str]:
    failed = _failed(results, "tiny")
    if failed:
        return math.nan, failed
    r = _ok(results, "memmap_pool", "tiny")
    if r is None or "tiny" not in workloads:
        return None, "no correct tiny-chunks result for MemmapPool"
    n = workloads["tiny"]["n_chunks"]
    detail = f"{r['median']:.3f} s / {n} chunks"
    limit = _ok(results, "processes", "tiny")
    if limit is not None:
        # The rows of a fresh shared file cost their page faults whoever writes them: what
        # plain processes pay for the same rows shows how much of the time is dispatch.
        detail += (
            f"; plain processes writing the same rows: {limit['median'] / n * 1e6:.1f} us per "
            f"chunk, so MemmapPool adds {(r['median'] - limit['median']) / n * 1e6:.1f} us"
        )
    return r["median"] / n * 1e6, detail


def _parent_peak(results: dict[str, Any]) -> tuple[float | None, str]:
    mine = {k: r for k, r in results.get("memmap_pool", {}).items() if "parent_peak" in r}
    if not mine:
        return None, "no MemmapPool result"
    worst = max(mine, key=lambda k: mine[k]["parent_peak"])
    return mine[worst]["parent_peak"] / MiB, f"largest in {worst}"


def _worker_peak(results: dict[str, Any], workloads: dict[str, Any]) -> tuple[float | None, str]:
    """Worst margin: the workload whose worker peak is furthest above its own limit.

    The block fills only: their kernels write one chunk and hold nothing else. A stencil's
    kernel also holds its input window and the blurred window, the steps of ``iterate`` keep
    both buffers mapped and resident from step to step, a reduction's and the normals' chunks
    are MemmapPool's own choice: their worker peaks are reported in their tables, not held to
    this limit.
    """
    worst, worst_excess, how = None, None, "no MemmapPool result"
    for key, r in results.get("memmap_pool", {}).items():
        if "worker_peak" not in r or key not in workloads or _kind(workloads[key]) != "fill":
            continue
        limit = 2 * workloads[key]["chunk_bytes"] + 100 * MiB
        excess = r["worker_peak"] - limit
        if worst_excess is None or excess > worst_excess:
            worst, worst_excess = key, excess
            how = (
                f"{key}: {r['worker_peak'] / MiB:.0f} MiB, limit 2 x "
                f"{workloads[key]['chunk_bytes'] / MiB:.1f} MiB + 100 MiB = {limit / MiB:.0f} MiB"
            )
    if worst is None or worst_excess is None:
        return None, how
    # Expressed as peak / limit: <= 1 is met.
    limit = 2 * workloads[worst]["chunk_bytes"] + 100 * MiB
    return results["memmap_pool"][worst]["worker_peak"] / limit, how


def _ooc(results: dict[str, Any], workloads: dict[str, Any]) -> tuple[float | None, str]:
    if "ooc" not in workloads:
        return None, "not run (pass --out-of-core SIZE)"
    r = results.get("memmap_pool", {}).get("ooc", {})
    if r.get("status") == "ok":
        return 1.0, f"{workloads['ooc']['size']} completed and correct in {r['median']:.1f} s"
    return math.nan, f"{r.get('status', 'not run')}: {r.get('detail', '')}"


STENCIL_WAYS = {
    "memmap_pool": "Halo",
    "memmap_pool_view": "Halo 'none'",
    "memmap_pool_blocks": "map_blocks",
}
"""MemmapPool's ways of running the stencil, each held to the stencil's targets."""

STENCIL_PEERS = {
    "serial": "serial scipy",
    "dask_threads": "dask map_overlap (threads)",
    "dask": "dask map_overlap (processes)",
    "skimage": "skimage apply_parallel",
}


def _stencil_ways(
    results: dict[str, Any], workloads: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]] | None, float | None, str]:
    """MemmapPool's correct stencil results by way, or (None, value, why) when there are none:
    value NaN when one of them failed or was wrong, None when one was not run."""
    stencils = [k for k, w in workloads.items() if w.get("stencil")]
    if not stencils:
        return None, None, "not run (see --workloads)"
    wkey = stencils[0]
    mine = {}
    for key, name in STENCIL_WAYS.items():
        r = results.get(key, {}).get(wkey)
        if r and r.get("status") in ("wrong", "error"):
            return (
                None,
                math.nan,
                f"MemmapPool {name}'s result is {r['status']}: {r.get('detail', '')}",
            )
        if not r or r.get("status") != "ok":
            return None, None, f"no correct {wkey} result for MemmapPool {name}"
        mine[key] = r
    return mine, None, wkey


def _stencil_ratio(peer: str, workloads: dict[str, Any]) -> Callable[..., tuple[float | None, str]]:
    """The slowest of MemmapPool's ways / ``peer``, on the stencil."""

    def measure(results: dict[str, Any]) -> tuple[float | None, str]:
        mine, value, wkey = _stencil_ways(results, workloads)
        if mine is None:
            return value, wkey
        theirs = _ok(results, peer, wkey)
        if theirs is None:
            r = results.get(peer, {}).get(wkey, {})
            why = f" ({r['status']}: {r.get('detail', '')})" if r.get("status") else ""
            return None, f"no correct {wkey} result for {peer}{why}"
        slowest = max(mine, key=lambda k: mine[k]["median"])
        a, b = mine[slowest]["median"], theirs["median"]
        return a / b, f"slowest: {STENCIL_WAYS[slowest]} {a:.3f} s / {peer} {b:.3f} s"

    return measure


def _stencil_parent_peak(
    results: dict[str, Any], workloads: dict[str, Any]
) -> tuple[float | None, str]:
    mine, value, wkey = _stencil_ways(results, workloads)
    if mine is None:
        return value, wkey
    worst = max(mine, key=lambda k: mine[k]["parent_peak"])
    return mine[worst]["parent_peak"] / MiB, f"largest: {STENCIL_WAYS[worst]}"


def _per_step(wkey: str) -> Callable[..., tuple[float | None, str]]:
    """MemmapPool's time per empty step on ``wkey``, in milliseconds."""

    def measure(results: dict[str, Any]) -> tuple[float | None, str]:
        failed = _failed(results, wkey)
        if failed:
            return math.nan, failed
        r = _ok(results, "memmap_pool", wkey)
        if r is None:
            return None, _missing(results, "memmap_pool", wkey, "MemmapPool")
        info = r.get("info") or {}
        steps = info.get("steps", "n")
        return r["median"] * 1e3, (
            f"(job of {steps} steps - job of 1 step) / {steps if steps == 'n' else steps - 1}, "
            f"median of {len(r['times'])}; {info.get('chunks', '?')} chunks per step"
        )

    return measure


def targets(workloads: dict[str, Any]) -> list[Target]:
    ways = ", ".join(STENCIL_WAYS.values())

    def size(key: str, default: str) -> str:
        return str(workloads.get(key, {}).get("size", default))

    return [
        Target(
            "memory-bound fill (start-up included) <= 1.05x the hand-written memmap pattern",
            _ratio("fill", "hand_memmap"),
            1.05,
        ),
        Target(
            "memory-bound fill <= 0.30x ProcessPoolExecutor returning arrays",
            _ratio("fill", "ppe_return"),
            0.30,
        ),
        Target(
            "memory-bound fill <= 0.9x joblib's np.memmap output pattern",
            _ratio("fill", "joblib_memmap"),
            0.9,
        ),
        Target(
            "memory-bound fill (start-up included) <= 1.1x plain processes filling a fresh "
            "file (the limit of a process pool)",
            _ratio("fill", "processes"),
            1.1,
        ),
        Target(
            "GIL-bound kernel (pool started) >= 1.9x faster than serial",
            _ratio("gil", "serial", invert=True),
            1.9,
            higher_is_better=True,
        ),
        Target(
            "threads backend: memory-bound fill (start-up included) <= 1.2x "
            "ThreadPoolExecutor into np.empty",
            _ratio("fill", "threads", mine_key="memmap_pool_threads"),
            1.2,
        ),
        Target(
            "threads backend: compute-bound kernel <= 1.05x ThreadPoolExecutor",
            _ratio("compute", "threads", mine_key="memmap_pool_threads"),
            1.05,
        ),
        Target(
            "threads backend: 200 M normals through chunk.random >= 1.7x faster than serial",
            _ratio("normals", "serial", invert=True, mine_key="memmap_pool_threads"),
            1.7,
            higher_is_better=True,
        ),
        Target(
            "compute-bound kernel (pool started) <= 1.1x ThreadPoolExecutor",
            _ratio("compute", "threads"),
            1.1,
        ),
        Target(
            "per-chunk overhead <= 3 us per chunk over 20,000 one-row chunks (the job's "
            "wall time / chunks, pool started)",
            lambda r: _per_chunk(r, workloads),
            3.0,
            unit=" us",
        ),
        Target("parent peak RSS <= 100 MiB", _parent_peak, 100.0, unit=" MiB"),
        Target(
            "each worker's peak RSS <= 2 chunks + 100 MiB (peak / limit; the block fills)",
            lambda r: _worker_peak(r, workloads),
            1.0,
        ),
        Target(
            "out-of-core fill larger than RAM completes",
            lambda r: _ooc(r, workloads),
            1.0,
            higher_is_better=True,
            unit="",
        ),
        *(
            Target(
                f"stencil: the slowest MemmapPool way ({ways}) <= 1.0x {name}",
                _stencil_ratio(peer, workloads),
                1.0,
            )
            for peer, name in STENCIL_PEERS.items()
        ),
        Target(
            f"stencil: parent peak RSS of MemmapPool ({ways}) <= 100 MiB",
            lambda r: _stencil_parent_peak(r, workloads),
            100.0,
            unit=" MiB",
        ),
        Target(
            "heat equation (iterate, pool started) >= 1.8x faster than serial numpy",
            _ratio("heat", "serial", invert=True),
            1.8,
            higher_is_better=True,
        ),
        _near_the_limit("heat", "heat equation"),
        *(
            Target(
                f"empty step, {size(key, default)} state: <= 1 ms per step",
                _per_step(key),
                1.0,
                unit=" ms",
            )
            for key, default in (("empty_step_small", "2 MiB"), ("empty_step_large", "2 GiB"))
        ),
        Target(
            "reduction (reduce_chunks, page cache warm) >= 1.8x faster than serial numpy",
            _ratio("reduction", "serial", invert=True),
            1.8,
            higher_is_better=True,
        ),
        _near_the_limit("reduction", "reduction"),
        _near_the_limit("normals", "normals"),
    ]


def _near_the_limit(kind: str, what: str) -> Target:
    """MemmapPool within 0.9x of plain processes doing the same work with no pool (the
    ``processes`` approach): what any process pool can at best do on this machine."""
    return Target(
        f"{what}: MemmapPool >= 0.9x as fast as plain processes (time <= limit / 0.9)",
        _ratio(kind, "processes", invert=True),
        0.9,
        higher_is_better=True,
    )


def check_targets(results: dict[str, Any], workloads: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for t in targets(workloads):
        row = t.check(results)
        row["limit"] = t.limit
        row["unit"] = t.unit
        row["higher_is_better"] = t.higher_is_better
        out.append(row)
    return out


# -- formatting ---------------------------------------------------------------------------------


def fmt_seconds(s: float) -> str:
    if s >= 10:
        return f"{s:.1f} s"
    if s >= 0.1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms"


def fmt_per_chunk(s: float) -> str:
    us = s * 1e6
    if us >= 1000:
        return f"{us / 1000:.1f} ms"
    return f"{us:.1f} us"


def fmt_mib(b: float) -> str:
    return f"{b / MiB:,.0f}"


def fmt_value(row: dict[str, Any]) -> str:
    v = row["value"]
    if v is None:
        return "-"
    if row["unit"] == "":
        return "yes" if v >= 1 else "no"
    return f"{v:.2f}{row['unit']}" if row["unit"] != " MiB" else f"{v:.0f} MiB"


def per_chunk_time(w: dict[str, Any], r: dict[str, Any]) -> float | None:
    """Seconds per chunk of a result ``r`` on workload ``w``: per chunk and step for heat; the
    time per step / chunks per step for the empty step; of the approach's own chunks where
    the chunks are "auto" (None for an approach that does not chunk)."""
    t = r["median"]
    kind = _kind(w)
    chunks = w.get("n_chunks") or (r.get("info") or {}).get("chunks")
    if not chunks:
        return None
    if kind == "heat":
        return t / (chunks * max(1, w.get("steps") or 1))
    return t / chunks


def _shape_text(w: dict[str, Any]) -> str:
    return " x ".join(f"{n:,}" for n in w["shape"])


def workload_table(run: dict[str, Any], wkey: str) -> list[str]:
    """Markdown rows for one workload: one line per approach."""
    w = run["workloads"][wkey]
    results = run["results"]
    base = results.get("memmap_pool", {}).get(wkey, {})
    base_t = base.get("median") if base.get("status") == "ok" else None
    lines = [
        "| approach | median time | time / MemmapPool's | per chunk | CPU time, parent + "
        "workers | parent peak RSS, MiB (private) | largest worker peak RSS, MiB (private) "
        "| result |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for akey, label in run["approach_labels"].items():
        r = results.get(akey, {}).get(wkey)
        if r is None:
            continue
        status = r["status"]
        if "median" not in r:
            lines.append(f"| {label} | - | - | - | - | - | - | {status}: {r.get('detail', '')} |")
            continue
        t = r["median"]
        ratio = f"{t / base_t:.2f}x" if base_t and status == "ok" else "-"
        parent = f"{fmt_mib(r['parent_peak'])} ({fmt_mib(r['parent_anon'])})"
        # Workers that lived less than a sample are known from wait4 only: no private figure.
        private = fmt_mib(r["worker_anon"]) if r["worker_anon"] else "?"
        worker = f"{fmt_mib(r['worker_peak'])} ({private})" if r["workers_seen"] else "-"
        shown = status if status == "ok" else f"**{status.upper()}**: {r['detail']}"
        timed = fmt_seconds(t) if status == "ok" else f"~~{fmt_seconds(t)}~~"
        cpu = f"{r['cpu_parent']:.2f} + {r['cpu_workers']:.2f} s"
        each = per_chunk_time(w, r)
        lines.append(
            f"| {label} | {timed} | {ratio} | {fmt_per_chunk(each) if each else '-'} | "
            f"{cpu} | {parent} | {worker} | {shown} |"
        )
    return lines


def console_report(run: dict[str, Any]) -> str:
    out = []
    for wkey, w in run["workloads"].items():
        chunks = f"{w['n_chunks']} chunks of {w['chunk_size']}" if w["n_chunks"] else "auto chunks"
        steps = f", {w['steps']} steps" if w.get("steps") else ""
        out.append(
            f"\n{w['title']}  [{_shape_text(w)} {w['dtype']}, {chunks}{steps}, "
            f"repeat {w['repeat']}]"
        )
        out.append(
            f"  {'approach':<46} {'median':>9} {'ratio':>7} {'per chunk':>10} "
            f"{'CPU s':>11} {'parent MiB':>11} {'worker MiB':>11}  result"
        )
        base = run["results"].get("memmap_pool", {}).get(wkey, {})
        base_t = base.get("median") if base.get("status") == "ok" else None
        for akey, label in run["approach_labels"].items():
            r = run["results"].get(akey, {}).get(wkey)
            if r is None:
                continue
            if "median" not in r:
                out.append(
                    f"  {label:<46} {'':>9} {'':>7} {'':>10} {'':>11} {'':>11} {'':>11}  "
                    f"{r['status']}: {r.get('detail', '')}"
                )
                continue
            t = r["median"]
            ratio = f"{t / base_t:.2f}x" if base_t and r["status"] == "ok" else "-"
            worker = fmt_mib(r["worker_peak"]) if r["workers_seen"] else "-"
            detail = f": {r['detail']}" if r["detail"] else ""
            cpu = f"{r['cpu_parent']:.2f}+{r['cpu_workers']:.2f}"
            each = per_chunk_time(w, r)
            out.append(
                f"  {label:<46} {fmt_seconds(t):>9} {ratio:>7} "
                f"{fmt_per_chunk(each) if each else '-':>10} {cpu:>11} "
                f"{fmt_mib(r['parent_peak']):>11} {worker:>11}  {r['status']}{detail}"
            )
    if run.get("startup"):
        out.append("\nPool start-up, 2 workers (until every worker has run a task):")
        for method, s in run["startup"].items():
            if "error" in s:
                out.append(f"  {method:<18} error: {s['error']}")
                continue
            m, p = s["memmap_pool"], s["ppe"]
            out.append(
                f"  {method:<18} MemmapPool first {fmt_seconds(m['first'])}, later "
                f"{fmt_seconds(m['later'])}, shutdown {fmt_seconds(m['shutdown'])}; "
                f"ProcessPoolExecutor {fmt_seconds(p['later'])}"
            )
    out.append(
        "\nTargets" + (" (smoke sizes: the numbers mean nothing)" if run["smoke"] else "") + ":"
    )
    for row in run["targets"]:
        out.append(f"  [{row['verdict']:^12}] {row['target']}: {fmt_value(row)}  ({row['how']})")
    return "\n".join(out)


# -- the plot ----------------------------------------------------------------------------------


def plot(run: dict[str, Any], path: str) -> str | None:
    """Bar chart of time / MemmapPool's time per workload; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    # MemmapPool itself is the line at 1.
    labels = {k: v for k, v in run["approach_labels"].items() if k != "memmap_pool"}
    # Workloads that only MemmapPool runs (the empty step) have no ratio to show.
    wkeys = [k for k in run["workloads"] if any(k in run["results"].get(a, {}) for a in labels)]
    if not wkeys:
        return "no workload that another approach runs too"
    # Each workload's group has a bar for each approach that ran it (not every approach runs
    # every kind of workload), side by side.
    place: dict[tuple[str, str], tuple[float, float]] = {}
    for j, wkey in enumerate(wkeys):
        present = [k for k in labels if wkey in run["results"].get(k, {})]
        for i, akey in enumerate(present):
            width = 0.8 / len(present)
            place[akey, wkey] = (j - 0.4 + width * (i + 0.5), width)
    fig, ax = plt.subplots(figsize=(max(12.0, 1.4 * len(wkeys)), 6.5))
    cmap = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    ymax = ymin = 1.0
    handles: list[Any] = []
    for i, (akey, label) in enumerate(labels.items()):
        xs, ys, widths, marks = [], [], [], []
        for wkey in wkeys:
            if (akey, wkey) not in place:
                continue
            x, width = place[akey, wkey]
            r = run["results"][akey][wkey]
            base = run["results"].get("memmap_pool", {}).get(wkey, {})
            if r.get("status") == "ok" and base.get("status") == "ok":
                xs.append(x)
                ys.append(r["median"] / base["median"])
                widths.append(width * 0.95)
            else:
                marks.append((x, r.get("status", "")))
        # Bars grow from 1 (as fast as MemmapPool): up when slower, down when faster.
        color = cmap(i % cmap.N)
        ax.bar(xs, [y - 1 for y in ys], bottom=1, width=widths, color=color)
        # The legend's own patch: an approach without a bar (skipped, failed) is listed too.
        handles.append(Patch(color=color, label=label))
        ymax = max([ymax, *ys])
        ymin = min([ymin, *ys])
        for x, status in marks:
            ax.text(
                x,
                1.05,
                {"n/a": "n/a", "wrong": "WRONG"}.get(status, status),
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=7,
                color="dimgray",
            )
    line = ax.axhline(1.0, color="black", linewidth=1.2, label="MemmapPool (= 1)")
    ax.set_yscale("log")
    ax.set_ylim(ymin / 1.5, ymax * 1.5)
    ax.set_xticks(range(len(wkeys)))
    ax.set_xticklabels([run["workloads"][k]["short"].format(**run["workloads"][k]) for k in wkeys])
    ax.set_ylabel("median time / MemmapPool's (log scale; > 1: MemmapPool is faster)")
    ax.set_title(
        f"{run['machine']['cpu']}, {run['workers']} workers, start method {run['start_method']}"
    )
    ax.legend(
        handles=[line, *handles],
        fontsize=8,
        ncol=3,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- the docs page ------------------------------------------------------------------------------

ANALYSIS_START = "<!-- analysis: kept when the page is regenerated -->"
ANALYSIS_END = "<!-- end of analysis -->"


def kept_analysis(path: str) -> str | None:
    """The hand-written analysis section of an existing page, kept across regenerations."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find(ANALYSIS_START), text.find(ANALYSIS_END)
    if start < 0 or end < start:
        return None
    return text[start : end + len(ANALYSIS_END)]


def _machine_rows(run: dict[str, Any]) -> list[str]:
    m = run["machine"]
    blas = (
        "; ".join(
            f"{b['internal_api']} {b['version']} ({b['architecture']}, {b['num_threads']} threads, "
            f"{b['threading_layer']})"
            for b in m["blas"]
        )
        or "threadpoolctl not installed"
    )
    env = ", ".join(f"{k}={v}" for k, v in m["env"].items()) or "none"
    load = run["load_before"], run["load_after"]
    loads = " / ".join(", ".join(f"{x:.2f}" for x in la) if la else "?" for la in load)
    rows = [
        ("CPU", m["cpu"]),
        ("cores", f"{m['cores']} ({m['usable_cores']} usable)"),
        ("RAM", f"{m['ram_gib']} GiB"),
        ("OS", f"{m['distro']}, {m['os']}"),
        ("Python", m["python"]),
        ("numpy", m["numpy"]),
        ("BLAS (threadpoolctl)", blas),
        ("BLAS environment", env),
        (
            "memmap-pool / joblib / dask / scipy / scikit-image",
            f"{m['memmap_pool']} / {m['joblib']} / {m['dask']} / {m.get('scipy', '?')} / "
            f"{m.get('skimage', '?')}",
        ),
        (
            "workers, start method",
            f"{run['workers']}, {run['start_method']} (every process pool; "
            "joblib runs on loky's own)",
        ),
        ("repeats (median reported)", f"{run['repeat']} (out-of-core: 1)"),
        ("files of in-RAM outputs", run["ram_dir"]),
        ("files of the out-of-core output", run["disk_dir"] or "not run"),
        ("file of the reduction's input", run.get("reduction_dir") or "not run"),
        ("load average before / after (1, 5, 15 min)", loads),
        ("date, duration of the run", f"{run['date']}, {run['duration'] / 60:.1f} min"),
    ]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _startup_section(run: dict[str, Any]) -> list[str]:
    s = run.get("startup") or {}
    if not s:
        return ["Not measured in this run (`--no-startup`)."]
    lines = [
        "| start method | MemmapPool, first pool of the process | MemmapPool, later pools | "
        "MemmapPool shutdown | ProcessPoolExecutor, later pools |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, r in s.items():
        if "error" in r:
            lines.append(f"| {method} | {r['error']} | | | |")
            continue
        m, p = r["memmap_pool"], r["ppe"]
        lines.append(
            f"| {method} | {fmt_seconds(m['first'])} | {fmt_seconds(m['later'])} | "
            f"{fmt_seconds(m['shutdown'])} | {fmt_seconds(p['later'])} |"
        )
    note = run.get("startup_note")
    lines += [
        *(["", f"({note}.)"] if note else []),
        "",
        "Start-up is the time from the constructor until every worker has run a task (a "
        "probe that sleeps 10 ms so that one worker cannot take them all; the sleep is not "
        "counted). A MemmapPool worker also starts a watchdog thread, and under spawn and "
        "forkserver limits its BLAS threads (threadpoolctl) before its first task. The first "
        "pool of a process pays more "
        "under forkserver (the server process starts then) and spawn (imports are cold).",
        "",
        *_choose_start_method(s),
    ]
    return lines


def _choose_start_method(s: dict[str, Any]) -> list[str]:
    def later(method: str) -> str:
        r = s.get(method, {})
        return fmt_seconds(r["memmap_pool"]["later"]) if "memmap_pool" in r else "?"

    text = (
        "Which to choose: the workers start once per pool and serve every job, so the start "
        "method matters only when pools are short-lived. `fork` starts fastest "
        f"({later('fork')} here) but copies the parent's whole state, the locks of its other "
        "threads included: it is unsafe in a process that runs threads, which is why Python "
        "3.14 made `forkserver` the default on Linux. `spawn` is the most isolated and the "
        f"slowest ({later('spawn')}); it is the only choice on macOS and Windows."
    )
    if "forkserver" in s:
        text += (
            f" `forkserver` is safe with threads; by default ({later('forkserver')}) each "
            "worker still imports numpy and memmap-pool itself, but after "
            '`multiprocessing.set_forkserver_preload(["numpy", "memmap_pool"])`, called before '
            "the first pool, workers fork from a server that has them loaded already "
            f"(row `forkserver+preload`: {later('forkserver+preload')}). Our advice: "
            "`forkserver` with that preload, and one pool for many jobs."
        )
    return [text]


def _targets_section(run: dict[str, Any]) -> list[str]:
    lines = ["| target | measured | verdict | from |", "|---|---:|---|---|"]
    for row in run["targets"]:
        verdict = row["verdict"] if row["verdict"] != "NOT met" else "**not met**"
        lines.append(f"| {row['target']} | {fmt_value(row)} | {verdict} | {row['how']} |")
    return lines


def _kind_text(run: dict[str, Any], wkey: str, w: dict[str, Any]) -> str:
    """What a workload's section says besides its size: what it reads, how it is checked."""
    kind = _kind(w)
    mine = run["results"].get("memmap_pool", {}).get(wkey) or {}
    note = f" **Note:** {w['note']}." if w.get("note") else ""
    if kind == "stencil":
        return (
            f" The input, an image of the same shape and dtype, is a .npy file in "
            f"{run['ram_dir']}, written before anything is timed; every approach reads it "
            "from there (`np.load(path, mmap_mode='r')`). The stencil: "
            f"`scipy.ndimage.gaussian_filter(block, sigma={w['sigma']:g}, "
            f"mode={w['mode']!r})` of each chunk widened by a halo of {w['depth']} rows "
            "on each side (the filter's radius, `int(4 * sigma + 0.5)`); every result "
            "must equal the serial filter of the whole image exactly, element for element. "
            "Only the approaches written for overlapping chunks run it."
        )
    if kind == "heat":
        return (
            f" Each step: `u + alpha * laplacian(u)`, the explicit 5-point stencil, alpha "
            f"{w.get('alpha', 0.1):g} (stable up to 0.25), the state's edge values beyond its "
            "edges (numpy's `'edge'`). The initial state, a uniform random field in [0, 1) "
            f"from a fixed seed, is a .npy file in {run['ram_dir']}, written before anything "
            "is timed, as is the reference: `np.pad(state, 1, 'edge')` of the whole state and "
            "the same update, step after step. Every approach runs the same in-place update "
            "(the same operations in the same order) on the same row blocks padded by one, so "
            "every result must equal the reference bit for bit. Timed: all the steps, the two "
            "buffers' creation included (MemmapPool's in /dev/shm, the hand-written .npy "
            "files, serial's np.empty)."
        )
    if kind == "empty_step":
        wall = mine.get("wall_median")
        whole = f" (median {fmt_seconds(wall)} here)" if wall else ""
        return (
            " Only MemmapPool runs it: it is what a step of `iterate` costs by itself, with a "
            "kernel that returns at once and auto chunks; no other approach has steps to "
            "compare. **The time shown is the time per step**: the `job.stats.wall_time` of a "
            f"job of {w.get('steps', 51)} steps minus that of a job of 1 step, divided by "
            f"{w.get('steps', 51) - 1}. A job's `wall_time` runs from its creation, after its "
            "two buffers are allocated (`posix_fallocate` in /dev/shm: about a second at 2 GiB, "
            "and more variable than the steps themselves), to its end, so only the steps are "
            "left in the difference. The whole call, both jobs with their buffers, is not "
            f"what is shown{whole}. Per chunk: the time per step / the chunks of a step."
        )
    if kind == "reduction":
        where = run.get("reduction_dir") or "a directory on a disk"
        return (
            " The input, float64 uniform random numbers in [0, 1), is a .npy file in "
            f"{where}, written and made durable (fsync) before anything is timed, then read "
            "once (the serial sum the results are checked against), so that the page cache is "
            "warm; each approach's untimed warm-up reads it again. No output is written. Check: "
            "every sum within a relative 1e-9 of the serial sum (the order of the additions "
            "differs), and every run of an approach gives the same bits as its warm-up. Per "
            "chunk: of the approach's own chunks (MemmapPool's auto chunks, dask's)." + note
        )
    if kind == "normals":
        tol = w.get("tolerance", 1e-3)
        return (
            " The seeds are fixed, and each approach draws a stream of its own by design "
            "(MemmapPool: `chunk.random(seed)`, values that depend on the seed and each "
            "element's index only; serial: one generator; the plain processes: one generator "
            "per part), so results are compared by statistics, not bits: the mean within "
            f"{tol:.3g} of 0 and the standard deviation within {tol:.3g} of 1; the first 2^20 "
            "values of each stream equal to its generator's (MemmapPool: the first 4 Mi "
            "elements computed again in chunks of another size are the same values); and "
            "every run of an approach gives the same bits (SHA-1 of the array) as its warm-up. "
            "The plain processes are started (with the run's start method: under spawn and "
            "forkserver each imports numpy first) and joined inside the timed region; the pools "
            "were started before."
        )
    return ""


def _workload_sections(run: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for wkey, w in run["workloads"].items():
        kind = _kind(w)
        shape = f"{_shape_text(w)} {w['dtype']} ({w['size']})"
        timed = (
            "pool start-up, the job and the pool's shutdown"
            if w["startup"]
            else "the job only; the pool was started and warmed up before"
        )
        extra = (
            f" Executors that batch by hand get `chunksize={w['task_batch']}` chunks per "
            "task; MemmapPool, joblib and dask batch on their own."
            if w["task_batch"] > 1
            else ""
        )
        extra += _kind_text(run, wkey, w)
        what = (
            "Input"
            if kind == "reduction"
            else "State"
            if kind in ("heat", "empty_step")
            else "Output"
        )
        if w["n_chunks"]:
            chunks = (
                f"in {w['n_chunks']:,} chunks of {w['chunk_rows']:,} "
                f"row{'s' if w['chunk_rows'] != 1 else ''} ({w['chunk_size']})"
            )
        else:
            count = ((run["results"].get("memmap_pool", {}).get(wkey) or {}).get("info") or {}).get(
                "chunks"
            )
            chunks = "in MemmapPool's auto chunks" + (
                f" ({count:,}{' per step' if kind == 'empty_step' else ''})" if count else ""
            )
        steps = f", {w['steps']} steps" if w.get("steps") else ""
        lines += [
            f"### {w['title']}",
            "",
            f"{what} {shape} {chunks}{steps}; timed: {timed}; {w['repeat']} run(s).{extra}",
            "",
            *workload_table(run, wkey),
            "",
        ]
    return lines


KIND_TITLES = {
    "fill": "The block fills",
    "stencil": "The stencil",
    "heat": "Heat",
    "empty_step": "The empty step",
    "reduction": "The reduction",
    "normals": "The normals",
}


def _patterns(run: dict[str, Any]) -> list[str]:
    if "patterns" in run:
        lines = []
        for kind, per_approach in run["patterns"].items():
            lines += [
                f"**{KIND_TITLES.get(kind, kind)}**",
                "",
                "| approach | how it is written |",
                "|---|---|",
            ]
            for key, text in per_approach.items():
                lines.append(f"| {run['approach_labels'][key]} | {text} |")
            lines.append("")
        return lines[:-1]
    # Runs recorded before the patterns were kept per kind of workload.
    stencil = run.get("approach_stencil_patterns") or {}
    if not any(stencil.values()):
        lines = ["| approach | how it is written |", "|---|---|"]
        for key, label in run["approach_labels"].items():
            lines.append(f"| {label} | {run['approach_patterns'][key]} |")
        return lines
    lines = ["| approach | the block fills | the stencil |", "|---|---|---|"]
    for key, label in run["approach_labels"].items():
        fills = run["approach_patterns"].get(key) or "-"
        lines.append(f"| {label} | {fills} | {stencil.get(key) or '-'} |")
    return lines


def markdown(run: dict[str, Any], png: str | None, analysis: str | None = None) -> str:
    """The whole of docs/performance.md for ``run``."""
    lines = [
        "# Performance",
        "",
        "How fast memmap-pool is next to the other ways of computing a large numpy array on "
        "several cores, measured side by side on the same work in one run: the same kernel, the "
        "same chunks, the same number of workers. This page is written by the benchmark suite "
        "itself (`benchmarks/`); the numbers below are from the run described under "
        "[The machine](#the-machine).",
        "",
        "## Running the benchmarks",
        "",
        "```bash",
        'pip install -e ".[bench]"               # joblib, dask[array], scipy, scikit-image, matplotlib, psutil',
        "python -m benchmarks                    # the full run: rewrites this page and performance.png",
        "python -m benchmarks --out-of-core 32G  # also an output larger than RAM, on disk",
        "python -m benchmarks --smoke            # tiny sizes, 1 repeat: runs, and is every result right?",
        "python -m benchmarks --workloads stencil  # the stencil alone",
        "python -m benchmarks --workloads heat,empty_step,reduction,normals",
        "```",
        "",
        "`--repeat N` (default 3) sets the timed runs per measurement; `--approaches` and "
        "`--workloads` pick a subset; `--start-method` the start method of every process pool; "
        "`--disk-dir` where the out-of-core output goes (a disk, not /dev/shm); `--json PATH` "
        "keeps every measurement (this page's are in `benchmarks/results.json`, and "
        "`--from-json PATH` rewrites the page from such a file without running anything). `python -m benchmarks --help` lists everything. CI runs only "
        "the smoke mode (`tests/test_benchmarks_smoke.py`), which checks that every approach "
        "runs and computes the right values and asserts nothing about speed.",
        "",
        "Timings are only meaningful on a quiet machine: the load average before and after the "
        "run is in the machine table.",
        "",
        "## The machine",
        "",
        *_machine_rows(run),
        "",
        "`OPENBLAS_CORETYPE` and `OPENBLAS_L2_SIZE` are set in this environment (older OpenBLAS "
        "builds compute wrong results or crash on this CPU without them) and were kept as they "
        "are; they pin OpenBLAS to the kernel named above. None of the workloads calls BLAS "
        "(the compute-bound kernel is elementwise ufuncs), so they do not change these numbers.",
        "",
        "## Targets",
        "",
        *(["**Smoke run: tiny sizes, the ratios mean nothing.**", ""] if run["smoke"] else []),
        *_targets_section(run),
        "",
        'Ratios are median times from this one run. "time / MemmapPool\'s" above 1 means '
        "MemmapPool is faster.",
        "",
        "## Results",
        "",
        *([f"![time of each approach / MemmapPool's, per workload]({png})", ""] if png else []),
        *_workload_sections(run),
        "## Pool start-up per start method",
        "",
        *_startup_section(run),
        "",
        "## What is measured",
        "",
        "- **Time**: wall-clock time of the whole computation, median of the runs. For the "
        "fills (in RAM and out-of-core) the timed region includes creating the output, starting "
        "the pool and shutting it down, as a script that fills one array does (an untimed run on "
        "two chunks warms the process up first); for the other workloads the pool was started "
        "and warmed up before (an untimed run on two chunks; two steps of heat and of the empty "
        "step; the whole of the reduction and of the normals), and only the job is timed. The "
        "empty step's time is per step, without its buffers' allocation (see its section). A "
        "result that differs from the serial reference is shown struck through and marked "
        "WRONG: it does not count as fast.",
        "- **Per chunk**: median time / number of chunks (heat: / chunks x steps; where the "
        "chunks are auto, of the approach's own chunks). For the 20,000 tiny chunks, whose "
        "kernel costs about a microsecond, this is the per-chunk overhead of the approach.",
        "- **CPU time** (median of the runs): user + system seconds of the parent and of all "
        "its workers together, from `/proc/<pid>/stat` and, for workers reaped inside the "
        "timed region, `wait4`. On a busy machine it is steadier than wall time, and it shows "
        "where the time goes: page faults of a fill are system time, pickling is user time in "
        "both processes.",
        "- **Peak RSS** (MiB) from `/proc/<pid>/status`: `VmHWM`, the kernel's high-water mark "
        "of the resident set, reset at the start of each timed run (`/proc/<pid>/clear_refs`) "
        "and read at its end; the largest value over the runs. It is exact for live processes "
        "and counts every resident page the process maps, including pages of a shared output "
        "file (in /dev/shm or on disk) while the process has them mapped. In parentheses: the "
        'process\'s private (anonymous) memory, `RssAnon`, sampled every 10 ms ("?" for workers '
        "that lived less than one sample). Forked workers start with their parent's resident "
        "pages, which they share with it.",
        "- **Order**: every approach runs in a process of its own, and the timed runs go "
        "round-robin (run 1 of every approach, then run 2, each round starting with the next "
        "approach), so that a change in the machine's load falls on all approaches alike.",
        "- **Parent** is the process that runs the approach: each approach runs in a fresh "
        "process that imports only numpy and its own library. **Workers** are all its child "
        "processes except the helpers of multiprocessing and loky (resource trackers, the "
        "forkserver). Workers that exit inside the timed region are also measured when their "
        "pool reaps them: `wait4` returns their peak RSS (`ru_maxrss`) and CPU time.",
        "- **Check**: every result is compared with the serial reference: the sum of every row "
        "(float64, relative tolerance 1e-9) and 16 sampled rows element by element (relative "
        "tolerance 1e-6; the fills are exact). Out-of-core outputs are too large to read back: "
        "there the first and last row of every chunk and 16 other rows are compared. The "
        "stencil's result is compared with the serial filter of the whole image element by "
        "element and must be equal exactly: the halo is the filter's radius, and scipy filters "
        "axis by axis in float64, storing each pass in float32, so every chunk's rows get the "
        "same values as in the serial result. Heat's final state must equal its reference bit "
        "for bit; a reduction's sum the serial sum to a relative 1e-9; the normals' moments "
        "must be those of standard normals and their first values those of the approach's own "
        "generator. Where results are not compared with a reference bit for bit (the "
        "reduction, the normals), every timed run of an approach must also give the same bits "
        "as its untimed warm-up, which computes the whole workload.",
        "",
        "## How each approach is written",
        "",
        "Each one the way its documentation recommends, with the same block function (the "
        "stencil: the same filter and halo), the same chunks and the same number of workers:",
        "",
        *_patterns(run),
        "",
        "Approaches that keep the whole output in RAM (threads, returning arrays, "
        "shared_memory, dask) are not run out-of-core: they cannot hold an output larger than "
        "memory. The boundary of each stencil approach is the one that matches scipy's "
        "`mode='reflect'`, which repeats the edge element (`d c b a | a b c d`): numpy's, "
        "MemmapPool's and scikit-image's `'symmetric'` (scikit-image passes it to dask as "
        "`'reflect'`), and dask's `'reflect'`. With MemmapPool's `boundary='none'` the windows "
        "at the image's edges are clipped and scipy pads the true edges itself.",
        "",
    ]
    if analysis:
        lines += ["## Analysis", "", analysis, ""]
    return "\n".join(lines)
