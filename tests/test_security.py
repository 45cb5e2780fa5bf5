"""Another local user as the attacker: someone who can write to the directory where the pool
keeps its files (a world-writable temp dir without the sticky bit, a shared project dir).

The attacker is a real unprivileged user (``nobody``), acting through shell commands run
under its uid; the pool is this test process. Where the tests can't act as another user (not
root, or no ``nobody``), they skip and say why.
"""

from __future__ import annotations

import os
import pickle
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import faults
from helpers import BOUND
from memmap_pool import MemmapPool, PrivateDirError
from memmap_pool._privatedir import MARKER, PrivateDir, remove_leftovers
from memmap_pool._protocol import SpecRejected, load_spec

ATTACKER = "nobody"


def _attacker_uid() -> int:
    if os.geteuid() != 0:
        pytest.skip(
            f"acting as another local user needs root (the tests run as uid {os.geteuid()})"
        )
    try:
        return pwd.getpwnam(ATTACKER).pw_uid
    except KeyError:
        pytest.skip(f"there is no {ATTACKER!r} user to act as the attacker")


def as_attacker(*command: str) -> None:
    """Run a shell command as the attacker; fail the test if it fails."""
    _attacker_uid()
    done = subprocess.run(
        ["/bin/sh", "-c", " ".join(command)],
        user=ATTACKER,
        capture_output=True,
        text=True,
        timeout=BOUND,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"the attacker's command failed: {done.stderr}"


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A directory every user may write (mode 0777, no sticky bit), in a parent every user
    may enter."""
    _attacker_uid()
    parent = Path(tempfile.mkdtemp(prefix="mmp-shared-"))
    try:
        parent.chmod(0o755)
        base = parent / "scratch"
        base.mkdir()
        base.chmod(0o777)
        yield base
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def fill(out: np.ndarray, chunk: object) -> None:
    out[:] = 7


# -- the private directory ---------------------------------------------------------------------


def test_a_private_dir_replaced_by_another_user_is_refused(shared_base):
    """Another user who renames the pool's private dir away and makes one of the same name
    gets a PrivateDirError from the pool's next job, which writes nothing into theirs."""
    with MemmapPool(2, mp_context="fork", temp_dir=shared_base) as pool:
        assert (pool.map_chunks(fill, (64,), "int8") == 7).all()
        (mine,) = [p for p in shared_base.iterdir() if p.name.startswith("memmap-pool-")]
        as_attacker(f"mv {mine} {shared_base}/moved && mkdir -m 700 {mine}")
        with pytest.raises(PrivateDirError, match="another file or directory now has its name"):
            pool.map_chunks(fill, (64,), "int8")
        assert os.listdir(mine) == []  # nothing of the pool's went into the attacker's dir
        assert os.stat(mine).st_uid == _attacker_uid()


def test_a_spec_file_of_another_user_is_never_unpickled(shared_base):
    """A worker refuses a spec file another user made, whatever its name and mode: loading
    it would run their code."""
    evil = shared_base / "spec.pkl"
    as_attacker(f"touch {evil} && chmod 600 {evil}")
    os.chmod(evil, 0o666)  # root may write it: the content is what a pickle attack would be
    evil.write_bytes(pickle.dumps(print))
    os.chmod(evil, 0o600)
    with pytest.raises(SpecRejected, match="owned by uid"):
        load_spec(str(evil), os.stat(evil).st_ino)


@pytest.mark.parametrize("tamper", ["symlink", "mode", "owner", "replaced", "removed"])
def test_verify_finds_every_kind_of_tampering(tmp_path, tamper):
    """PrivateDir.verify() refuses the directory once it is a symlink, has another mode or
    owner, is another directory of the same name, or is gone."""
    attacker = _attacker_uid()
    pdir = PrivateDir(str(tmp_path))
    assert pdir.verify() == pdir.path
    path = Path(pdir.path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if tamper == "symlink":
        path.rename(tmp_path / "moved")
        path.symlink_to(elsewhere)
    elif tamper == "mode":
        path.chmod(0o755)
    elif tamper == "owner":
        os.chown(path, attacker, -1)
    elif tamper == "replaced":
        path.rename(tmp_path / "moved")
        path.mkdir(mode=0o700)
    else:
        path.rename(tmp_path / "moved")
    try:
        with pytest.raises(PrivateDirError):
            pdir.verify()
        with pytest.raises(PrivateDirError):
            pdir.create("x.bin")
    finally:
        pdir.remove()
        if path.is_symlink():
            path.unlink()


# -- predictable names --------------------------------------------------------------------------


def test_symlinks_planted_at_guessable_temporary_names_are_not_followed(shared_base, tmp_path):
    """Symlinks another user plants at every temporary name they can guess next to a .npy
    output (and its journal) do not make the pool write through them."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o666)  # writable by the pool's user (root may write anything anyway)
    out = shared_base / "x.npy"
    pid = os.getpid()
    for name in (f"x.npy.{pid}.tmp", f"x.npy.journal.{pid}.tmp", ".x.npy.tmp"):
        as_attacker(f"ln -s {victim} {shared_base / name}")
    with MemmapPool(2, mp_context="fork", temp_dir=tmp_path) as pool:
        result = pool.map_chunks(fill, (4096,), "int8", out=str(out), chunks=1024)
        assert (result == 7).all()
        del result
    assert victim.read_text() == "precious"
    assert (np.load(out) == 7).all()
    links = sorted(p.name for p in shared_base.iterdir() if p.is_symlink())
    assert len(links) == 3  # still there, never replaced or followed


def test_dask_shared_dir_probe_uses_unguessable_names(shared_base, tmp_path):
    """The shared-dir probe a worker writes is never a file another user planted."""
    from memmap_pool._worker_init import probe_dir

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    import socket

    guess = f".memmap-pool-probe-{socket.gethostname()}-{os.getpid()}"
    as_attacker(f"ln -s {victim} {shared_base / guess}")
    _who, error = probe_dir(str(shared_base))
    assert error is None, error
    assert victim.read_text() == "precious"


# -- leftovers ---------------------------------------------------------------------------------


def test_a_directory_renamed_into_a_dead_pools_name_is_not_removed(shared_base):
    """A directory of the pool's user that another user renamed into the name of a dead
    pool's dir (it has no marker) is left alone by the removal of leftovers."""
    important = shared_base / "important"
    important.mkdir(mode=0o700)
    (important / "thesis.tex").write_text("years of work")
    dead = shared_base / "memmap-pool-999999999-abcd1234"
    as_attacker(f"mv {important} {dead}")
    assert remove_leftovers(str(shared_base)) == []
    assert (dead / "thesis.tex").read_text() == "years of work"


HOLDER = """
import sys, time
from memmap_pool._privatedir import PrivateDir
pdir = PrivateDir(sys.argv[1])
print(pdir.path, flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def test_a_live_pools_dir_is_kept_even_when_its_pid_means_nothing_here(tmp_path):
    """A pool in another pid namespace (containers sharing /dev/shm) looks dead by its pid;
    its marker's lock says it is alive, so its dir stays until the lock is released."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        made = Path(holder.stdout.readline().strip())
        # The name a pool of another namespace would have: a pid that is not running here.
        foreign = tmp_path / "memmap-pool-999999999-0123abcd"
        made.rename(foreign)
        assert (foreign / MARKER).exists()
        assert remove_leftovers(str(tmp_path)) == []
        assert foreign.exists()
    finally:
        holder.stdin.close()
        holder.wait(BOUND)
        holder.stdout.close()
    assert remove_leftovers(str(tmp_path)) == [str(foreign)]
    assert not foreign.exists()


def test_private_dirs_are_0700_with_0600_files(tmp_path):
    """The private dir is 0700 whatever the umask, and the files in it are 0600."""
    old = os.umask(0)
    try:
        with MemmapPool(2, mp_context="fork", temp_dir=tmp_path) as pool:
            job = pool.submit_chunks(faults.counting, (16, 4), "int64", chunks=4)
            job.result(timeout=BOUND)
            (pdir,) = [p for p in tmp_path.iterdir() if p.name.startswith("memmap-pool-")]
            assert stat.S_IMODE(pdir.stat().st_mode) == 0o700
            for f in pdir.iterdir():
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        os.umask(old)
