"""The dispatcher's decisions, driven step by step on a fake backend and clock: batch sizes,
fairness, completion, failures, blame after a lost worker, timeouts, cancel and shutdown."""

from __future__ import annotations

import math
import os
import pickle
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
from fakes import (
    CLUSTER,
    USER_EXECUTOR,
    FakeFiles,
    Rig,
    WorkerLost,
    files_of,
    kernel_failure,
    status_of,
)

from memmap_pool._dispatch import (
    BATCHES_PER_WORKER,
    MAX_BATCH_CHUNKS,
    TARGET_BATCH_SECONDS,
    TICK,
)
from memmap_pool._protocol import ChunkState
from memmap_pool._run import Run
from memmap_pool._worker import run_batch
from memmap_pool.errors import ChunkTimeoutError, KernelError, WorkerCrashedError

# -- batch sizes and in-flight cap ---------------------------------------------------------------


def test_the_first_batches_of_a_job_carry_one_chunk_each():
    """Until a chunk's time is measured, every batch sent holds a single chunk."""
    rig = Rig(n_workers=2)
    rig.add(FakeFiles(100))
    sizes = [len(s.indices) for s in rig.backend.sent]
    assert sizes == [1] * (2 * BATCHES_PER_WORKER)
    assert rig.backend.sent[0].indices == [0]


def test_batches_go_to_run_batch_with_the_jobs_spec_identity():
    """Each batch names the job's spec path, inode and token, for the worker's run_batch."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(4))
    sent = rig.backend.sent[0]
    assert sent.fn is run_batch
    files = files_of(run)
    assert (sent.batch.spec_path, sent.batch.spec_inode, sent.batch.token) == (
        files.spec_path,
        files.spec_inode,
        files.token,
    )


@pytest.mark.parametrize("seconds", [0.002, 0.0007, 0.01])
def test_later_batches_carry_about_the_target_time_of_chunks(seconds):
    """Once a chunk's time is known, a batch holds TARGET_BATCH_SECONDS of chunks."""
    rig = Rig(n_workers=1)
    rig.add(FakeFiles(10_000))
    rig.pending()[0].succeed(seconds=seconds)
    rig.step()
    assert len(rig.backend.sent[-1].indices) == int(TARGET_BATCH_SECONDS / seconds)


def test_the_chunk_time_estimate_follows_new_measurements():
    """A slower batch shrinks the next batches; the estimate moves halfway each time."""
    rig = Rig(n_workers=1)
    rig.add(FakeFiles(10_000))
    rig.pending()[0].succeed(seconds=0.001)
    rig.step()
    rig.pending()[0].succeed(seconds=0.003)  # the other single-chunk batch
    rig.step()
    assert len(rig.backend.sent[-1].indices) == int(TARGET_BATCH_SECONDS / 0.002)


def test_batches_near_the_end_hold_a_share_of_what_is_left_per_batch_slot():
    """With fast chunks, a batch holds at most remaining / (workers * BATCHES_PER_WORKER)."""
    workers, count = 2, 40
    rig = Rig(n_workers=workers)
    run = rig.add(FakeFiles(count))
    slots = workers * BATCHES_PER_WORKER
    rig.pending()[0].succeed(seconds=1e-6)
    remaining = run.remaining()
    rig.step()
    assert len(rig.backend.sent[-1].indices) == math.ceil(remaining / slots)
    # The tail keeps shrinking towards single chunks.
    rig.finish_all()
    sizes = [len(s.indices) for s in rig.backend.sent[slots:]]
    assert sizes[-1] == 1
    assert max(sizes) == sizes[0]
    assert sum(len(s.indices) for s in rig.backend.sent) == count


def test_a_batch_never_holds_more_than_max_batch_chunks():
    """However fast the chunks (even timed at zero), a batch holds at most MAX_BATCH_CHUNKS."""
    rig = Rig(n_workers=1)
    rig.add(FakeFiles(100 * MAX_BATCH_CHUNKS, status=False))
    rig.pending()[0].succeed(seconds=0.0)
    rig.step()
    assert len(rig.backend.sent[-1].indices) == MAX_BATCH_CHUNKS


@pytest.mark.parametrize("workers", [1, 3])
def test_batches_in_flight_are_capped_at_batches_per_worker_times_workers(workers):
    """No more than n_workers * BATCHES_PER_WORKER batches are in flight at once."""
    rig = Rig(n_workers=workers)
    rig.add(FakeFiles(50))
    cap = workers * BATCHES_PER_WORKER
    rig.step()
    assert len(rig.pending()) == cap
    rig.pending()[0].succeed()
    rig.step()
    assert len(rig.pending()) == cap
    assert len(rig.backend.sent) == cap + 1


