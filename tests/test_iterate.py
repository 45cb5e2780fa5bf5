"""``iterate``: time-stepping on a state that stays in place: equal to a serial loop bit for
bit, ``initial`` untouched, the state mapped once per worker for the whole run, resume after a
SIGKILL at any moment identical to an uninterrupted run, and the errors before any work."""

from __future__ import annotations

import glob
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import faults
from helpers import BOUND
from memmap_pool import JournalMismatchError, MemmapPool
from memmap_pool._stepjournal import StepJournal, StepRecord

ALPHA = 0.1


def laplacian(u):
    return -4 * u[1:-1, 1:-1] + u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:]


def heat(out, chunk, u, alpha):
    """One explicit step of the heat equation; ``u`` has a halo of one."""
    out[:] = u[chunk.interior(0)] + alpha * laplacian(u)


def serial_heat(u0, steps, alpha=ALPHA):
    """The reference: the same arithmetic on the whole array, step after step."""
    u = np.array(u0)
    for _ in range(steps):
        padded = np.pad(u, 1, mode="edge")
        u = padded[1:-1, 1:-1] + alpha * laplacian(padded)
    return u


U0 = np.random.default_rng(21).random((96, 70))


@pytest.mark.parametrize("chunks", [None, 16, (25, 30), (3, 70)])
def test_heat_equation_equals_a_serial_loop_bit_for_bit(fork_pool, chunks):
    """Any chunking gives the serial loop's bits; initial is not modified."""
    initial = U0.copy()
    final = fork_pool.iterate(
        heat, initial, 15, depth=1, boundary="edge", args=(ALPHA,), chunks=chunks
    )
    assert np.array_equal(final, serial_heat(U0, 15))
    assert np.array_equal(initial, U0)
    assert not final.flags.writeable


def box_blur(out, chunk, u):
    """Any depth, any rank: each element becomes the mean of its window (a stencil that
    reads every element of the window, the border included)."""
    inner = chunk.interior(0)
    depth = [s.start for s in inner]
    acc = np.zeros(out.shape)
    offsets = np.ndindex(*(2 * d + 1 for d in depth))
    for offset in offsets:
        acc += u[tuple(slice(o, o + n) for o, n in zip(offset, out.shape))]
    out[...] = acc / math.prod(2 * d + 1 for d in depth)


def serial_blur(u0, steps, depth, boundary):
    """The reference: np.pad of the whole state at each step (a constant boundary as
    np.pad's "constant"; "none" clips the window at the edges, so the state keeps its size
    only with depth 0 on clipped axes: not used here)."""
    u = np.array(u0, dtype=np.float64)
    pads = [(d, d) for d in depth]
    for _ in range(steps):
        if isinstance(boundary, str):
            padded = np.pad(u, pads, mode=boundary)
        else:
            padded = np.pad(u, pads, mode="constant", constant_values=boundary)
        acc = np.zeros(u.shape)
        for offset in np.ndindex(*(2 * d + 1 for d in depth)):
            acc += padded[tuple(slice(o, o + n) for o, n in zip(offset, u.shape))]
        u = acc / math.prod(2 * d + 1 for d in depth)
    return u


@pytest.mark.parametrize("boundary", ["edge", "reflect", "symmetric", "wrap", 2.5])
@pytest.mark.parametrize(
    ("shape", "depth", "chunks"),
    [
        ((40, 23), (1, 1), 7),  # rows; the unsplit axis padded whole
        ((40, 23), (2, 3), (9, 5)),  # blocks: every axis split
        ((5, 23), (7, 2), (2, 23)),  # deeper than the axis: np.pad's periodic values
        ((6, 7, 8), (1, 2, 1), (2, 3, 8)),  # three axes, two split
    ],
)
def test_every_boundary_and_chunking_equals_np_pad_step_after_step(
    fork_pool, boundary, shape, depth, chunks
):
    """The state's border follows the boundary (np.pad's values, however deep), whatever
    axes the chunks split, at every step."""
    u0 = np.random.default_rng(5).random(shape)
    final = fork_pool.iterate(box_blur, u0, 5, depth=depth, boundary=boundary, chunks=chunks)
    assert np.allclose(final, serial_blur(u0, 5, depth, boundary), rtol=0, atol=1e-12)


