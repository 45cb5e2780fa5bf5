"""``memmap-pool doctor``: look at the machine as the pool will use it, and say what to do.

Each check is a function of values already measured, returning a :class:`Finding`; the
readers of the system (/proc, /sys, the cgroup files, threadpoolctl) are separate, and
:func:`diagnose` runs them all on this machine. The parsers of the kernel's files take text,
so they can be tested on samples.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import resource
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ._blas import _THREAD_ENV_VARS
from ._storage import (
    SHM_DIR,
    SHM_MAX_FRACTION_OF_AVAILABLE_RAM,
    TEMP_DIR_ENV,
    available_memory,
    choose_base_dir,
    format_bytes,
)
from ._worker import CONTEXT_CACHE_SIZE

Level = Literal["ok", "warning", "problem"]
LEVELS: tuple[Level, ...] = ("ok", "warning", "problem")

DEFAULT_JOB_BYTES = 1 << 30
"""The job size the checks assume unless told: 1 GiB."""

GiB = 1 << 30

SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
MAX_MAP_COUNT = "/proc/sys/vm/max_map_count"

HUGE_MOUNT_POINT = "/mnt/hugeshm"
"""Where the advice puts a tmpfs with huge pages (as in docs/performance.md)."""

MAP_COUNT_LOW = 4096
"""Below this ``vm.max_map_count`` (Linux's default is 65530) a warning: the pool needs a few
hundred mappings per process, but little room is left for libraries and many inputs."""

OPEN_FILES_LOW = 256
"""Below this soft limit on open files (usually 1024) a warning, for the same reason."""

WORKER_EXTRA_MAPS = 32
"""Mappings a worker has beyond those of a process that imported numpy: the pool's modules,
cloudpickle, its threads' stacks (measured: about 25)."""

FILES_PER_JOB = 3
"""Mappings a worker keeps for a job with one output and one input: the output, the input,
and the job's status file (one mapping per file, whatever its size)."""

POOL_FDS = 10
"""Descriptors a pool's own process opens besides those per worker and per job: the
executor's queues and wake-up pipe, a private directory and its marker (measured: 8-10)."""

FDS_PER_WORKER = 2
FDS_PER_JOB = 1
WORKER_FDS = 24
"""Descriptors of a worker with one job (measured: 20-25, most inherited from the parent)."""


@dataclass(frozen=True)
class Finding:
    """What one check found.

    Attributes:
        name: the check ("temp dir", "huge pages", ...).
        level: "ok", "warning" (works, but could be better) or "problem" (a job would fail
            or suffer badly).
        found: what was found, in words.
        advice: what to do; empty when the level is "ok".
        values: the raw values measured, for scripts (JSON-serialisable).
    """

    name: str
    level: Level
    found: str
    advice: str = ""
    values: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """``warning  huge pages: <found>; <advice>``."""
        text = f"{self.level:<8} {self.name}: {self.found}"
        return f"{text}; {self.advice}" if self.advice else text

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "level": self.level,
            "found": self.found,
            "advice": self.advice,
            "values": self.values,
        }


def worst(findings: Sequence[Finding]) -> Level:
    """The most serious level among ``findings`` ("ok" for none)."""
    return max((f.level for f in findings), key=LEVELS.index, default="ok")


# -- mounts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo (or /proc/mounts, without ``dev`` and ``root``)."""

    mount_point: str
    fstype: str
    source: str
    options: tuple[str, ...]
    """The mount's options, then its filesystem's (``size=``, ``huge=`` for a tmpfs)."""
    dev: tuple[int, int] | None = None
    root: str = "/"

    def option(self, name: str) -> str | None:
        """The value of option ``name`` (``""`` for a flag), or None when absent; the
        filesystem's options, listed last, win."""
        value = None
        for opt in self.options:
            key, sep, rest = opt.partition("=")
            if key == name:
                value = rest if sep else ""
        return value


def _unescape(text: str) -> str:
    """Mount tables write space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of /proc/self/mountinfo, in its order (a mount stacked on another comes
    after it). Lines that don't parse are skipped.

    A line: ``ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
    SUPER_OPTIONS``.
    """
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 2:
            continue
        major, _, minor = fields[2].partition(":")
        try:
            dev: tuple[int, int] | None = (int(major), int(minor))
        except ValueError:
            dev = None
        super_options = tail[2].split(",") if len(tail) > 2 else []
        mounts.append(
            Mount(
                mount_point=_unescape(fields[4]),
                fstype=tail[0],
                source=_unescape(tail[1]),
                options=(*fields[5].split(","), *super_options),
                dev=dev,
                root=_unescape(fields[3]),
            )
        )
    return mounts