# -- fairness ------------------------------------------------------------------------------------


def test_two_jobs_take_turns_for_batch_slots():
    """Two running jobs get batches in alternation (round robin)."""
    rig = Rig(n_workers=2)
    a = rig.run(FakeFiles(30))
    b = rig.run(FakeFiles(30))
    rig.dispatcher.add(a)
    rig.dispatcher.add(b)
    rig.step()
    for _ in range(12):
        rig.pending()[0].succeed()
        rig.step()
    tokens = [s.token for s in rig.backend.sent]
    assert tokens[:16] == [a.spec.token, b.spec.token] * 8


def test_a_job_added_later_gets_a_slot_within_one_round():
    """A job added while another fills every slot gets one of the next two slots that free."""
    rig = Rig(n_workers=1)
    first = rig.add(FakeFiles(100))
    second = rig.add(FakeFiles(5))
    assert not rig.pending(second)
    before = len(rig.backend.sent)
    for _ in range(2):
        rig.pending(first)[0].succeed()
        rig.step()
    assert second.spec.token in [s.token for s in rig.backend.sent[before:]]


# -- completion ----------------------------------------------------------------------------------


def test_a_job_completes_with_its_first_output_once_every_chunk_is_done():
    """All chunks reported done: the job's result is the files' first output, cleaned up once."""
    rig = Rig(n_workers=2)
    run = rig.add(FakeFiles(6))
    files = files_of(run)
    rig.finish_all()
    assert run.job.result(timeout=0) is files.results[0]
    assert files.cleanups == [True]
    assert run.finalized.is_set()
    for _ in range(3):
        rig.tick()
    assert files.cleanups == [True]
    assert run.job.stats.chunks_done == 6


def test_a_job_of_several_outputs_returns_them_all():
    """A run that is not single_output returns the files' whole result tuple."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(3, n_outputs=2), single_output=False)
    rig.finish_all()
    assert run.job.result(timeout=0) == files_of(run).results


def test_a_job_is_not_complete_while_a_chunk_is_missing():
    """A job whose chunks are all done but one is still running."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(3))
    rig.pending()[0].succeed()
    rig.step()
    assert not run.job.done()
    assert files_of(run).cleanups == []


def test_chunks_a_resume_found_done_are_never_sent():
    """Only the chunks not done already are sent, and the job counts the others as done."""
    rig = Rig(n_workers=2)
    run = rig.add(FakeFiles(10, done=[0, 1, 2, 5, 9]))
    rig.finish_all()
    sent = sorted(i for s in rig.backend.sent for i in s.indices)
    assert sent == [3, 4, 6, 7, 8]
    assert run.job.result(timeout=0) is files_of(run).results[0]
    assert run.job.stats.chunks_resumed == 5


def test_a_job_a_resume_found_complete_finishes_without_a_batch():
    """A job whose chunks are all done already completes as soon as it is added."""
    rig = Rig(n_workers=2)
    run = rig.add(FakeFiles(4, done=[0, 1, 2, 3]))
    assert rig.backend.sent == []
    assert run.job.result(timeout=0) is files_of(run).results[0]
    assert files_of(run).cleanups == [True]


def test_chunk_results_reach_the_job():
    """The pickled values a batch returns per chunk end up in the job's chunk_results()."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(2))
    for sent in rig.pending():
        i = sent.indices[0]
        sent.succeed(results={i: pickle.dumps(i * 10)})
    rig.step()
    assert run.job.chunk_results(timeout=0) == [0, 10]


def test_a_successful_job_removes_its_journal(tmp_path):
    """Chunks done are journaled; once the job succeeds the journal file goes."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(3, journal_dir=tmp_path))
    journal = files_of(run).journal
    assert journal is not None
    rig.pending()[0].succeed()
    rig.step()
    assert journal.done.tolist() == [1, 0, 0]
    rig.finish_all()
    assert not (tmp_path / f"{run.spec.token}.journal").exists()


# -- kernel failures -----------------------------------------------------------------------------


def _failing_job(rig: Rig, exc: BaseException | None):
    run = rig.add(FakeFiles(8))
    status = status_of(run)
    status.start(1, 101, rig.clock())
    batch = next(s for s in rig.pending() if s.indices == [1])
    batch.fail(kernel_failure(1, exc, "[1:2]"))
    rig.step()
    return run


