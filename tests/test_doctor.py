"""memmap-pool doctor: the command on this machine (text, JSON, exit codes), a tiny tmpfs as
the temp dir, $MEMMAP_POOL_TEMP_DIR, a tmpfs with huge pages, a process limited to one CPU or
to few open files, and the parsers of the kernel's files on sample text."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import mount_tmpfs, unmount
from memmap_pool import _doctor
from memmap_pool._doctor import (
    Finding,
    Mount,
    cgroup_cpu_quota,
    check_cpus,
    check_map_count,
    diagnose,
    mount_of,
    parse_bracketed,
    parse_cfs_quota,
    parse_cpu_max,
    parse_mountinfo,
    parse_proc_cgroup,
    parse_proc_mounts,
    parse_thread_count,
    read_mounts,
    worst,
)
from memmap_pool.cli._parse import UsageError, parse_size

WAIT = 60.0
"""Seconds the command may take; only a hang reaches it."""

SRC = str(Path(__file__).resolve().parents[1] / "src")

NAMES = [
    "temp dir",
    "huge pages",
    "cpus",
    "threads",
    "memory maps",
    "open files",
    "start method",
]
LINE = re.compile(r"^(ok|warning|problem) +([a-z ]+): (.+)$")


@pytest.fixture
def env() -> dict[str, str]:
    """The command's environment: this checkout's sources, no temp dir or thread settings
    of the caller's (tests add their own)."""
    e = os.environ.copy()
    e["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [e.get("PYTHONPATH")])])
    for name in ("MEMMAP_POOL_TEMP_DIR", "PYTHONWARNINGS", *_doctor._THREAD_ENV_VARS):
        e.pop(name, None)
    return e


def doctor(
    *args: object, env: dict[str, str], **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memmap_pool", "doctor", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=WAIT,
        check=False,
        **kwargs,
    )


def findings_of(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    """The findings of a ``--json`` run, by name."""
    document = json.loads(proc.stdout)
    return {f["name"]: f for f in document["findings"]}


@pytest.fixture
def huge_tmpfs():
    """A 4 MiB tmpfs mounted with huge=within_size (skips where mounting needs root)."""
    where = mount_tmpfs("4m,huge=within_size")
    try:
        yield where
    finally:
        unmount(where)


# -- the command on this machine ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_prints_one_line_per_finding_and_exits_by_their_levels(env):
    proc = doctor(env=env)
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), proc.stdout
    assert [m.group(2) for m in matches if m] == NAMES, proc.stdout
    levels = {m.group(1) for m in matches if m}
    assert proc.returncode == (0 if levels == {"ok"} else 1), proc.stdout
    for line, m in zip(lines, matches):
        # The level is padded to one column: "ok       temp dir: ...".
        assert m is not None
        assert line.startswith(f"{m.group(1):<8} {m.group(2)}: ")


def _numbers_out(text: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "#", text)


@pytest.mark.timeout(60)
def test_json_agrees_with_the_text(env):
    text = doctor(env=env)
    proc = doctor("--json", env=env)
    assert proc.returncode == text.returncode
    document = json.loads(proc.stdout)
    findings = document["findings"]
    assert [f["name"] for f in findings] == NAMES
    assert document["level"] == worst(
        [Finding(f["name"], f["level"], f["found"]) for f in findings]
    )
    lines = text.stdout.splitlines()
    for f, line in zip(findings, lines, strict=True):
        assert set(f) == {"name", "level", "found", "advice", "values"}
        assert f["level"] in ("ok", "warning", "problem")
        assert (f["advice"] == "") == (f["level"] == "ok"), f
        expected = f"{f['level']:<8} {f['name']}: {f['found']}"
        expected = f"{expected}; {f['advice']}" if f["advice"] else expected
        # Two runs: the numbers measured live (free space, mappings, open files) may differ.
        assert _numbers_out(line) == _numbers_out(expected)
    values = {f["name"]: f["values"] for f in findings}
    # The raw values are this machine's.
    assert values["cpus"]["affinity"] == len(os.sched_getaffinity(0))
    assert values["cpus"]["cpu_count"] == os.cpu_count()
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert values["open files"]["soft"] in (soft, None)
    with open("/proc/sys/vm/max_map_count") as f:
        assert values["memory maps"]["max_map_count"] == int(f.read())
    temp = values["temp dir"]
    st = os.statvfs(temp["path"])
    assert temp["total_bytes"] == st.f_blocks * st.f_frsize
    assert temp["size_bytes"] == 1 << 30  # the default --size


@pytest.mark.timeout(60)
def test_findings_without_the_command_match_the_command(env, monkeypatch):
    """diagnose() is the command's content: same checks, same levels (a level that depends
    on free space or open files could change between the runs; these don't here)."""
    monkeypatch.delenv("MEMMAP_POOL_TEMP_DIR", raising=False)  # as in the command's env
    in_process = diagnose()
    assert [f.name for f in in_process] == NAMES
    assert all(
        isinstance(f, Finding) and f.level in ("ok", "warning", "problem") for f in in_process
    )
    by_cli = findings_of(doctor("--json", env=env))
    for f in in_process:
        if f.name in ("huge pages", "cpus", "memory maps", "start method"):
            assert by_cli[f.name]["level"] == f.level, (f, by_cli[f.name])
    json.dumps([f.as_dict() for f in in_process])  # serialisable


# -- the temp dir --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_tiny_tmpfs_is_too_small_for_the_job(tiny_tmpfs, env):
    proc = doctor("--temp-dir", tiny_tmpfs, "--size", "64M", env=env)
    assert proc.returncode == 1, proc.stdout
    line = next(x for x in proc.stdout.splitlines() if " temp dir: " in x)
    assert line.startswith(("warning", "problem")), line
    assert str(tiny_tmpfs) in line
    assert "tmpfs" in line
    assert "1.0 MiB" in line  # the filesystem's size
    assert "64.0 MiB" in line  # the job's
    assert "MEMMAP_POOL_TEMP_DIR" in line  # what to do

    found = findings_of(doctor("--temp-dir", tiny_tmpfs, "--size", "64M", "--json", env=env))
    values = found["temp dir"]["values"]
    assert values["path"] == str(tiny_tmpfs)
    assert values["source"] == "temp_dir"
    assert values["fstype"] == "tmpfs"
    assert values["mount_point"] == str(tiny_tmpfs)
    assert values["total_bytes"] == 1 << 20
    assert values["size_bytes"] == 64 << 20


@pytest.mark.timeout(60)
def test_a_tiny_tmpfs_takes_a_job_that_fits(tiny_tmpfs, env):
    found = findings_of(doctor("--temp-dir", tiny_tmpfs, "--size", "256k", "--json", env=env))
    assert found["temp dir"]["level"] == "ok", found["temp dir"]


@pytest.mark.timeout(60)
def test_the_temp_dir_variable_is_honoured(tiny_tmpfs, tmp_path, env):
    env["MEMMAP_POOL_TEMP_DIR"] = str(tiny_tmpfs)
    proc = doctor("--size", "64M", "--json", env=env)
    assert proc.returncode == 1
    temp = findings_of(proc)["temp dir"]
    assert temp["level"] in ("warning", "problem")
    assert temp["values"]["path"] == str(tiny_tmpfs)
    assert temp["values"]["source"] == "env"
    assert "$MEMMAP_POOL_TEMP_DIR" in temp["found"]
    # --temp-dir wins over the variable, as temp_dir= does in the pool.
    temp = findings_of(doctor("--temp-dir", tmp_path, "--size", "64M", "--json", env=env))[
        "temp dir"
    ]
    assert temp["values"]["path"] == str(tmp_path)
    assert temp["values"]["source"] == "temp_dir"


@pytest.mark.timeout(60)
def test_a_temp_dir_variable_naming_no_directory_is_a_problem(tmp_path, env):
    env["MEMMAP_POOL_TEMP_DIR"] = str(tmp_path / "missing")
    proc = doctor(env=env)
    assert proc.returncode == 1
    line = proc.stdout.splitlines()[0]
    assert line.startswith("problem  temp dir: ")
    assert "is not a directory" in line
    assert "unset MEMMAP_POOL_TEMP_DIR" in line


@pytest.mark.timeout(60)
def test_the_default_is_the_pools_choice(env):
    from memmap_pool._storage import choose_base_dir

    for size in ("1M", "1G"):
        temp = findings_of(doctor("--size", size, "--json", env=env))["temp dir"]
        assert temp["values"]["source"] == "default"
        assert temp["values"]["path"] == choose_base_dir(None, parse_size(size))


# -- huge pages ---------------------------------------------------------------------------------


def _shmem_enabled() -> str | None:
    try:
        with open(_doctor.SHMEM_ENABLED) as f:
            return parse_bracketed(f.read())
    except OSError:
        return None


@pytest.mark.timeout(60)
def test_a_tmpfs_without_huge_pages_gets_the_mount_command(tiny_tmpfs, env):
    found = findings_of(doctor("--temp-dir", tiny_tmpfs, "--size", "256k", "--json", env=env))
    huge = found["huge pages"]
    assert huge["values"]["mount_huge"] is None
    assert huge["values"]["shmem_enabled"] == _shmem_enabled()
    if _shmem_enabled() == "force":
        assert huge["level"] == "ok"
        return
    assert huge["level"] == "warning"
    assert "4 KiB pages" in huge["found"]
    assert "mount -t tmpfs -o size=1G,huge=within_size tmpfs /mnt/hugeshm" in huge["advice"]
    assert "as root" in huge["advice"]


@pytest.mark.timeout(60)
def test_a_tmpfs_with_huge_pages_is_ok(huge_tmpfs, env):
    found = findings_of(doctor("--temp-dir", huge_tmpfs, "--size", "1M", "--json", env=env))
    huge = found["huge pages"]
    assert huge["values"]["mount_huge"] == "within_size"
    assert huge["values"]["mount_point"] == str(huge_tmpfs)
    if _shmem_enabled() == "deny":
        assert huge["level"] == "warning"
    else:
        assert huge["level"] == "ok", huge
        assert "2 MiB pages" in huge["found"]


def test_mount_of_finds_the_tmpfs_of_a_path(tiny_tmpfs):
    mounts = read_mounts()
    inner = tiny_tmpfs / "sub"
    inner.mkdir()
    for path in (tiny_tmpfs, inner):
        mount = mount_of(str(path), mounts)
        assert mount is not None
        assert mount.mount_point == str(tiny_tmpfs)
        assert mount.fstype == "tmpfs"
        assert mount.option("size") == "1024k"
        st = os.stat(path)
        assert mount.dev == (os.major(st.st_dev), os.minor(st.st_dev))


# -- CPUs, threads, limits, start method -----------------------------------------------------


def _one_cpu() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


@pytest.mark.timeout(60)
def test_a_process_on_one_cpu_is_told_a_thread_setting_oversubscribes(env):
    env["OMP_NUM_THREADS"] = "2"
    proc = doctor("--json", env=env, preexec_fn=_one_cpu)
    found = findings_of(proc)
    cpus = found["cpus"]
    assert cpus["values"]["affinity"] == 1
    assert cpus["found"].startswith(f"1 of {os.cpu_count()} CPUs usable")
    threads = found["threads"]
    assert threads["level"] == "warning"
    assert threads["values"]["env"] == {"OMP_NUM_THREADS": "2"}
    assert threads["values"]["auto_threads_per_worker"] == 1
    assert "OMP_NUM_THREADS=2 is more than the 1 CPU usable" in threads["found"]
    assert "OMP_NUM_THREADS" in threads["advice"]
    assert proc.returncode == 1


@pytest.mark.timeout(60)
def test_threads_report_the_libraries_loaded(env):
    pytest.importorskip("threadpoolctl")
    env["OMP_NUM_THREADS"] = "1"
    threads = findings_of(doctor("--json", env=env))["threads"]
    libraries = threads["values"]["libraries"]
    assert threads["values"]["threadpoolctl"] is True
    assert libraries, "numpy's BLAS is loaded"
    assert all(lib["threads"] == 1 for lib in libraries), libraries
    assert threads["level"] == "ok", threads
    assert 'worker_threads="auto"' in threads["found"]


@pytest.mark.timeout(60)
def test_without_threadpoolctl_the_blas_of_workers_is_not_capped(env):
    """threadpoolctl made unimportable in the doctor's process, as when it is not installed."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: one worker can't oversubscribe")
    script = (
        "import sys, json\n"
        "sys.modules['threadpoolctl'] = None\n"
        "from memmap_pool._doctor import diagnose\n"
        "f = [f for f in diagnose() if f.name == 'threads'][0]\n"
        "print(json.dumps(f.as_dict()))\n"
    )
    run = [sys.executable, "-c", script]
    proc = subprocess.run(run, capture_output=True, text=True, env=env, timeout=WAIT)
    found = json.loads(proc.stdout)
    assert found["level"] == "warning", found
    assert found["values"]["threadpoolctl"] is False
    assert "memmap-pool[threads]" in found["advice"]
    assert "OMP_NUM_THREADS=1" in found["advice"]
    # The variables set to one thread per worker do the job instead.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"
    proc = subprocess.run(run, capture_output=True, text=True, env=env, timeout=WAIT)
    assert json.loads(proc.stdout)["level"] == "ok", proc.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("soft", "level"), [(64, "warning"), (16, "problem")])
def test_a_low_limit_on_open_files_is_reported(soft, level, env):
    def lower_limit() -> None:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    proc = doctor("--json", env=env, preexec_fn=lower_limit)
    files = findings_of(proc)["open files"]
    assert files["level"] == level, files
    assert files["values"]["soft"] == soft
    assert f"the limit on open files is {soft}" in files["found"]
    assert "ulimit -n" in files["advice"]
    assert proc.returncode == 1


def test_the_map_count_check_warns_only_when_very_low():
    assert check_map_count(65530, 280).level == "ok"
    low = check_map_count(2000, 280)
    assert low.level == "warning"
    assert "2000" in low.found
    assert "sysctl -w vm.max_map_count=" in low.advice
    too_low = check_map_count(300, 280)
    assert too_low.level == "problem"
    assert too_low.values["worker_needs_about"] > 300


def test_a_cpu_quota_below_the_affinity_says_how_many_workers():
    quota = _doctor.CpuQuota(1.5, "/sys/fs/cgroup/cpu.max: 150000 100000")
    finding = check_cpus(8, 8, quota)
    assert finding.level == "warning"
    assert "1.5 CPUs" in finding.found
    assert "max_workers=1" in finding.advice
    assert "--workers 1" in finding.advice
    assert check_cpus(2, 8, _doctor.CpuQuota(4.0, "x")).level == "ok"
    assert check_cpus(8, 8, None).level == "ok"


@pytest.mark.timeout(60)
def test_the_start_method_is_the_one_python_will_use(env):
    method = findings_of(doctor("--json", env=env))["start method"]
    assert method["level"] == "ok"
    import multiprocessing

    assert method["values"]["method"] == multiprocessing.get_all_start_methods()[0]
    assert method["values"]["set_in_process"] is False
    script = (
        "import multiprocessing, json\n"
        "multiprocessing.set_start_method('spawn')\n"
        "from memmap_pool._doctor import diagnose\n"
        "f = [f for f in diagnose() if f.name == 'start method'][0]\n"
        "print(json.dumps(f.as_dict()))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=WAIT
    )
    found = json.loads(proc.stdout)
    assert found["values"]["method"] == "spawn"
    assert found["values"]["set_in_process"] is True
    assert "cloudpickle" in found["found"]


# -- bad usage ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--size", "nonsense"], "--size must be a size such as 64M, 8G or 1073741824"),
        (["--size", "0"], "--size must be at least one byte"),
        (["--temp-dir", "/nonexistent/dir"], "--temp-dir '/nonexistent/dir' is not a directory"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_bad_usage_exits_2_with_a_one_line_reason(args, reason, env):
    proc = doctor(*args, env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert reason in proc.stderr
    assert "Traceback" not in proc.stderr
    if args[0] != "--frobnicate":  # argparse's own errors come with the usage line
        assert proc.stderr.count("\n") == 1
        assert proc.stderr.startswith("memmap-pool doctor: error: ")


# -- parsers, on sample text -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1073741824", 1 << 30),
        ("64M", 64 << 20),
        ("64m", 64 << 20),
        ("64MiB", 64 << 20),
        ("64MB", 64 << 20),
        ("8G", 8 << 30),
        ("1.5G", 3 << 29),
        ("512k", 512 << 10),
        ("2T", 2 << 40),
        (" 100 ", 100),
        ("100B", 100),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["nonsense", "", "M", "-1G", "1.2.3G", "64X", "0", "0.1"])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError, match="--size"):
        parse_size(text)


def test_parse_bracketed_shmem_enabled():
    assert parse_bracketed("always within_size advise [never] deny force\n") == "never"
    assert parse_bracketed("[always] within_size advise never deny force") == "always"
    assert parse_bracketed("always [within_size] advise never deny force") == "within_size"
    assert parse_bracketed("always madvise never") is None


def test_parse_cpu_max():
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("50000 100000") == 0.5
    assert parse_cpu_max("200000 100000") == 2.0
    assert parse_cpu_max("max") is None
    for bad in ("", "lots 100000", "1 2 3", "0 100000"):
        with pytest.raises(ValueError, match=r"cpu\.max"):
            parse_cpu_max(bad)


def test_parse_cfs_quota():
    assert parse_cfs_quota("-1\n", "100000\n") is None
    assert parse_cfs_quota("150000", "100000") == 1.5
    with pytest.raises(ValueError, match="invalid literal"):
        parse_cfs_quota("x", "100000")


MOUNTINFO = (
    "24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=12334096k,mode=755\n"
    "25 24 0:23 / /dev/shm rw,nosuid,nodev - tmpfs tmpfs rw,size=65536k\n"
    "30 25 0:27 / /dev/shm rw,relatime shared:5 - tmpfs shm rw,size=24683568k,huge=within_size\n"
    "41 31 0:38 / /sys/fs/cgroup rw,relatime shared:9 master:2 - cgroup2 cgroup2 rw\n"
    r"45 27 0:40 / /mnt/with\040space rw - tmpfs tmpfs rw,size=1024k,huge=advise"
    "\n"
    "46 27 8:1 /data /srv rw - ext4 /dev/sda1 rw,errors=remount-ro\n"
    "garbage line\n"
)


def test_parse_mountinfo():
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.mount_point for m in mounts] == [
        "/dev",
        "/dev/shm",
        "/dev/shm",
        "/sys/fs/cgroup",
        "/mnt/with space",
        "/srv",
    ]
    shm = mounts[2]
    assert (shm.fstype, shm.source, shm.dev, shm.root) == ("tmpfs", "shm", (0, 27), "/")
    assert shm.option("huge") == "within_size"
    assert shm.option("size") == "24683568k"
    assert shm.option("relatime") == ""
    assert shm.option("nosuid") is None
    assert mounts[1].option("huge") is None
    assert mounts[4].option("huge") == "advise"
    assert mounts[5].root == "/data"
    assert mounts[5].source == "/dev/sda1"


def test_parse_proc_mounts():
    mounts = parse_proc_mounts(
        "tmpfs /dev/shm tmpfs rw,nosuid,nodev,size=65536k,huge=always 0 0\n"
        "/dev/sda1 / ext4 rw,relatime 0 0\n"
    )
    assert [(m.mount_point, m.fstype) for m in mounts] == [("/dev/shm", "tmpfs"), ("/", "ext4")]
    assert mounts[0].option("huge") == "always"
    assert mounts[0].dev is None


def test_mount_of_takes_the_deepest_and_last_stacked_mount():
    mounts = [
        Mount("/", "ext4", "/dev/sda1", ("rw",)),
        Mount("/dev/shm", "tmpfs", "tmpfs", ("rw", "size=64k")),
        Mount("/dev/shm", "tmpfs", "shm", ("rw", "huge=always")),
    ]
    # No device numbers: by path alone (as from /proc/mounts).
    found = mount_of("/dev/shm/some/file", mounts)
    assert found is not None
    assert found.source == "shm"
    found = mount_of("/dev/shmx", mounts)
    assert found is not None
    assert found.mount_point == "/"


def test_parse_proc_cgroup():
    groups = parse_proc_cgroup("4:cpu,cpuacct:/a/b\n1:name=systemd:/\n0::/user.slice/x\n")
    assert groups == [(("cpu", "cpuacct"), "/a/b"), (("name=systemd",), "/"), ((), "/user.slice/x")]


def test_cgroup_quota_is_the_tightest_on_the_way_up(tmp_path):
    """The locating of cpu.max and cpu.cfs_quota_us, on a sample tree of cgroup files."""
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v2 / "a" / "b").mkdir(parents=True)
    (v2 / "a" / "cpu.max").write_text("150000 100000\n")
    (v2 / "a" / "b" / "cpu.max").write_text("max 100000\n")
    (v1 / "job").mkdir(parents=True)
    (v1 / "job" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "job" / "cpu.cfs_period_us").write_text("100000\n")
    mountinfo = (
        f"41 31 0:38 / {v2} rw - cgroup2 cgroup2 rw\n"
        f"32 31 0:29 / {v1} rw - cgroup cgroup rw,cpu,cpuacct\n"
    )
    mounts = parse_mountinfo(mountinfo)
    quota = cgroup_cpu_quota(mounts, "0::/a/b\n3:cpu,cpuacct:/job\n")
    assert quota is not None
    assert quota.cpus == 1.5
    assert quota.source == f"{v2 / 'a' / 'cpu.max'}: 150000 100000"
    # v1 limits too; the tighter one wins.
    (v1 / "job" / "cpu.cfs_quota_us").write_text("50000\n")
    quota = cgroup_cpu_quota(mounts, "0::/a/b\n3:cpu,cpuacct:/job\n")
    assert quota is not None
    assert quota.cpus == 0.5
    assert quota.source.startswith(str(v1 / "job" / "cpu.cfs_quota_us"))
    # A mount of a cgroup's own subtree (a container's): its root is the process's cgroup.
    mounts = parse_mountinfo(f"41 31 0:38 /a {v2 / 'a'} rw - cgroup2 cgroup2 rw\n")
    quota = cgroup_cpu_quota(mounts, "0::/a\n")
    assert quota is not None
    assert quota.cpus == 1.5
    assert cgroup_cpu_quota(mounts, "") is None


def test_this_machines_cgroup_quota_is_what_the_command_reports(env):
    with open("/proc/self/cgroup") as f:
        quota = cgroup_cpu_quota(read_mounts(), f.read())
    values = findings_of(doctor("--json", env=env))["cpus"]["values"]
    assert values["quota_cpus"] == (quota.cpus if quota is not None else None)


def test_parse_thread_count():
    assert parse_thread_count("8") == 8
    assert parse_thread_count(" 4,2 ") == 4
    assert parse_thread_count("0") is None
    assert parse_thread_count("many") is None