def parse_proc_mounts(text: str) -> list[Mount]:
    """The mounts of /proc/mounts (``SOURCE MOUNT_POINT FSTYPE OPTIONS 0 0``)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mounts.append(
            Mount(
                mount_point=_unescape(fields[1]),
                fstype=fields[2],
                source=_unescape(fields[0]),
                options=tuple(fields[3].split(",")),
            )
        )
    return mounts


def read_mounts() -> list[Mount]:
    """This process's mounts: /proc/self/mountinfo, else /proc/mounts, else none."""
    for path, parse in (
        ("/proc/self/mountinfo", parse_mountinfo),
        ("/proc/mounts", parse_proc_mounts),
    ):
        text = _read(path)
        if text is not None:
            return parse(text)
    return []


def _under(path: str, mount_point: str) -> bool:
    return mount_point == "/" or path == mount_point or path.startswith(mount_point + "/")


def mount_of(path: str, mounts: Sequence[Mount]) -> Mount | None:
    """The mount that holds ``path``: the deepest mount point above it, the last of those
    stacked on one point, preferring mounts of the path's own device (a bind mount or one
    hidden under another may share a mount point's prefix but not its device)."""
    real = os.path.realpath(path)
    above = [m for m in mounts if _under(real, m.mount_point)]
    try:
        st_dev = os.stat(real).st_dev
    except OSError:
        st_dev = None
    if st_dev is not None:
        same = [m for m in above if m.dev == (os.major(st_dev), os.minor(st_dev))]
        above = same or above
    best: Mount | None = None
    for m in above:
        if best is None or len(m.mount_point) >= len(best.mount_point):
            best = m
    return best