def test_a_kernel_exception_fails_the_job_with_its_own_type_and_names_the_chunk():
    """The job raises the kernel's exception type, with a note naming the chunk."""
    rig = Rig(n_workers=2)
    run = _failing_job(rig, ValueError("bad value"))
    exc = run.job.exception(timeout=0)
    assert type(exc) is ValueError
    assert str(exc) == "bad value"
    assert any("chunk 1 (region [1:2]) of 8" in note for note in exc.__notes__)
    assert "in the kernel" in str(exc.__cause__)


def test_a_kernel_failure_raises_the_cancel_flag_and_stops_sending_the_job():
    """After a kernel failure the cancel flag is up and no other batch of the job is sent."""
    rig = Rig(n_workers=2)
    run = _failing_job(rig, ValueError("bad value"))
    assert status_of(run).cancelled
    sent = len(rig.backend.sent)
    for batch in rig.pending():
        batch.succeed(done=[])  # the workers saw the flag
    rig.step()
    rig.tick()
    assert len(rig.backend.sent) == sent


def test_a_failed_chunk_is_no_longer_marked_running():
    """The failed chunk's state goes back to pending, so that its pid is not taken for it."""
    rig = Rig(n_workers=2)
    run = _failing_job(rig, ValueError("bad value"))
    assert status_of(run).state(1) is ChunkState.PENDING


def test_a_failed_job_is_cleaned_up_once_its_batches_in_flight_are_back():
    """The failed job's files are removed (as failed) only once no batch of it is in flight."""
    rig = Rig(n_workers=2)
    run = _failing_job(rig, ValueError("bad value"))
    files = files_of(run)
    others = rig.pending()
    assert others
    assert files.cleanups == []
    for batch in others:
        batch.succeed(done=[])
    rig.step()
    assert files.cleanups == [False]
    assert run.finalized.is_set()


def test_a_kernel_exception_that_could_not_be_pickled_becomes_a_kernel_error():
    """Without the pickled exception, the job raises KernelError naming the type and chunk."""
    rig = Rig(n_workers=2)
    run = _failing_job(rig, None)
    exc = run.job.exception(timeout=0)
    assert isinstance(exc, KernelError)
    assert "Unpicklable" in str(exc)
    assert "chunk 1" in str(exc)


def test_a_backend_that_refuses_a_batch_fails_the_job_with_its_error():
    """An error from submit() that is not a worker loss fails the job with that error."""
    rig = Rig(n_workers=1)
    rig.backend.submit_errors = [RuntimeError("scheduler gone")]
    run = rig.add(FakeFiles(3))
    exc = run.job.exception(timeout=0)
    assert isinstance(exc, RuntimeError)
    assert str(exc) == "scheduler gone"
    assert files_of(run).cleanups == [False]


def test_a_pool_found_broken_at_submit_is_replaced_and_the_batch_sent_again():
    """A worker loss raised by submit() replaces the workers and the batch goes out again."""
    rig = Rig(n_workers=1)
    rig.backend.submit_errors = [BrokenProcessPool("broken")]
    run = rig.add(FakeFiles(3))
    assert rig.backend.recovered == [0]
    assert rig.backend.sent == []  # sent again at the next step, not in a loop in this one
    rig.dispatcher.step()
    assert rig.backend.sent[0].indices == [0]
    assert not run.job.done()
    rig.finish_all()
    assert run.job.result(timeout=0) is files_of(run).results[0]


def test_a_backend_broken_at_every_submit_is_recovered_at_most_once_per_step():
    """A backend that raises a worker loss at each submit() is not retried within one step."""
    rig = Rig(n_workers=1)
    rig.backend.submit_errors = [BrokenProcessPool("broken")] * 50
    rig.add(FakeFiles(3))
    assert len(rig.backend.recovered) <= 1


# -- a lost worker, with a status file -----------------------------------------------------------


def _broken_pool(retries: int = 2):
    """Four single-chunk batches in flight when the pool breaks: chunk 0 running in the
    worker that died (SIGKILL), chunk 1 done but not reported, chunk 2 running in a worker
    the broken executor terminated, chunk 3 not started."""
    rig = Rig(n_workers=2)
    run = rig.add(FakeFiles(8), retries=retries)
    status = status_of(run)
    now = rig.clock()
    status.start(0, 101, now)
    status.start(1, 102, now)
    status.finish(1, with_result=False)
    status.start(2, 103, now)
    rig.backend.exit_codes = {101: -9, 103: -15}
    lost = rig.pending()
    assert [s.indices for s in lost] == [[0], [1], [2], [3]]
    for batch in lost:
        batch.lose()
    rig.step()
    resent = [s.indices for s in rig.backend.sent[len(lost) :]]
    return rig, run, resent


