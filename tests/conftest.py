"""Shared fixtures: pools under each start method, and a guard that fails any test leaving
child processes or library files behind."""

from __future__ import annotations

import glob
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from helpers import mount_tmpfs, unmount
from memmap_pool import MemmapPool

START_METHODS = ["fork", "forkserver", "spawn"]

LEAK_WAIT = 15.0
"""Seconds a test's child processes get to exit after the test; only a leak takes longer."""


def _library_dirs() -> set[str]:
    """The library's private dirs owned by this process or by a process that is gone (a
    child that left them). Dirs of other live processes (another test run) are not ours."""
    bases = {"/dev/shm", tempfile.gettempdir()}
    env = os.environ.get("MEMMAP_POOL_TEMP_DIR")
    if env:
        bases.add(env)
    found: set[str] = set()
    for base in bases:
        for path in glob.glob(os.path.join(base, "memmap-pool-*")):
            try:
                owner = int(os.path.basename(path).split("-")[2])
            except (IndexError, ValueError):
                continue
            if owner == os.getpid() or not psutil.pid_exists(owner):
                found.add(path)
    return found


# multiprocessing starts these once per test session and keeps them: they are not leaks.
_SESSION_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def _children() -> set[int]:
    me = psutil.Process()
    helpers = set()
    for proc in me.children():
        try:
            if any(h in " ".join(proc.cmdline()) for h in _SESSION_HELPERS):
                helpers.add(proc.pid)
        except psutil.Error:
            continue
    found = set()
    for proc in me.children(recursive=True):
        try:
            if proc.pid in helpers or proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        found.add(proc.pid)
    return found


@pytest.fixture(autouse=True)
def no_leftovers():
    """Fail the test if it leaves child processes or memmap-pool temp dirs behind."""
    children_before = _children()
    dirs_before = _library_dirs()
    yield
    deadline = time.monotonic() + LEAK_WAIT
    leaked: set[int] = set()
    while time.monotonic() < deadline:
        leaked = _children() - children_before
        if not leaked:
            break
        time.sleep(0.05)
    extra_dirs = _library_dirs() - dirs_before
    for pid in leaked:  # don't let one leak cascade into every later test
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    assert not leaked, f"test left child processes running: {sorted(leaked)}"
    assert not extra_dirs, f"test left memmap-pool files behind: {sorted(extra_dirs)}"


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    """Each start method in turn: fork, forkserver (Linux default from 3.14) and spawn."""
    return request.param


@pytest.fixture
def pool(start_method: str):
    """A two-worker pool under each start method, shut down after the test."""
    with MemmapPool(2, mp_context=start_method) as p:
        yield p


@pytest.fixture
def fork_pool():
    """A two-worker pool with the cheapest start method, for tests about something else."""
    with MemmapPool(2, mp_context="fork") as p:
        yield p


@pytest.fixture
def tiny_tmpfs() -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted after the test (skips where mounting needs root)."""
    where = mount_tmpfs("1m")
    try:
        yield where
    finally:
        unmount(where)


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted after the test (skips where mounting needs root)."""
    where = mount_tmpfs("4m")
    try:
        yield where
    finally:
        unmount(where)
