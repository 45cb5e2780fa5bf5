"""The parent is interrupted: Ctrl-C (SIGINT), SIGTERM, or SIGKILL while map_chunks runs.

The parent is a real Python process (a subprocess of the test, in a session of its own). It
prints one JSON line with its pid and its children's once the pool's workers are up, then
runs a slow job whose kernel logs each chunk it starts; the test signals it once chunks are
running. Every process of that session must be gone soon after, and no file left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import faults
from helpers import BOUND
from memmap_pool import MemmapPool

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


PARENT = textwrap.dedent(
    """
    import json, os, sys
    import psutil
    import faults
    from memmap_pool import MemmapPool

    def job_files(base):
        # The files of jobs in the pool's private dirs (the dirs go at shutdown).
        found = []
        for d in os.listdir(base):
            if d.startswith("memmap-pool-"):
                # The dir's own marker stays with the dir; the job's files must go.
                found += [f for f in os.listdir(os.path.join(base, d)) if f != ".memmap-pool"]
        return sorted(found)

    def main():
        method, base, log = sys.argv[1:4]
        with MemmapPool(2, mp_context=method, temp_dir=base) as pool:
            pool.map_chunks(faults.counting, (64, 8), "int64", chunks=8)  # workers up
            kids = [p.pid for p in psutil.Process().children(recursive=True)]
            print(json.dumps({"pid": os.getpid(), "workers": kids}), flush=True)
            try:
                # Each chunk takes far longer than any test: only killing the workers that
                # run them stops the job.
                pool.map_chunks(faults.counting, (400, 512), "int64", chunks=1,
                                kwargs={"log": log, "delay": faults.HANG_SECONDS})
            except BaseException as exc:
                print(json.dumps({"caught": type(exc).__name__, "files": job_files(base)}),
                      flush=True)
                raise
        print(json.dumps({"finished": True}), flush=True)

    if __name__ == "__main__":
        main()
    """
)


class Parent:
    """A parent process running a pool, as a user's script would."""

    def __init__(self, tmp_path: Path, method: str) -> None:
        self.base = tmp_path / "pool-tmp"
        self.base.mkdir()
        self.log = tmp_path / "log"
        script = tmp_path / "parent.py"
        script.write_text(PARENT)
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([TESTS_DIR, *filter(None, [os.environ.get("PYTHONPATH")])]),
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(script), method, str(self.base), str(self.log)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(BOUND)
            pytest.fail(f"the parent failed to start: {self.proc.stderr.read()}")
        info = json.loads(line)
        self.pid: int = info["pid"]
        self.workers: list[int] = info["workers"]
        assert self.workers, "the parent has no worker processes"

    def wait_for_chunks(self, n: int) -> None:
        """Return once ``n`` chunks of the slow job have started."""
        deadline = time.monotonic() + BOUND
        while len(faults.read_log(self.log, "start")) < n:
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "the slow job did not start"
            time.sleep(0.02)

    def finish(self) -> tuple[str, str]:
        try:
            out, err = self.proc.communicate(timeout=BOUND)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"the parent did not exit after the signal:\n{out}\n{err}")
        return out, err

    def session(self) -> list[int]:
        """Live processes of the parent's session (its workers and helpers, orphaned or not)."""
        found = []
        for proc in psutil.process_iter(["status"]):
            try:
                if os.getsid(proc.pid) == self.pid and proc.info["status"] != "zombie":
                    found.append(proc.pid)
            except (ProcessLookupError, PermissionError):
                continue
        return found

    def wait_session_gone(self) -> list[int]:
        deadline = time.monotonic() + BOUND
        while (left := self.session()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:  # don't leave them to later tests
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def private_dirs(self) -> list[str]:
        return sorted(p.name for p in self.base.glob("memmap-pool-*"))


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("method", "how"),
    [("fork", "group"), ("forkserver", "group"), ("fork", "parent")],
    ids=["fork-ctrl-c", "forkserver-ctrl-c", "fork-sigint-to-parent-only"],
)
def test_ctrl_c_stops_the_job_its_workers_and_removes_its_files(tmp_path, method, how):
    """SIGINT (to the process group, as Ctrl-C sends it, or to the parent alone) while
    map_chunks runs: KeyboardInterrupt propagates, no process of the parent's outlives it,
    and the job's files are removed before the exception leaves map_chunks."""
    parent = Parent(tmp_path, method)
    parent.wait_for_chunks(2)
    if how == "group":
        os.killpg(parent.pid, signal.SIGINT)
    else:
        os.kill(parent.pid, signal.SIGINT)
    out, err = parent.finish()
    assert parent.proc.returncode == -signal.SIGINT, err
    assert "KeyboardInterrupt" in err
    caught = events(out)[-1]
    assert caught == {"caught": "KeyboardInterrupt", "files": []}, err
    assert parent.wait_session_gone() == []
    assert parent.private_dirs() == []
    # The job stopped: far fewer chunks started than the 400 it had.
    assert len(faults.read_log(parent.log, "start")) < 100