def test_a_broken_pool_is_recovered_once_for_all_its_lost_batches():
    """Every batch of the lost generation is judged with one recover() call."""
    rig, _run, _resent = _broken_pool()
    assert rig.backend.recovered == [0]


def test_the_chunk_running_in_the_dead_worker_is_charged_a_retry_and_sent_again():
    """A chunk RUNNING in the pid that died of its own accord costs one retry, and goes back."""
    _rig, run, resent = _broken_pool()
    assert run.attempts == {0: 1}
    assert run.job.stats.retries == 1
    assert [0] in resent
    assert not run.job.done()


def test_a_chunk_done_in_the_status_file_is_salvaged_not_sent_again():
    """A chunk DONE in the status file but lost with its batch counts as done."""
    rig, run, resent = _broken_pool()
    assert run.done[1]
    assert [1] not in resent
    rig.finish_all()
    assert not any(1 in s.indices for s in rig.backend.sent[4:])
    assert run.job.result(timeout=0) is files_of(run).results[0]


def test_chunks_not_running_in_the_dead_worker_are_requeued_free_of_charge():
    """Chunks pending, or running in a worker terminated with the pool, go back uncharged."""
    _rig, run, resent = _broken_pool()
    assert 2 not in run.attempts
    assert 3 not in run.attempts
    assert [2] in resent
    assert [3] in resent
    status = status_of(run)
    assert status.state(0) is ChunkState.PENDING
    assert status.state(2) is ChunkState.PENDING


def test_a_chunk_whose_return_value_was_lost_with_its_batch_is_run_again():
    """A chunk DONE_WITH_RESULT in a lost batch must run again: its value never arrived."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(2))
    status = status_of(run)
    status.start(0, 101, rig.clock())
    status.finish(0, with_result=True)
    status.start(1, 101, rig.clock())
    rig.backend.exit_codes = {101: -9}
    for batch in rig.pending():
        batch.lose()
    rig.step()
    assert any(0 in s.indices for s in rig.backend.sent[2:])


def test_a_chunk_that_kills_its_worker_more_often_than_retries_allows_fails_the_job():
    """Exhausted retries give WorkerCrashedError naming the chunk and the exit code."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(4), retries=1)
    status = status_of(run)
    for pid in (101, 201):
        culprit = next(s for s in rig.pending() if s.indices == [0])
        status.start(0, pid, rig.clock())
        rig.backend.exit_codes = {pid: -9}
        for batch in rig.pending():
            batch.lose()
        assert culprit.future.done()
        rig.step()
    exc = run.job.exception(timeout=0)
    assert isinstance(exc, WorkerCrashedError)
    assert exc.chunks == (0,)
    assert exc.exitcodes == (-9,)
    assert "chunk 0 (region [0:1]) of 4" in str(exc)
    assert "2 times (retries=1)" in str(exc)
    assert "SIGKILL(-9)" in str(exc)
    assert isinstance(exc.__cause__, BrokenProcessPool)
    assert rig.backend.recovered == [0, 1]
    assert status.cancelled


def test_a_backend_that_cannot_replace_workers_fails_the_job_at_the_first_loss():
    """On a user's executor a lost worker is not replaced: no retry, the job fails at once."""
    rig = Rig(n_workers=1, capabilities=USER_EXECUTOR)
    run = rig.add(FakeFiles(4), retries=5)
    status_of(run).start(0, 101, rig.clock())
    rig.backend.exit_codes = {101: 3}
    for batch in rig.pending():
        batch.lose()
    rig.step()
    exc = run.job.exception(timeout=0)
    assert isinstance(exc, WorkerCrashedError)
    assert exc.chunks == (0,)
    assert "exit code 3" in str(exc)