def window_owner(out, chunk, u, log):
    """Record whether the window of the previous state owns its memory (a copy)."""
    with open(log, "a") as f:
        f.write(f"{chunk.step} {int(u.flags.owndata or u.base is None)}\n")
    out[...] = u[chunk.interior(0)]


def test_windows_of_a_padded_state_are_views_after_the_first_step(fork_pool, tmp_path):
    """Every window that reaches beyond the edges is a view of the padded buffer from step 2
    on (step 1 reads the caller's initial state, which has no border)."""
    log = tmp_path / "log"
    fork_pool.iterate(
        window_owner, U0, 4, depth=2, boundary="reflect", args=(str(log),), chunks=(16, 35)
    )
    seen = [tuple(map(int, line.split())) for line in log.read_text().split("\n") if line]
    assert sorted({step for step, _ in seen}) == [1, 2, 3, 4]
    assert all(copied == 0 for step, copied in seen if step >= 2), seen
    assert any(copied == 1 for step, copied in seen if step == 1)


def test_a_npy_run_reads_views_of_its_padded_siblings_after_the_first_step(fork_pool, tmp_path):
    """With out=, the buffers are padded .npy siblings: from step 2 on, windows are views."""
    log = tmp_path / "log"
    out = str(tmp_path / "s.npy")
    fork_pool.iterate(
        window_owner, U0, 4, depth=1, boundary="wrap", args=(str(log),), chunks=16, out=out
    )
    seen = [tuple(map(int, line.split())) for line in log.read_text().split("\n") if line]
    assert all(copied == 0 for step, copied in seen if step >= 2), seen
    assert np.array_equal(np.load(out), U0)
    assert sorted(os.listdir(tmp_path)) == ["log", "s.npy", "s.npy.journal"]


def failing_at(out, chunk, u, alpha, flag):
    """A step that reads its whole window (any depth, any boundary), and raises at step 4
    while ``flag`` exists."""
    if chunk.step == 4 and os.path.exists(flag):
        raise RuntimeError("step 4 fails")
    inner = u[chunk.interior(0)]
    out[:] = inner + alpha * (u.mean() - inner)


@pytest.mark.parametrize(("depth", "boundary"), [(1, "edge"), (2, "wrap"), (0, "none")])
def test_a_run_that_failed_mid_way_resumes_from_its_sibling(fork_pool, tmp_path, depth, boundary):
    """A kernel error at step 4 leaves step 3 in a sibling buffer, named by the journal; a
    resume continues from it to the uninterrupted run's bits, and leaves only out and the
    journal."""
    flag = tmp_path / "flag"
    flag.touch()
    out = str(tmp_path / "s.npy")
    kw = {"depth": depth, "boundary": boundary, "chunks": 24, "out": out}
    with pytest.raises(RuntimeError, match="step 4 fails"):
        fork_pool.iterate(failing_at, U0, 7, args=(ALPHA, str(flag)), **kw)
    record = StepJournal.load(out + ".journal").record
    assert record.step == 3
    assert record.state in ("a", "b")
    assert os.path.exists(out + "." + record.state)
    flag.unlink()
    final = fork_pool.iterate(failing_at, U0, 7, args=(ALPHA, str(flag)), resume=True, **kw)
    flag_never = str(tmp_path / "never")
    want = fork_pool.iterate(
        failing_at, U0, 7, depth=depth, boundary=boundary, args=(ALPHA, flag_never), chunks=24
    )
    assert np.array_equal(final, want)
    assert sorted(os.listdir(tmp_path)) == ["s.npy", "s.npy.journal"]