@pytest.mark.timeout(90)
def test_sigterm_stops_the_job_its_workers_and_removes_its_files(tmp_path):
    """SIGTERM to the parent while map_chunks runs: SystemExit(143) propagates, every
    worker is gone, and the job's files are removed."""
    parent = Parent(tmp_path, "fork")
    parent.wait_for_chunks(2)
    os.kill(parent.pid, signal.SIGTERM)
    out, err = parent.finish()
    assert parent.proc.returncode == 128 + signal.SIGTERM, err
    assert events(out)[-1] == {"caught": "SystemExit", "files": []}, err
    assert parent.wait_session_gone() == []
    assert parent.private_dirs() == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_workers_exit_when_their_parent_is_killed(tmp_path, method):
    """A parent SIGKILLed mid-job can clean nothing up: its workers notice and exit on their
    own. Its files stay until the next pool in that temp dir removes them."""
    parent = Parent(tmp_path, method)
    parent.wait_for_chunks(2)
    os.kill(parent.pid, signal.SIGKILL)
    # finish() reads the parent's pipes to their end before reaping it, and the workers
    # hold those pipes too: until they exit, the dead parent is a zombie, which the
    # workers must recognise as dead (a forkserver's workers are not its children).
    parent.finish()
    assert parent.proc.returncode == -signal.SIGKILL
    assert parent.wait_session_gone() == []
    for pid in parent.workers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    # The dead parent's files are still there: nobody could remove them yet.
    (left,) = parent.private_dirs()
    assert left.startswith(f"memmap-pool-{parent.pid}-")
    shutil.rmtree(parent.base)


@pytest.mark.timeout(90)
def test_new_pool_removes_a_dead_parents_files_but_not_a_live_ones(tmp_path):
    """A pool starting in a temp dir removes the private dir of a parent that was killed,
    and leaves alone the dir of a process that is alive."""
    parent = Parent(tmp_path, "fork")
    parent.wait_for_chunks(2)
    os.kill(parent.pid, signal.SIGKILL)
    parent.finish()
    assert parent.wait_session_gone() == []
    (dead_dir,) = parent.private_dirs()
    assert os.listdir(parent.base / dead_dir)  # the killed job's output, status, spec

    holder = (
        "import sys, time\n"
        "from memmap_pool._privatedir import PrivateDir\n"
        "pdir = PrivateDir(sys.argv[1])\n"
        "with open(pdir.create('out-live.bin'), 'wb') as f: f.write(b'still in use')\n"
        "print(pdir.path, flush=True)\n"
        "time.sleep(600)\n"
    )
    sleeper = subprocess.Popen(
        [sys.executable, "-c", holder, str(parent.base)], stdout=subprocess.PIPE, text=True
    )
    try:
        live_dir = parent.base / os.path.basename(sleeper.stdout.readline().strip())
        with MemmapPool(2, mp_context="fork", temp_dir=parent.base) as pool:
            result = pool.map_chunks(faults.counting, (16, 16), "int64", chunks=4)
            assert np.array_equal(result, faults.expected((16, 16)))
            del result
            names = parent.private_dirs()
            assert dead_dir not in names
            assert live_dir.name in names
        assert (live_dir / "out-live.bin").read_bytes() == b"still in use"
        assert parent.private_dirs() == [live_dir.name]  # the pool's own dir went too
    finally:
        sleeper.kill()
        sleeper.wait()
        sleeper.stdout.close()
        shutil.rmtree(parent.base, ignore_errors=True)


@pytest.mark.timeout(60)
def test_pool_shuts_down_promptly_after_an_interrupted_job(fork_pool, tmp_path):
    """A KeyboardInterrupt in the thread waiting in map_chunks kills the workers stuck in the
    job's chunks; the pool then runs the next job and shuts down without hanging."""
    log = str(tmp_path / "log")

    def interrupt_soon() -> None:
        deadline = time.monotonic() + BOUND
        while not faults.read_log(log, "start") and time.monotonic() < deadline:
            time.sleep(0.01)
        signal.pthread_kill(main_thread, signal.SIGINT)

    main_thread = threading.main_thread().ident
    assert threading.current_thread() is threading.main_thread()
    helper = threading.Thread(target=interrupt_soon)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            fork_pool.map_chunks(
                faults.counting,
                (200, 64),
                "int64",
                chunks=1,
                kwargs={"log": log, "delay": faults.HANG_SECONDS},
            )
    finally:
        helper.join()
    assert len(faults.read_log(log, "start")) < 50
    check = fork_pool.map_chunks(faults.counting, (16, 16), "int64", chunks=4)
    assert np.array_equal(check, faults.expected((16, 16)))
