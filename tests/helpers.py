"""Helpers shared by the tests: bounded waits and tmpfs mounts.

Every wait in the suite is bounded by :data:`BOUND`, a time only a deadlock reaches, so a
hang fails its test instead of blocking the run (pytest-timeout is the last resort).
"""

from __future__ import annotations

import gc
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

BOUND = 60.0
"""Seconds any wait in a test may take; only a deadlock reaches it."""

POLL = 0.05
"""Seconds between two looks at a condition."""


def wait_until(condition: Callable[[], object], bound: float = BOUND) -> bool:
    """Poll ``condition`` until it is true or ``bound`` seconds pass; return the last value
    as a bool (so ``assert wait_until(...)`` fails on a timeout)."""
    deadline = time.monotonic() + bound
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def mount_tmpfs(size: str) -> Path:
    """Mount a tmpfs of ``size`` on a new dir; skip the test where mounting isn't allowed."""
    where = Path(tempfile.mkdtemp(prefix="mmp-tmpfs-"))
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here (needs root): {exc}")
    if done.returncode != 0:
        where.rmdir()
        reason = done.stderr.strip() or done.returncode
        pytest.skip(f"cannot mount a tmpfs here (needs root): {reason}")
    return where


def unmount(where: Path) -> None:
    """Unmount a tmpfs of :func:`mount_tmpfs`, and remove its mount point."""
    gc.collect()  # arrays still mapping files of the tmpfs keep it busy
    subprocess.run(["umount", str(where)], capture_output=True, timeout=30, check=False)
    if os.path.ismount(where):  # still busy: detach it; it goes once released
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30, check=False)
    where.rmdir()