# -- kernel files ------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def parse_bracketed(text: str) -> str | None:
    """The selected value of a sysfs choice: ``always within_size advise [never] deny force``
    gives ``never``; None when nothing is bracketed."""
    match = re.search(r"\[([^\]\s]+)\]", text)
    return match.group(1) if match else None


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` (``QUOTA PERIOD`` in microseconds, or
    ``max PERIOD``): ``"50000 100000"`` gives 0.5, ``"max 100000"`` None (no limit).

    Raises:
        ValueError: the text is not of that form.
    """
    parts = text.split()
    if len(parts) not in (1, 2):
        msg = f"not a cpu.max value: {text!r}"
        raise ValueError(msg)
    try:
        period = int(parts[1]) if len(parts) == 2 else 100_000
        quota = None if parts[0] == "max" else int(parts[0])
    except ValueError:
        msg = f"not a cpu.max value: {text!r}"
        raise ValueError(msg) from None
    if quota is None:
        return None
    if quota <= 0 or period <= 0:
        msg = f"not a cpu.max value: {text!r}"
        raise ValueError(msg)
    return quota / period


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``; a quota of
    -1 means no limit (None).

    Raises:
        ValueError: the texts are not ints.
    """
    quota, period = int(quota_text.strip()), int(period_text.strip())
    if quota < 0 or period <= 0:
        return None
    return quota / period


def parse_proc_cgroup(text: str) -> list[tuple[tuple[str, ...], str]]:
    """(controllers, path) per line of /proc/self/cgroup: ``4:cpu,cpuacct:/a/b`` gives
    ``(("cpu", "cpuacct"), "/a/b")``; the cgroup v2 line ``0::/a`` gives ``((), "/a")``."""
    groups = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers = tuple(c for c in parts[1].split(",") if c)
        groups.append((controllers, parts[2]))
    return groups


@dataclass(frozen=True)
class CpuQuota:
    cpus: float
    """The CPUs the quota allows (quota / period)."""
    source: str
    """The file that sets it, and its text."""


def _cgroup_dirs(mount: Mount, path: str) -> list[str]:
    """This process's cgroup directory under ``mount`` and each parent up to the mount point
    (a parent's quota limits its children too), deepest first."""
    root = mount.root.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    elif root:
        path = ""  # a cgroup namespace or a mount of another part of the tree
    parts = [p for p in path.split("/") if p]
    dirs = []
    for depth in range(len(parts), -1, -1):
        d = os.path.join(mount.mount_point, *parts[:depth])
        if os.path.isdir(d):
            dirs.append(d)
    return dirs


def _quota_v2(directory: str) -> CpuQuota | None:
    path = os.path.join(directory, "cpu.max")
    text = _read(path)
    try:
        cpus = parse_cpu_max(text) if text is not None else None
    except ValueError:
        return None
    return None if cpus is None or text is None else CpuQuota(cpus, f"{path}: {text.strip()}")


def _quota_v1(directory: str) -> CpuQuota | None:
    path = os.path.join(directory, "cpu.cfs_quota_us")
    quota, period = _read(path), _read(os.path.join(directory, "cpu.cfs_period_us"))
    if quota is None or period is None:
        return None
    try:
        cpus = parse_cfs_quota(quota, period)
    except ValueError:
        return None
    return None if cpus is None else CpuQuota(cpus, f"{path}: {quota.strip()} / {period.strip()}")


def cgroup_cpu_quota(mounts: Sequence[Mount], proc_cgroup: str) -> CpuQuota | None:
    """The tightest CPU quota of this process's cgroups (v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us``), along the path from its cgroup up to the hierarchy's root; None
    when there is none. ``proc_cgroup`` is the text of /proc/self/cgroup."""
    groups = parse_proc_cgroup(proc_cgroup)
    v2 = [path for controllers, path in groups if not controllers]
    v1 = [path for controllers, path in groups if "cpu" in controllers]
    found: list[CpuQuota] = []
    for mount in mounts:
        if mount.fstype == "cgroup2" and v2:
            path, read = v2[0], _quota_v2
        elif mount.fstype == "cgroup" and mount.option("cpu") is not None and v1:
            path, read = v1[0], _quota_v1
        else:
            continue
        for directory in _cgroup_dirs(mount, path):
            quota = read(directory)
            if quota is not None:
                found.append(quota)
    return min(found, key=lambda q: q.cpus, default=None)


def parse_thread_count(value: str) -> int | None:
    """The thread count a variable such as ``OMP_NUM_THREADS`` asks for: ``8`` gives 8,
    OpenMP's nested list ``8,2`` its outer 8; None for anything else."""
    head = value.strip().split(",")[0].strip()
    try:
        n = int(head)
    except ValueError:
        return None
    return n if n > 0 else None


# -- the checks --------------------------------------------------------------------------------


def _cpus_text(n: float) -> str:
    text = f"{n:.2f}".rstrip("0").rstrip(".")
    return f"{text} CPU" if text == "1" else f"{text} CPUs"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _suggested_gib(nbytes: int) -> int:
    """Whole GiB for a filesystem that takes a job of ``nbytes``, with a quarter to spare
    (status files, dumped inputs, a second job)."""
    return max(1, math.ceil(nbytes * 1.25 / GiB))


def _fs_text(directory: str, mount: Mount | None) -> tuple[str, dict[str, Any]]:
    """``tmpfs, 24.0 GiB, 23.9 GiB free`` and the raw values."""
    fstype = mount.fstype if mount is not None else "unknown filesystem"
    values: dict[str, Any] = {"fstype": mount.fstype if mount is not None else None}
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        values.update(total_bytes=None, free_bytes=None)
        return f"{fstype}, size unknown: {exc.strerror}", values
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    values.update(total_bytes=total, free_bytes=free)
    return f"{fstype}, {format_bytes(total)}, {format_bytes(free)} free", values


def check_temp_dir(temp_dir: str | None, size: int, mounts: Sequence[Mount]) -> Finding:
    """Where the pool would put the temporary files of a job of ``size`` bytes (as
    :func:`._storage.choose_base_dir` decides: ``temp_dir``, else ``$MEMMAP_POOL_TEMP_DIR``,
    else /dev/shm when it has room, else the system temp dir), and whether they fit."""
    env = os.environ.get(TEMP_DIR_ENV) or None
    job = format_bytes(size)
    available = available_memory()
    values: dict[str, Any] = {"size_bytes": size, "env": env, "available_memory_bytes": available}
    shm_too_small = False
    if temp_dir is not None:
        directory, why, source = temp_dir, "given with --temp-dir / temp_dir=", "temp_dir"
    elif env is not None:
        directory, why, source = env, f"from ${TEMP_DIR_ENV}", "env"
    else:
        directory, source = choose_base_dir(None, size), "default"
        shm = _shm_state(mounts)
        values["shm"] = shm
        if directory == SHM_DIR:
            why = "the default: /dev/shm has room"
        elif shm is None:
            why = "the default: there is no writable /dev/shm"
        elif shm["free_bytes"] < size:
            shm_too_small = True
            why = (
                f"the default, since /dev/shm ({shm['fstype']}, "
                f"{format_bytes(shm['total_bytes'])}, {format_bytes(shm['free_bytes'])} free) "
                "is too small"
            )
        else:
            why = (
                f"the default: /dev/shm has room, but a {job} job there would take more than "
                f"half of the {format_bytes(available or 0)} of available memory, which the "
                "pool leaves to the kernels"
            )
    values.update(path=directory, source=source)
    if not os.path.isdir(directory):
        values.update(fstype=None, total_bytes=None, free_bytes=None, mount_point=None)
        return Finding(
            "temp dir",
            "problem",
            f"{directory} ({why}) is not a directory: the pool refuses it (ValueError)",
            f"create it, or unset {TEMP_DIR_ENV} to let the pool choose"
            if temp_dir is None
            else "create it, or give an existing directory",
            values,
        )
    mount = mount_of(directory, mounts)
    fs, fs_values = _fs_text(directory, mount)
    values.update(fs_values)
    values["mount_point"] = mount.mount_point if mount is not None else None
    where = f"{directory} ({fs})"
    if not os.access(directory, os.W_OK | os.X_OK):
        return Finding(
            "temp dir",
            "problem",
            f"{where} ({why}): this user can't create files there, so every job with a "
            "temporary output fails",
            f"point temp_dir= / {TEMP_DIR_ENV} (--temp-dir) at a directory you can write",
            values,
        )
    shm_advice = (
        f"give the container a larger /dev/shm (docker run --shm-size={_suggested_gib(size)}g"
        f" ..., or on Kubernetes an emptyDir with medium: Memory mounted there), or point "
        f"temp_dir= / {TEMP_DIR_ENV} (--temp-dir) at a larger filesystem"
    )
    free = values["free_bytes"]
    if free is not None and free < size:
        advice = (
            f"point temp_dir= / {TEMP_DIR_ENV} (--temp-dir) at a filesystem with "
            f"{job} free, or write the output to a .npy path (out=) on a larger filesystem"
        )
        if shm_too_small or os.path.realpath(directory) == SHM_DIR:
            advice = shm_advice
        return Finding(
            "temp dir",
            "problem",
            f"{where} is too small for a {job} job ({why}): the pool would refuse its "
            "temporary output (NotEnoughSpaceError)",
            advice,
            values,
        )
    if shm_too_small:
        return Finding(
            "temp dir",
            "warning",
            f"{where} for a {job} job ({why}): temporary outputs go to this directory on "
            "disk instead of memory",
            shm_advice,
            values,
        )
    is_tmpfs = mount is not None and mount.fstype == "tmpfs"
    if is_tmpfs and available is not None and size > available:
        return Finding(
            "temp dir",
            "warning",
            f"{where} for a {job} job ({why}): a tmpfs holds its files in memory, and only "
            f"{format_bytes(available)} is available, so the job would push memory to swap "
            "or be killed",
            f"point temp_dir= / {TEMP_DIR_ENV} (--temp-dir) at a disk-backed directory for "
            "jobs this large, or write the output to a .npy path (out=)",
            values,
        )
    return Finding("temp dir", "ok", f"{where} for a {job} job ({why})", values=values)


def _shm_state(mounts: Sequence[Mount]) -> dict[str, Any] | None:
    if not (os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)):
        return None
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    mount = mount_of(SHM_DIR, mounts)
    return {
        "fstype": mount.fstype if mount is not None else "unknown filesystem",
        "total_bytes": st.f_blocks * st.f_frsize,
        "free_bytes": st.f_bavail * st.f_frsize,
    }


def check_huge_pages(
    directory: str,
    mount: Mount | None,
    shmem_enabled: str | None,
    size: int,
    available_memory: int | None,
) -> Finding:
    """Whether temporary outputs in ``directory`` (on ``mount``) get 2 MiB pages: tmpfs gives
    them to a mount with ``huge=always`` or ``huge=within_size``, unless /sys/.../shmem_enabled
    says ``deny`` (none for any tmpfs) or ``force`` (all of them). ``shmem_enabled``: that
    file's text, None when it does not exist. A disk-backed ``directory`` is fine for a job
    too large for memory (``available_memory``, bytes)."""
    selected = parse_bracketed(shmem_enabled) if shmem_enabled is not None else None
    huge = mount.option("huge") if mount is not None else None
    fstype = mount.fstype if mount is not None else None
    values: dict[str, Any] = {
        "path": directory,
        "fstype": fstype,
        "mount_point": mount.mount_point if mount is not None else None,
        "mount_huge": huge,
        "shmem_enabled": selected,
    }
    gib = _suggested_gib(size)
    mount_cmd = (
        f"mkdir -p {HUGE_MOUNT_POINT} && mount -t tmpfs -o size={gib}G,huge=within_size "
        f"tmpfs {HUGE_MOUNT_POINT}"
    )
    how = (
        "for faster fills (a memory-bound 1 GiB fill: 0.084 s instead of 0.50 s, see "
        f"docs/performance.md) mount a tmpfs with huge pages, as root: {mount_cmd}, and point "
        f"temp_dir= / {TEMP_DIR_ENV} (--temp-dir) at {HUGE_MOUNT_POINT}"
    )
    if sys.platform != "linux":
        return Finding("huge pages", "ok", "not Linux: no tmpfs huge pages to check", values=values)
    if not os.path.isdir(directory):
        return Finding(
            "huge pages",
            "warning",
            f"can't tell: the temp dir {directory} does not exist",
            "fix the temp dir first (see above), then run this again",
            values,
        )
    if shmem_enabled is None:
        return Finding(
            "huge pages",
            "warning",
            f"this kernel has no transparent huge pages for shared memory ({SHMEM_ENABLED} "
            "does not exist): temporary outputs fill 4 KiB pages",
            "a kernel built with CONFIG_TRANSPARENT_HUGEPAGE would allow them",
            values,
        )
    if fstype != "tmpfs":
        room = available_memory if available_memory is not None else math.inf
        if size > room * SHM_MAX_FRACTION_OF_AVAILABLE_RAM:
            return Finding(
                "huge pages",
                "ok",
                f"{directory} is {fstype or 'not a tmpfs'}, not a tmpfs with huge pages, as "
                f"it should be for a {format_bytes(size)} job: more than half of the available "
                "memory",
                values=values,
            )
        return Finding(
            "huge pages",
            "warning",
            f"{directory} is {fstype or 'not a tmpfs'}: temporary outputs there live in a "
            "disk filesystem's page cache and are written back to disk; only a tmpfs mounted "
            "with huge= gives shared files 2 MiB pages",
            how,
            values,
        )
    where = directory
    if mount is not None and os.path.realpath(directory) != mount.mount_point:
        where = f"{directory} (tmpfs on {mount.mount_point})"
    if selected == "deny":
        return Finding(
            "huge pages",
            "warning",
            f"shmem_enabled is deny, which turns huge pages off for every tmpfs: temporary "
            f"outputs in {where} fill 4 KiB pages",
            f"as root: echo never > {SHMEM_ENABLED} (deny overrides every mount's huge=), "
            f"then {how}",
            values,
        )
    if selected == "force":
        return Finding(
            "huge pages",
            "ok",
            f"temporary outputs in {where} get 2 MiB pages (shmem_enabled: force)",
            values=values,
        )
    if huge in ("always", "within_size"):
        return Finding(
            "huge pages",
            "ok",
            f"temporary outputs in {where} get 2 MiB pages (huge={huge}) when the kernel "
            "finds free 2 MiB blocks",
            values=values,
        )
    if huge == "advise":
        mount_point = mount.mount_point if mount is not None else directory
        return Finding(
            "huge pages",
            "warning",
            f"{where} is mounted with huge=advise, which gives huge pages only to mappings "
            "that ask for them (madvise MADV_HUGEPAGE), and the pool's don't: temporary "
            "outputs fill 4 KiB pages",
            f"as root: mount -o remount,huge=within_size {mount_point}",
            values,
        )
    return Finding(
        "huge pages",
        "warning",
        f"temporary outputs in {where} fill 4 KiB pages (the tmpfs is mounted without "
        f"huge=; shmem_enabled: {selected or 'unknown'}, which covers only anonymous shared "
        "memory and memfds)",
        how,
        values,
    )


def check_cpus(affinity: int, cpu_count: int | None, quota: CpuQuota | None) -> Finding:
    """The CPUs this process may use: its affinity (the pool's default ``max_workers``)
    against a cgroup CPU quota, which the default would oversubscribe."""
    values: dict[str, Any] = {
        "affinity": affinity,
        "cpu_count": cpu_count,
        "quota_cpus": quota.cpus if quota is not None else None,
        "quota_source": quota.source if quota is not None else None,
    }
    of = f" of {cpu_count}" if cpu_count is not None else ""
    if quota is not None and quota.cpus < affinity:
        n = max(1, math.floor(quota.cpus))
        values["suggested_workers"] = n
        return Finding(
            "cpus",
            "warning",
            f"a cgroup CPU quota of {_cpus_text(quota.cpus)} ({quota.source}) is below the "
            f"{affinity}{of} CPUs this process may run on, which is how many workers the pool "
            f"starts by default: {affinity} workers would share {_cpus_text(quota.cpus)} and "
            "be throttled",
            f"pass max_workers={n} and worker_threads=1 (--workers {n} on the command line)",
            values,
        )
    limit = (
        f"a cgroup CPU quota of {_cpus_text(quota.cpus)}"
        if quota is not None
        else "no cgroup CPU quota"
    )
    return Finding(
        "cpus",
        "ok",
        f"{affinity}{of} CPUs usable by this process ({limit}); the pool starts "
        f"{_count(affinity, 'worker')} by default",
        values=values,
    )


@dataclass(frozen=True)
class ThreadLibrary:
    """A BLAS or OpenMP library loaded in this process, as threadpoolctl reports it."""

    api: str  # "openblas", "mkl", "blis", "openmp", ...
    version: str | None
    threads: int
    threading_layer: str | None = None

    def text(self) -> str:
        """``openblas 0.3.27 (pthreads, 2 threads)``."""
        name = f"{self.api} {self.version}" if self.version else self.api
        layer = f"{self.threading_layer}, " if self.threading_layer else ""
        return f"{name} ({layer}{self.threads} thread{'s' if self.threads != 1 else ''})"


def loaded_thread_libraries() -> list[ThreadLibrary] | None:
    """The BLAS/OpenMP libraries loaded in this process once numpy is imported; None
    without threadpoolctl."""
    import numpy  # noqa: F401 - loads its BLAS

    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    libraries = []
    for info in threadpool_info():
        libraries.append(
            ThreadLibrary(
                api=str(info.get("internal_api") or info.get("user_api") or "?"),
                version=info.get("version"),
                threads=int(info.get("num_threads") or 1),
                threading_layer=info.get("threading_layer"),
            )
        )
    return libraries


def check_threads(
    cpus: float,
    affinity: int,
    workers: int,
    environ: Mapping[str, str],
    libraries: Sequence[ThreadLibrary] | None,
) -> Finding:
    """BLAS/OpenMP threads against the ``cpus`` this process may use (its ``affinity``, or
    less under a CPU quota), with ``workers`` workers (the default: ``affinity``).
    ``libraries`` is None without threadpoolctl.

    With ``worker_threads="auto"`` each worker sets the thread variables to
    ``cores // workers`` (for libraries it loads later) and, through threadpoolctl, limits the
    libraries already loaded, numpy's BLAS among them. Without threadpoolctl that BLAS, loaded
    when a worker starts, keeps the thread count it read from the environment.
    """
    per_worker = max(1, affinity // workers)
    env = {name: environ[name] for name in _THREAD_ENV_VARS if environ.get(name)}
    counts = {name: parse_thread_count(value) for name, value in env.items()}
    values: dict[str, Any] = {
        "cpus": cpus,
        "workers": workers,
        "auto_threads_per_worker": per_worker,
        "env": env,
        "threadpoolctl": libraries is not None,
        "libraries": [
            {"api": lib.api, "version": lib.version, "threads": lib.threads} for lib in libraries
        ]
        if libraries is not None
        else None,
    }
    env_text = (
        "; ".join(f"{name}={value}" for name, value in env.items())
        if env
        else "no thread variables set"
    )
    if libraries is None:
        loaded = "threadpoolctl not installed, so the loaded libraries are unknown"
    elif libraries:
        loaded = "loaded: " + ", ".join(lib.text() for lib in libraries)
    else:
        loaded = "no BLAS/OpenMP library loaded"
    each = "its worker" if workers == 1 else f"each of its {workers} workers"
    pool = (
        f"the pool gives {each} {_count(per_worker, 'thread')} "
        f'(worker_threads="auto": {_count(affinity, "CPU")} // {_count(workers, "worker")})'
    )
    found = f"{env_text}; {loaded}; {pool}"
    too_many_env = {n: c for n, c in counts.items() if c is not None and c > cpus}
    too_many_libs = [lib for lib in libraries or () if lib.threads > cpus]
    problems = []
    advice = []
    if too_many_env:
        names = ", ".join(f"{n}={c}" for n, c in too_many_env.items())
        problems.append(
            f"{names} is more than the {_cpus_text(cpus)} usable: an OpenMP runtime starts "
            "that many threads, oversubscribing the CPUs in this process and in workers with "
            'worker_threads=None (workers with "auto" set their own; OpenBLAS caps itself at '
            "the CPUs it sees)"
        )
        advice.append(f"unset {', '.join(too_many_env)} or set it to {max(1, int(cpus))} or less")
    if too_many_libs:
        names = ", ".join(lib.text() for lib in too_many_libs)
        problems.append(f"{names} runs more threads than the {_cpus_text(cpus)} usable")
        advice.append(
            f"set OMP_NUM_THREADS={max(1, int(cpus))} before starting Python, or "
            "threadpoolctl.threadpool_limits() in the program"
        )
    if libraries is None and workers > 1:
        capped = bool(counts) and all(c is not None and c <= per_worker for c in counts.values())
        if not capped:
            problems.append(
                "without threadpoolctl the pool can't cap numpy's BLAS in its workers (it "
                "is loaded before the limit is set), so each worker may run one BLAS thread "
                f"per CPU: {_count(workers, 'worker')} x {_count(int(cpus), 'thread')}"
            )
            advice.append(
                "pip install 'memmap-pool[threads]' (threadpoolctl), or export "
                f"OMP_NUM_THREADS={per_worker} OPENBLAS_NUM_THREADS={per_worker} "
                f"MKL_NUM_THREADS={per_worker} before starting Python"
            )
    if problems:
        return Finding(
            "threads", "warning", f"{found}; but {'; '.join(problems)}", "; ".join(advice), values
        )
    return Finding("threads", "ok", found, values=values)


def check_map_count(max_map_count: int | None, maps_now: int | None) -> Finding:
    """``vm.max_map_count`` (mappings per process) against what a worker needs: what this
    process has with numpy loaded, the pool's own, and one mapping per file of each of the
    jobs a worker keeps mapped (:data:`._worker.CONTEXT_CACHE_SIZE`), whatever their size."""
    need = (maps_now or 0) + WORKER_EXTRA_MAPS + CONTEXT_CACHE_SIZE * FILES_PER_JOB
    values: dict[str, Any] = {
        "max_map_count": max_map_count,
        "maps_now": maps_now,
        "worker_needs_about": need,
        "jobs_kept_per_worker": CONTEXT_CACHE_SIZE,
    }
    now = f"the {maps_now} this process has with numpy loaded, " if maps_now is not None else ""
    how = (
        f"a worker needs about {need}: {now}about {WORKER_EXTRA_MAPS} for the pool's modules "
        f"and threads, and one per output, input and status file of each of the last "
        f"{CONTEXT_CACHE_SIZE} jobs it ran, whatever their size "
        f"({CONTEXT_CACHE_SIZE * FILES_PER_JOB} for jobs of one output and one input)"
    )
    if max_map_count is None:
        return Finding(
            "memory maps",
            "ok",
            f"vm.max_map_count is not readable here; {how}",
            values=values,
        )
    advice = (
        "as root: sysctl -w vm.max_map_count=65530 (Linux's default; put it in "
        "/etc/sysctl.d/ to keep it after a reboot)"
    )
    if max_map_count < need:
        return Finding(
            "memory maps",
            "problem",
            f"vm.max_map_count is {max_map_count}, and {how}: workers would fail to map "
            "their files (ENOMEM)",
            advice,
            values,
        )
    if max_map_count < MAP_COUNT_LOW:
        return Finding(
            "memory maps",
            "warning",
            f"vm.max_map_count is {max_map_count}, low: {how}, and each BLAS thread or "
            "library loaded adds more",
            advice,
            values,
        )
    return Finding("memory maps", "ok", f"vm.max_map_count {max_map_count}; {how}", values=values)


def check_open_files(soft: int, hard: int, fds_now: int | None, workers: int) -> Finding:
    """The limit on open files against what the pool's process needs (its queues and
    private directory, a few per worker and per running job) and what a worker needs (its
    inherited descriptors, and one per output of each job it keeps mapped)."""
    parent = (fds_now or 0) + POOL_FDS + FDS_PER_WORKER * workers + FDS_PER_JOB
    worker = WORKER_FDS + CONTEXT_CACHE_SIZE
    need = max(parent, worker)
    unlimited = soft == resource.RLIM_INFINITY
    values: dict[str, Any] = {
        "soft": None if unlimited else soft,
        "hard": None if hard == resource.RLIM_INFINITY else hard,
        "fds_now": fds_now,
        "workers": workers,
        "parent_needs_about": parent,
        "worker_needs_about": worker,
    }
    now = f"{fds_now} open now, " if fds_now is not None else ""
    how = (
        f"the pool's process needs about {parent} with {_count(workers, 'worker')} ({now}"
        f"{POOL_FDS} for the pool, {FDS_PER_WORKER} per worker, {FDS_PER_JOB} per running "
        f"job), a worker about {worker} (most inherited, and one per output of each of the "
        f"last {CONTEXT_CACHE_SIZE} jobs it ran)"
    )
    hard_text = "unlimited" if values["hard"] is None else str(hard)
    limit = "unlimited" if unlimited else str(soft)
    target = 4096 if values["hard"] is None else min(4096, hard)
    advice = (
        f"raise it: ulimit -n {target} in the shell before the program starts (the hard "
        f"limit is {hard_text}), or resource.setrlimit(resource.RLIMIT_NOFILE, ({target}, "
        f"{'resource.RLIM_INFINITY' if values['hard'] is None else hard})) at its start"
    )
    if not unlimited and soft < need:
        return Finding(
            "open files",
            "problem",
            f"the limit on open files is {limit} (hard {hard_text}), and {how}: the pool "
            "would fail with EMFILE (too many open files)",
            advice,
            values,
        )
    if not unlimited and soft < OPEN_FILES_LOW:
        return Finding(
            "open files",
            "warning",
            f"the limit on open files is {limit} (hard {hard_text}), low: {how}, and each "
            "job with a .npy output holds one more while it runs",
            advice,
            values,
        )
    return Finding("open files", "ok", f"limit {limit} (hard {hard_text}); {how}", values=values)


def check_start_method(
    current: str | None, default: str, version: tuple[int, int] = sys.version_info[:2]
) -> Finding:
    """The start method the pool's workers get unless told (``mp_context=``,
    ``--start-method``), and what it costs. ``current``: the one set in this process, if
    any; ``default``: the platform's."""
    method = current or default
    values: dict[str, Any] = {
        "method": method,
        "set_in_process": current is not None,
        "platform_default": default,
        "python": f"{version[0]}.{version[1]}",
    }
    origin = "set in this process" if current is not None else "the platform's default"
    if sys.platform == "linux" and version < (3, 14):
        origin += "; forkserver from Python 3.14 on Linux"
    if method == "fork":
        cost = (
            "workers start fastest, as copies of this process, and see its modules and "
            "kernels without importing them"
        )
    else:
        how = "from a server process" if method == "forkserver" else "a new interpreter"
        cost = (
            f"each worker starts {how} "
            "and imports numpy itself (slower start), and kernels must be importable there "
            "or picklable by value: the pool sends them with cloudpickle, by value for "
            "functions of __main__ and of .py files given to the command, by reference "
            "(module and name) for functions of installed modules"
        )
    return Finding(
        "start method",
        "ok",
        f"{method} ({origin}): {cost}; choose another with mp_context= or --start-method",
        values=values,
    )


# -- this machine ------------------------------------------------------------------------------


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _count_lines(path: str) -> int | None:
    text = _read(path)
    return None if text is None else len(text.splitlines())


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    except OSError:
        return None


def _int_file(path: str) -> int | None:
    text = _read(path)
    try:
        return None if text is None else int(text.strip())
    except ValueError:
        return None


def diagnose(temp_dir: str | None = None, size: int = DEFAULT_JOB_BYTES) -> list[Finding]:
    """Run every check on this machine, for a job of ``size`` bytes with temporary files in
    ``temp_dir`` (default: where the pool would put them, honouring
    ``$MEMMAP_POOL_TEMP_DIR``)."""
    mounts = read_mounts()
    findings = [check_temp_dir(temp_dir, size, mounts)]
    directory = findings[0].values["path"]
    mount = mount_of(directory, mounts) if os.path.isdir(directory) else None
    shmem = _read(SHMEM_ENABLED)
    findings.append(check_huge_pages(directory, mount, shmem, size, available_memory()))

    affinity = _usable_cpus()
    proc_cgroup = _read("/proc/self/cgroup") or ""
    quota = cgroup_cpu_quota(mounts, proc_cgroup)
    findings.append(check_cpus(affinity, os.cpu_count(), quota))
    cpus = min(float(affinity), quota.cpus) if quota is not None else float(affinity)
    threads = check_threads(cpus, affinity, affinity, os.environ, loaded_thread_libraries())
    findings.append(threads)

    findings.append(check_map_count(_int_file(MAX_MAP_COUNT), _count_lines("/proc/self/maps")))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    findings.append(check_open_files(soft, hard, _open_fds(), affinity))
    findings.append(
        check_start_method(
            multiprocessing.get_start_method(allow_none=True),
            multiprocessing.get_all_start_methods()[0],
        )
    )
    return findings