def test_without_exit_codes_every_running_chunk_of_a_lost_batch_is_charged():
    """With no exit code known, each chunk RUNNING in the lost batches is charged."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(4))
    status = status_of(run)
    status.start(0, 101, rig.clock())
    status.start(1, 102, rig.clock())
    for batch in rig.pending():
        batch.lose()
    rig.step()
    assert run.attempts == {0: 1, 1: 1}


# -- workers killed on purpose -------------------------------------------------------------------


def test_a_worker_killed_for_a_timeout_is_not_blamed_for_the_chunks_beside_it():
    """After a timeout kill breaks the pool, another job's running chunk is requeued free."""
    rig = Rig(n_workers=2)
    slow = rig.add(FakeFiles(4), timeout=5.0)
    other = rig.add(FakeFiles(4), retries=0)
    status_of(slow).start(0, 101, rig.clock())
    status_of(other).start(0, 102, rig.clock())
    rig.tick(6.0)
    assert rig.backend.killed == [101]
    assert isinstance(slow.job.exception(timeout=0), ChunkTimeoutError)
    rig.backend.exit_codes = {101: -9}  # the executor's SIGTERM to 102 is not reported
    for batch in rig.pending():
        batch.lose()
    rig.step()
    assert not other.job.done()
    assert other.attempts == {}
    assert other.job.stats.retries == 0
    assert any(s.indices == [0] for s in rig.pending(other))
    rig.finish_all(other)
    assert other.job.result(timeout=0) is files_of(other).results[0]


def test_a_worker_killed_by_an_interrupt_is_not_blamed_for_the_chunks_beside_it():
    """After an interrupt kills a worker, another job's chunk that was running is not charged."""
    rig = Rig(n_workers=2)
    stopped = rig.add(FakeFiles(4))
    other = rig.add(FakeFiles(4), retries=0)
    status_of(stopped).start(0, 101, rig.clock())
    status_of(other).start(0, 102, rig.clock())
    rig.dispatcher.interrupt(stopped)
    rig.step()
    rig.backend.exit_codes = {101: -9, 102: -9}
    for batch in rig.pending():
        batch.lose()
    rig.step()
    assert not other.job.done()
    assert other.attempts == {}


# -- a lost worker, without a status file: probing -----------------------------------------------


def _lost_multi_chunk_batch(retries: int = 2, seconds: float = 0.01):
    """A job on remote workers whose batch of several chunks is lost."""
    rig = Rig(n_workers=1, capabilities=CLUSTER, loss_types=(WorkerLost,))
    run = rig.add(FakeFiles(20, status=False), retries=retries)
    for batch in rig.pending():
        batch.succeed(seconds=seconds)
    rig.step()
    lost, other = rig.pending()
    assert len(lost.indices) > 1
    lost.lose(WorkerLost("worker gone"))
    rig.step()
    return rig, run, lost.indices, other


def test_without_a_status_file_the_chunks_of_a_lost_batch_become_suspects():
    """Every chunk of a batch lost on a remote worker is charged once and suspected."""
    _rig, run, lost, _other = _lost_multi_chunk_batch()
    assert run.suspects == set(lost)
    assert run.attempts == dict.fromkeys(lost, 1)


def test_suspects_are_retried_alone_and_one_at_a_time():
    """Each suspect goes out in a batch of its own, and never two suspects at once."""
    rig, run, lost, other = _lost_multi_chunk_batch()
    other.succeed()
    rig.step()
    probed = []
    while run.suspects:
        probes = [s for s in rig.pending() if set(s.indices) & set(lost)]
        assert len(probes) == 1
        (probe,) = probes
        assert len(probe.indices) == 1
        probed.append(probe.indices[0])
        for batch in rig.pending():
            batch.succeed()
        rig.step()
    assert sorted(probed) == sorted(lost)


def test_a_suspect_that_succeeds_is_cleared():
    """A suspect whose lone batch comes back is no longer suspected, nor charged again."""
    rig, run, lost, _other = _lost_multi_chunk_batch()
    probe = rig.backend.sent[-1]
    (i,) = probe.indices
    assert i in lost
    probe.succeed()
    rig.step()
    assert i not in run.suspects
    assert run.done[i]
    assert run.attempts[i] == 1


def test_a_suspect_that_dies_again_is_charged_again():
    """A suspect lost again, alone, is charged a second retry; beyond retries the job fails."""
    rig, run, _lost, _other = _lost_multi_chunk_batch(retries=1)
    probe = rig.backend.sent[-1]
    (i,) = probe.indices
    probe.lose(WorkerLost("worker gone again"))
    rig.step()
    assert run.attempts[i] == 2
    exc = run.job.exception(timeout=0)
    assert isinstance(exc, WorkerCrashedError)
    assert exc.chunks == (i,)
    assert "an unknown cause" in str(exc)