def test_a_resume_with_another_depth_is_refused(fork_pool, tmp_path):
    """A sibling padded for depth 1 can't be the state of a run with depth 2."""
    flag = tmp_path / "flag"
    flag.touch()
    out = str(tmp_path / "s.npy")
    with pytest.raises(RuntimeError, match="step 4 fails"):
        fork_pool.iterate(
            failing_at, U0, 7, depth=1, boundary="edge", args=(ALPHA, str(flag)), out=out
        )
    with pytest.raises(JournalMismatchError, match="depth and boundary"):
        fork_pool.iterate(box_blur, U0, 7, depth=2, boundary="edge", out=out, resume=True)


def test_a_temporary_state_and_a_npy_out_give_the_same_bits(fork_pool, tmp_path):
    """The padded temporary buffers and the .npy state (windows copied) agree exactly."""
    kw = {"depth": 1, "boundary": "wrap", "args": (ALPHA,), "chunks": (12, 35)}
    temporary = fork_pool.iterate(heat, U0, 9, **kw)
    out = str(tmp_path / "s.npy")
    fork_pool.iterate(heat, U0, 9, out=out, **kw)
    assert temporary.shape == U0.shape
    assert np.array_equal(temporary, np.load(out))


def test_a_npy_initial_is_untouched_and_out_holds_the_final_state(fork_pool, tmp_path):
    """initial given by path stays as it was; out= holds the final state; the step journal
    stays beside it and nothing else does."""
    np.save(tmp_path / "u0.npy", U0)
    before = (tmp_path / "u0.npy").read_bytes()
    out = tmp_path / "state.npy"
    for steps in (6, 7):  # the last step in either buffer
        final = fork_pool.iterate(
            heat, str(tmp_path / "u0.npy"), steps, depth=1, boundary="edge", args=(ALPHA,),
            out=str(out),
        )  # fmt: skip
        assert os.path.samefile(final.filename, out)
        assert np.array_equal(np.load(out), serial_heat(U0, steps))
        del final
    assert (tmp_path / "u0.npy").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["state.npy", "state.npy.journal", "u0.npy"]


def test_the_kernel_sees_the_step_number_and_a_read_only_previous_state(fork_pool):
    """chunk.step runs from 1 to steps; prev can't be written; other inputs come after it."""

    def count(out, chunk, prev, ones):
        assert not prev.flags.writeable
        assert prev.shape == out.shape  # depth 0: the region itself
        out[:] = prev + ones * chunk.step

    final = fork_pool.iterate(count, np.zeros(1000), 12, inputs=[np.ones(1000)], chunks=64)
    assert np.all(final == sum(range(1, 13)))


def test_the_state_stays_mapped_and_no_file_is_made_per_step(tmp_path):
    """Each worker maps the two buffers once for the run (their addresses never change from
    step to step), and the pool's files are the same at every step."""
    temp = tmp_path / "pool-temp"
    temp.mkdir()
    log = tmp_path / "log"

    def observe(out, chunk, prev, log):
        region_start = sum(s.start * st for s, st in zip(chunk.slices, out.strides))
        base = out.__array_interface__["data"][0] - region_start
        files = sorted(os.path.basename(p) for p in glob.glob(str(temp / "memmap-pool-*/*")))
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {chunk.step} {base} {','.join(files)}\n")
        out[:] = prev + 1

    with MemmapPool(2, mp_context="fork", temp_dir=temp) as pool:
        final = pool.iterate(observe, np.zeros((64, 512)), 9, args=(str(log),), chunks=8)
        assert np.all(final == 9)
    rows = [line.split(" ") for line in log.read_text().splitlines()]
    assert {int(step) for _, step, _, _ in rows} == set(range(1, 10))
    for pid in {pid for pid, _, _, _ in rows}:
        bases = {base for p, _, base, _ in rows if p == pid}
        assert len(bases) <= 2, "a worker mapped a state buffer more than once"
    assert len({files for _, _, _, files in rows}) == 1


