"""Peak memory and CPU time of a process and of its worker processes, read from /proc.

What is measured, per process, from ``/proc/<pid>/status``:

- ``VmHWM``: the kernel's own high-water mark of the resident set (RSS). It is exact (no
  sampling gap) and it counts *every* resident page mapped by the process: private memory,
  and also pages of shared files (a memory-mapped output in /dev/shm or on disk) while they
  are mapped and touched. The mark is reset (``/proc/<pid>/clear_refs``, "5") at the start of
  each timed run, so each run is measured on its own.
- ``RssAnon``: private (anonymous) memory only, sampled every :data:`SAMPLE_INTERVAL`. The part
  of the peak that is really the process's own; the rest is shared file pages, counted in the
  RSS of every process that maps them.

Workers are all descendants of the measured process except the helper processes that
multiprocessing and loky start (resource trackers, the forkserver). A worker's ``VmHWM`` is
read while it lives. Workers that exit inside the timed region (pools started and shut down
there) may live less than one sampling interval: for them the peak is the ``ru_maxrss`` that
``wait4`` reports when the pool reaps them (:func:`record_reaped_children` makes ``os.waitpid``,
which multiprocessing and loky call, go through ``os.wait4``), the same high-water mark.

CPU time (user + system) is measured too, because on a shared machine it is steadier than wall
time: the measured process's own (``time.process_time``), and its workers': the CPU time of
workers that were reaped inside the region (``getrusage(RUSAGE_CHILDREN)``) plus what the live
ones used since the start (``/proc/<pid>/stat``) plus what the reaped ones used (``wait4``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

SAMPLE_INTERVAL = 0.01
"""Seconds between samples: frequent enough to see every worker of a 0.1 s job, rare enough
that reading /proc costs the measured process well under 1% of a core."""

_HELPERS = ("resource_tracker", "forkserver", "semaphore_tracker")

_FIELDS = {
    "VmHWM": "hwm",
    "VmRSS": "rss",
    "RssAnon": "anon",
    "RssFile": "file",
    "RssShmem": "shmem",
}


def read_status(pid: int | str = "self") -> dict[str, int] | None:
    """Memory fields of ``/proc/<pid>/status`` in bytes, or None if the process is gone."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                name = _FIELDS.get(key.decode())
                if name is not None:
                    found[name] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        return None
    return found


def reset_peak(pid: int | str = "self") -> bool:
    """Reset the process's ``VmHWM`` to its current RSS (Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from every thread's ``children`` list)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children(p))
    return found


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


_reaped: dict[int, tuple[int, float]] = {}  # pid -> (peak RSS bytes, CPU seconds)
_original_waitpid: Any = None


def record_reaped_children() -> None:
    """Make ``os.waitpid`` record the peak RSS and CPU time of every child it reaps.

    Pools reap their workers with ``os.waitpid`` (multiprocessing, loky); ``os.wait4`` does the
    same and also returns the child's resource usage, which is the only exact account of a
    worker that lived less than a sampling interval.
    """
    global _original_waitpid
    if _original_waitpid is not None or not hasattr(os, "wait4"):
        return
    _original_waitpid = os.waitpid

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        got, status, usage = os.wait4(pid, options)
        if got > 0:
            _reaped[got] = (usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)
        return got, status

    os.waitpid = waitpid


def _is_helper(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().decode(errors="replace")
    except OSError:
        # Gone already (a worker exiting as its pool shuts down): not a helper; if its pool
        # reaps it inside the timed region, wait4 accounts for it.
        return False
    return any(h in cmd for h in _HELPERS)


@dataclass
class ProcessPeak:
    hwm: int = 0  # peak RSS, bytes (kernel high-water mark)
    anon: int = 0  # peak private memory, bytes (sampled)


@dataclass
class Peaks:
    """Peak memory of one timed run."""

    parent: ProcessPeak = field(default_factory=ProcessPeak)
    workers: dict[int, ProcessPeak] = field(default_factory=dict)
    exact: bool = True  # False when VmHWM could not be reset (peaks since process start)
    parent_cpu: float = 0.0  # seconds of CPU used by the measured process
    workers_cpu: float = 0.0  # seconds of CPU used by its workers

    @property
    def worker_hwm(self) -> int:
        """The largest worker's peak RSS (0 without workers)."""
        return max((p.hwm for p in self.workers.values()), default=0)

    @property
    def worker_anon(self) -> int:
        return max((p.anon for p in self.workers.values()), default=0)


class Sampler:
    """Measures the peaks of this process and its workers between :meth:`start` and
    :meth:`stop`."""

    def __init__(self, interval: float = SAMPLE_INTERVAL) -> None:
        self.interval = interval
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._helpers: set[int] = set()
        self.peaks = Peaks()
        self._cpu_start: dict[int, float] = {}
        self._own_cpu = 0.0

    def start(self) -> None:
        self.peaks = Peaks()
        self._stop.clear()
        exact = reset_peak()
        self._cpu_start = {}
        for pid in descendants(self._pid):
            exact = reset_peak(pid) and exact
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self._cpu_start[pid] = cpu
        self.peaks.exact = exact
        self._own_cpu = time.process_time()
        _reaped.clear()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> Peaks:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()
        self.peaks.parent_cpu = time.process_time() - self._own_cpu
        reaped = dict(_reaped)
        for pid, (peak_rss, _) in reaped.items():
            if pid not in self._helpers:
                peak = self.peaks.workers.setdefault(pid, ProcessPeak())
                peak.hwm = max(peak.hwm, peak_rss)
        cpu = 0.0
        for pid in self.peaks.workers:
            now = reaped[pid][1] if pid in reaped else cpu_seconds(pid)
            if now is not None:
                cpu += now - self._cpu_start.get(pid, 0.0)
        self.peaks.workers_cpu = cpu
        return self.peaks

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        me = read_status()
        if me is not None:
            self._update(self.peaks.parent, me)
        for pid in descendants(self._pid):
            if pid in self._helpers:
                continue
            if pid not in self.peaks.workers and _is_helper(pid):
                self._helpers.add(pid)
                continue
            status = read_status(pid)
            if status is None:
                continue
            self._update(self.peaks.workers.setdefault(pid, ProcessPeak()), status)

    @staticmethod
    def _update(peak: ProcessPeak, status: dict[str, int]) -> None:
        peak.hwm = max(peak.hwm, status.get("hwm", 0), status.get("rss", 0))
        peak.anon = max(peak.anon, status.get("anon", 0))