def test_the_chunks_of_a_lost_batch_all_complete_after_probing():
    """Once the suspects are cleared the job completes with every chunk."""
    rig, run, _lost, _other = _lost_multi_chunk_batch()
    rig.finish_all()
    assert run.job.result(timeout=0) is files_of(run).results[0]
    assert run.job.stats.retries == 5


def test_a_probe_that_could_not_be_submitted_is_sent_again():
    """A suspect's lone batch refused by submit() with a worker loss goes out again later."""
    rig, run, _lost, other = _lost_multi_chunk_batch()
    probe = rig.backend.sent[-1]
    probe.succeed()
    rig.backend.submit_errors = [WorkerLost("between workers")]
    rig.step()  # the next probe cannot get in
    other.succeed()
    rig.step()
    assert rig.pending(run)


def test_a_suspect_is_never_sent_together_with_other_chunks():
    """A chunk requeued ahead of the suspects does not pull them into a batch of several."""
    rig, run, _lost, other = _lost_multi_chunk_batch(seconds=0.001)
    assert other.future.cancel()  # dropped by the executor: requeued at the front
    rig.step()
    for sent in rig.pending():
        if len(sent.indices) > 1:
            assert not set(sent.indices) & run.suspects


# -- timeouts ------------------------------------------------------------------------------------


def test_a_chunk_running_longer_than_the_timeout_gets_its_worker_killed():
    """A chunk RUNNING past the timeout: its pid is killed and the job fails."""
    rig = Rig(n_workers=2)
    run = rig.add(FakeFiles(4), timeout=5.0)
    status = status_of(run)
    status.start(0, 101, rig.clock())
    status.start(1, 102, rig.clock() + 1.0)
    rig.tick(4.9)
    assert rig.backend.killed == []
    assert not run.job.done()
    rig.tick(0.2)
    assert rig.backend.killed == [101]
    exc = run.job.exception(timeout=0)
    assert isinstance(exc, ChunkTimeoutError)
    assert (exc.chunk, exc.timeout) == (0, 5.0)
    assert "pid 101" in str(exc)
    assert "killed and replaced" in str(exc)
    assert status.cancelled


def test_a_timed_out_worker_that_cannot_be_killed_is_named_as_left_running():
    """When kill() fails, the timeout error says the worker was left running."""
    rig = Rig(n_workers=1)
    rig.backend.kill_succeeds = False
    run = rig.add(FakeFiles(4), timeout=1.0)
    status_of(run).start(0, 101, rig.clock())
    rig.tick(2.0)
    exc = run.job.exception(timeout=0)
    assert isinstance(exc, ChunkTimeoutError)
    assert "left running" in str(exc)


def test_running_chunks_are_looked_at_once_per_tick():
    """Between two ticks of the clock, a chunk that became overdue is not looked at."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(4), timeout=1.0)
    status_of(run).start(0, 101, rig.clock() - 2.0)
    rig.clock.advance(TICK / 4)
    rig.step()
    assert rig.backend.killed == []
    rig.clock.advance(TICK)
    rig.step()
    assert rig.backend.killed == [101]


def test_no_timeout_is_enforced_when_workers_cannot_be_killed():
    """Without can_kill_workers, an overdue chunk is left alone and the job goes on."""
    rig = Rig(n_workers=1, capabilities=USER_EXECUTOR)
    run = rig.add(FakeFiles(4), timeout=1.0)
    status_of(run).start(0, 101, rig.clock())
    rig.tick(100.0)
    assert rig.backend.killed == []
    assert not run.job.done()


# -- cancel and interrupt ------------------------------------------------------------------------


def test_cancelling_a_job_raises_its_cancel_flag_before_the_dispatcher_steps():
    """Job.cancel() sets the status file's cancel flag at once."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(10))
    assert run.job.cancel()
    assert status_of(run).cancelled
    assert run.job.cancelled()


def test_a_cancelled_job_gets_no_further_batch():
    """Once the cancel is handled, no batch of the job is sent."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(10))
    run.job.cancel()
    rig.step()
    sent = len(rig.backend.sent)
    for batch in rig.pending():
        batch.succeed(done=[])
    rig.step()
    rig.tick()
    assert len(rig.backend.sent) == sent
    assert run.closed


def test_a_cancelled_job_is_finalized_only_after_its_batches_in_flight_return():
    """The cancelled job's files stay until every batch in flight is back."""
    rig = Rig(n_workers=2)
    run = rig.add(FakeFiles(10))
    files = files_of(run)
    run.job.cancel()
    rig.step()
    first, *rest = rig.pending()
    first.succeed()
    rig.step()
    assert files.cleanups == []
    assert not run.finalized.is_set()
    for batch in rest:
        batch.succeed(done=[])
    rig.step()
    assert files.cleanups == [False]
    assert run.finalized.is_set()
    with pytest.raises(CancelledError):
        run.job.result(timeout=0)