def test_a_worker_death_during_a_step_is_survived(tmp_path):
    """A worker killed in step 3 is replaced, its chunks rerun: the same final state."""
    marker = str(tmp_path / "died")

    def fragile(out, chunk, u, alpha, marker):
        if chunk.step == 3 and chunk.index == 2 and faults.first_time(marker):
            os._exit(3)
        heat(out, chunk, u, alpha)

    with MemmapPool(2, mp_context="fork", retries=2) as pool:
        job = pool.submit_iterate(
            fragile, U0, 5, depth=1, boundary="edge", args=(ALPHA, marker), chunks=16
        )
        final = job.result(timeout=BOUND)
        assert job.stats.retries >= 1
    assert np.array_equal(final, serial_heat(U0, 5))


def test_resume_with_more_steps_continues_and_with_fewer_is_refused(fork_pool, tmp_path):
    """A finished run resumed with a larger count computes only the new steps; fewer steps
    than already done is a JournalMismatchError, as is a state of another shape."""
    out = str(tmp_path / "s.npy")
    run = {"depth": 1, "boundary": "edge", "args": (ALPHA,), "out": out}
    fork_pool.iterate(heat, U0, 4, **run)
    log = tmp_path / "steps"

    def logged(out, chunk, u, alpha):
        with open(log, "a") as f:
            f.write(f"{chunk.step}\n")
        heat(out, chunk, u, alpha)

    final = fork_pool.iterate(logged, U0, 9, resume=True, **run)
    assert np.array_equal(final, serial_heat(U0, 9))
    assert {int(s) for s in log.read_text().split()} == {5, 6, 7, 8, 9}
    del final
    with pytest.raises(JournalMismatchError, match="holds step 9 already"):
        fork_pool.iterate(heat, U0, 8, resume=True, **run)
    with pytest.raises(JournalMismatchError, match="is of a state"):
        fork_pool.iterate(heat, U0[:50], 12, resume=True, **run)
    # Resuming a finished run with its own count runs nothing and returns the state.
    again = fork_pool.iterate(logged, U0, 9, resume=True, **run)
    assert np.array_equal(again, serial_heat(U0, 9))
    assert len(log.read_text().split()) == 5


def test_resume_of_a_npy_that_is_not_an_iterate_state_is_refused(fork_pool, tmp_path):
    """An existing out= without a step journal is not silently overwritten by a resume."""
    out = tmp_path / "mine.npy"
    np.save(out, U0)
    with pytest.raises(JournalMismatchError, match="no step journal"):
        fork_pool.iterate(heat, U0, 3, depth=1, args=(ALPHA,), out=str(out), resume=True)
    assert np.array_equal(np.load(out), U0)


SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from memmap_pool import MemmapPool

    def laplacian(u):
        return -4 * u[1:-1, 1:-1] + u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:]

    def slow_heat(out, chunk, u, alpha):
        time.sleep(0.005)
        out[:] = u[chunk.interior(0)] + alpha * laplacian(u)

    if __name__ == "__main__":
        out, steps, checkpoint = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        u0 = np.random.default_rng(21).random((96, 70))
        with MemmapPool(2, mp_context="fork") as pool:
            pool.iterate(slow_heat, u0, steps, depth=1, boundary="edge", args=(0.1,),
                         out=out, resume=True, checkpoint=checkpoint, chunks=12)
        print("done")
    """
)


def _journal_step(path: str) -> int:
    """The step the run's journal records, or -1 before it holds one."""
    try:
        return StepJournal.load(path).record.step
    except (OSError, JournalMismatchError):
        return -1