def test_a_job_cancelled_before_it_is_added_never_runs():
    """A job cancelled before the dispatcher takes it sends nothing and is cleaned up."""
    rig = Rig(n_workers=1)
    run = rig.run(FakeFiles(4))
    run.job.cancel()
    rig.dispatcher.add(run)
    rig.step()
    assert rig.backend.sent == []
    assert files_of(run).cleanups == [False]


def test_interrupting_a_job_kills_the_workers_running_its_chunks():
    """An interrupt kills the pids RUNNING the job's chunks, not another job's."""
    rig = Rig(n_workers=2)
    run = rig.add(FakeFiles(4))
    other = rig.add(FakeFiles(4))
    status = status_of(run)
    status.start(0, 101, rig.clock())
    status.start(1, 102, rig.clock())
    status_of(other).start(0, 201, rig.clock())
    rig.dispatcher.interrupt(run)
    rig.step()
    assert sorted(rig.backend.killed) == [101, 102]
    assert status.cancelled
    assert run.closed


def test_interrupting_a_job_on_remote_workers_drops_its_batches_in_flight():
    """Where workers can't be killed, an interrupt cancels the job's batch futures at once."""
    rig = Rig(n_workers=2, capabilities=CLUSTER, loss_types=(WorkerLost,))
    run = rig.add(FakeFiles(8, status=False))
    other = rig.add(FakeFiles(8, status=False))
    rig.dispatcher.interrupt(run)
    rig.step()
    assert rig.backend.killed == []
    assert rig.pending(run) == []
    assert files_of(run).cleanups == [False]
    assert rig.pending(other)


# -- drain and stop ------------------------------------------------------------------------------


def test_draining_lets_running_jobs_finish_then_the_dispatcher_stops():
    """After Drain, batches keep going until the jobs end; then step() returns False."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(6))
    rig.dispatcher.stop_when_idle()
    assert rig.step()
    for _ in range(100):
        pending = rig.pending()
        if not pending:
            break
        pending[0].succeed()
        if not rig.step():
            break
    assert run.job.result(timeout=0) is files_of(run).results[0]
    assert rig.step() is False


def test_a_dispatcher_drained_without_jobs_stops_at_once():
    """Drain with nothing running: the next step returns False."""
    rig = Rig()
    rig.dispatcher.stop_when_idle()
    assert rig.step() is False


def test_stop_cancels_the_running_jobs_and_waits_for_their_batches():
    """After Stop, jobs are cancelled, nothing more is sent, and it stops once batches are back."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(6))
    rig.dispatcher.stop()
    assert rig.step()
    assert run.job.cancelled()
    sent = len(rig.backend.sent)
    for batch in rig.pending():
        batch.succeed(done=[])
    assert rig.step() is False
    assert len(rig.backend.sent) == sent
    assert files_of(run).cleanups == [False]


@pytest.mark.parametrize("how", ["stop", "drain"])
def test_a_job_added_after_shutdown_is_refused_with_runtime_error(how):
    """A job added once the dispatcher stops or drains fails with RuntimeError, cleaned up."""
    rig = Rig()
    if how == "stop":
        rig.dispatcher.stop()
    else:
        rig.dispatcher.stop_when_idle()
    rig.step()
    run = rig.run(FakeFiles(4))
    rig.dispatcher.add(run)
    rig.step()
    exc = run.job.exception(timeout=0)
    assert isinstance(exc, RuntimeError)
    assert "shut down" in str(exc)
    assert rig.backend.sent == []
    assert files_of(run).cleanups == [False]


# -- skipped chunks and progress -----------------------------------------------------------------


def test_chunks_a_worker_skipped_go_back_to_the_queue():
    """A batch back with fewer chunks done than sent, job still open: the rest is resent."""
    rig = Rig(n_workers=1)
    run = rig.add(FakeFiles(30))
    for batch in rig.pending():
        batch.succeed(seconds=0.01)
    rig.step()
    batch = rig.pending()[0]
    assert len(batch.indices) >= 3
    batch.succeed(done=batch.indices[:2])
    rig.step()
    assert rig.backend.sent[-1].indices[: len(batch.indices) - 2] == batch.indices[2:]
    rig.finish_all()
    assert run.job.result(timeout=0) is files_of(run).results[0]
    assert run.job.stats.chunks_done == 30


def test_live_progress_from_the_status_file_reaches_the_job():
    """Chunks DONE in the status file count in job.progress before their batch is back."""
    rig = Rig(n_workers=2)
    run = rig.add(FakeFiles(10))
    seen = []
    run.job.add_progress_callback(seen.append)
    status = status_of(run)
    for i in (0, 1, 2):
        status.start(i, 101, rig.clock())
        status.finish(i, with_result=False)
    assert run.job.progress.done == 0
    rig.tick()
    assert run.job.progress.done == 3
    assert seen[-1].done == 3


def test_a_batch_of_replaced_workers_that_never_reports_is_handled_as_lost():
    """A batch of a generation whose workers were replaced, and whose future never ends (the
    executor dropped it), is taken as lost after ORPHAN_GRACE: the job goes on, not waits."""
    from memmap_pool._dispatch import ORPHAN_GRACE, TICK

    rig = Rig(n_workers=2)
    run = rig.add(FakeFiles(4), retries=2)
    status = status_of(run)
    first, dropped = rig.pending()[:2]
    status.start(0, 101, rig.clock())
    rig.backend.exit_codes = {101: -9}
    first.lose()  # the pool broke: its workers are replaced
    rig.step()
    assert rig.backend.recovered == [0]
    assert not dropped.future.done()  # never to report
    rig.clock.advance(ORPHAN_GRACE / 2)
    rig.step()
    assert dropped in rig.pending()  # still waited for, within the grace
    rig.clock.advance(ORPHAN_GRACE / 2 + TICK)
    rig.step()
    for _ in range(100):  # complete every batch but the dropped one, which never reports
        others = [b for b in rig.pending() if b is not dropped]
        if not others:
            break
        others[0].succeed()
        rig.step()
    assert not dropped.future.done()
    assert run.job.result(timeout=0) is files_of(run).results[0]


# -- salvaging the chunks of a persistent output -------------------------------------------------


def _lost_with_a_done_chunk(files: FakeFiles) -> tuple[Rig, Run]:
    """The batches in flight lost when a worker died: chunk 0 DONE in the status file (not
    yet reported), chunk 1 running in the dead worker."""
    rig = Rig(n_workers=1)
    run = rig.add(files, retries=2)
    status = status_of(run)
    lost = rig.pending()
    assert [0] in [s.indices for s in lost]
    status.start(0, 101, rig.clock())
    status.finish(0, with_result=False)
    status.start(1, 101, rig.clock())
    rig.backend.exit_codes = {101: -9}
    for sent in lost:
        sent.lose()
    rig.step()
    return rig, run


def test_salvaged_chunks_of_a_persistent_output_are_made_durable_first(tmp_path, monkeypatch):
    """A worker msyncs its chunks at the end of a batch: those of a batch cut short are made
    durable by the parent (fsync of each output) before they count as done."""
    files = FakeFiles(4, output_dir=tmp_path, flush=True, n_outputs=2)
    for ref in files.spec.outputs:
        Path(ref.path).write_bytes(b"\0" * 32)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    _rig, run = _lost_with_a_done_chunk(files)
    assert run.done[0]
    assert sorted(synced) == sorted(ref.path for ref in files.spec.outputs)


def test_salvaged_chunks_that_cannot_be_made_durable_run_again():
    """When an output can't be synced (here: its file is gone), the chunks a dead worker
    finished are sent again instead of counting as done."""
    files = FakeFiles(4, flush=True)  # the outputs' directory does not exist
    rig, run = _lost_with_a_done_chunk(files)
    assert not run.done[0]
    assert status_of(run).state(0) is ChunkState.PENDING
    assert any(0 in s.indices for s in rig.backend.sent[1:])
    rig.finish_all()
    assert run.job.result(timeout=0) is files.results[0]


def test_salvaged_chunks_of_a_temporary_output_need_no_sync(monkeypatch):
    """Without a persistent output nothing is synced: the page cache is the truth."""
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("fsync of a temporary output"))
    _rig, run = _lost_with_a_done_chunk(FakeFiles(4))
    assert run.done[0]