@pytest.mark.timeout(180)
@pytest.mark.parametrize("checkpoint", [1, 3])
def test_a_parent_sigkilled_at_any_moment_resumes_to_the_same_final_state(tmp_path, checkpoint):
    """SIGKILL the parent at random moments of the run, run it again with resume=True until it
    finishes: the final state is the uninterrupted run's, bit for bit.

    Each kill waits for the run to get a random number of steps further than where the attempt
    started (read from its journal), then a random few milliseconds more: the kills land
    mid-run however fast or slow the machine is."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = str(tmp_path / "state.npy")
    journal_path = out + ".journal"
    steps = 60
    env = dict(os.environ, MEMMAP_POOL_TEMP_DIR=str(tmp_path))
    rng = np.random.default_rng(checkpoint)
    kills = 0
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        start_step = _journal_step(journal_path)
        proc = subprocess.Popen(
            [sys.executable, str(script), out, str(steps), str(checkpoint)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        if kills < 6:
            target = start_step + int(rng.integers(1, 8))
            while proc.poll() is None and time.monotonic() < deadline:
                if _journal_step(journal_path) >= target:
                    time.sleep(float(rng.uniform(0.0, 0.03)))
                    break
                time.sleep(0.002)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        stdout, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:
            assert stdout.strip() == "done", stderr
            break
        assert proc.returncode == -signal.SIGKILL, stderr
    else:
        pytest.fail("the run did not finish")
    assert kills >= 2, "the run finished before it could be interrupted twice"
    assert np.array_equal(np.load(out), serial_heat(U0, steps))
    journal = StepJournal.load(journal_path)
    assert (journal.record.step, journal.record.state) == (steps, "out")


def test_the_step_journal_survives_a_torn_record(tmp_path):
    """The two slots alternate: damage to the newest leaves the one before it."""
    path = str(tmp_path / "j")
    journal = StepJournal.create(path, {"shape": [2]}, StepRecord(0, "initial"))
    journal.write(StepRecord(1, "out"), durable=True)
    journal.write(StepRecord(2, "alt"), durable=False)
    journal.close()
    assert StepJournal.load(path).record.step == 2
    newest_slot = 1 + StepJournal.load(path).record.seq % 2
    with open(path, "r+b") as f:
        f.seek(4096 * newest_slot + 10)
        f.write(b"garbage")
    record = StepJournal.load(path).record
    assert (record.step, record.state, record.durable) == (1, "out", True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, r"steps must be a positive int \(got 0\)"),
        ({"steps": 2.5}, ValueError, "steps must be a positive int"),
        ({"out": "x.txt"}, ValueError, "ending in .npy"),
        ({"out": np.zeros(3)}, TypeError, "iterate's out must be a .npy path or None"),
        ({"resume": True}, ValueError, "resume=True needs out="),
        ({"checkpoint": 2}, ValueError, "checkpoint= needs out="),
        ({"out": "o.npy", "checkpoint": 0}, ValueError, "checkpoint must be a positive int"),
        ({"depth": -1}, ValueError, "Halo depth must be a non-negative int"),
        ({"boundary": "mirror"}, ValueError, "Halo boundary must be one of"),
        ({"fn": lambda out, chunk: None}, TypeError, "can't be called"),
    ],
)
def test_bad_calls_are_refused_before_any_work(fork_pool, tmp_path, kwargs, error, match):
    """Each mistake is an error at the call, and nothing is created."""
    os.chdir(tmp_path)
    call = {"fn": heat, "steps": 3, "args": (ALPHA,), "depth": 1, **kwargs}
    fn, steps = call.pop("fn"), call.pop("steps")
    with pytest.raises(error, match=match):
        fork_pool.iterate(fn, U0, steps, **call)
    assert os.listdir(tmp_path) == []


def test_out_may_not_be_the_initial_state(fork_pool, tmp_path):
    """The run would overwrite its own initial state."""
    path = tmp_path / "u.npy"
    np.save(path, U0)
    with pytest.raises(ValueError, match="is also an input"):
        fork_pool.iterate(heat, str(path), 2, depth=1, args=(ALPHA,), out=str(path))


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_iterate_under_other_start_methods(start_method):
    """Kernels sent by value; the state stepped the same way."""
    with MemmapPool(2, mp_context=start_method) as pool:
        final = pool.iterate(
            lambda out, c, u: heat(out, c, u, ALPHA), U0, 4, depth=1, boundary="edge"
        )
    assert np.array_equal(final, serial_heat(U0, 4))
