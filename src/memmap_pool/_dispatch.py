"""The dispatcher: one thread per pool that feeds batches of chunk indices to the workers.

It owns all scheduling state, so nothing here needs a lock except the event queue. Every
input is a small typed event, handled by kind::

    submit_chunks ── AddJob ──────▶ events ──▶ dispatcher thread ──▶ backend.submit(batch)
    batch futures ── BatchDone ──▶   │     round robin over the running jobs (fairness)
    Job.cancel() ── CancelJob ───▶   │     batch size: ~TARGET_BATCH_SECONDS of chunks
    Ctrl-C ──────── InterruptJob ─▶  │     every TICK: progress, timeouts, journal
    shutdown() ──── Drain / Stop ─▶  ▼
              results: record chunks, journal them, retry chunks of dead workers (see
              _blame), fail fast on kernel errors, finish the job when all are done

The thread is a loop around :meth:`Dispatcher.step`; a unit test builds a dispatcher without
a thread, with a fake backend and clock, and calls ``step()`` itself.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from . import _memory as memory
from ._blame import crash_error, describe_exit, failure_error, judge_loss
from ._chunks import describe_region
from ._jobs import ChunkReport
from ._protocol import Batch, BatchResult
from ._run import Run
from ._worker import run_batch
from .backends import Backend
from .errors import ChunkTimeoutError

log = logging.getLogger("memmap_pool")

TICK = 0.05
"""Seconds between looks at the status of running chunks: progress, timeouts, journal."""

TARGET_BATCH_SECONDS = 0.05
"""A batch carries about this much work. Long enough that the ~100 us round trip of a pool
task is noise per chunk; short enough that a job submitted later gets a worker quickly and
the last batches of a job balance across workers."""

MAX_BATCH_CHUNKS = 4096
"""Upper bound on chunks per batch, so a batch message stays a few kilobytes at most."""

BATCHES_PER_WORKER = 2
"""Batches in flight per worker: one running and one queued, so a worker never waits for the
dispatcher between batches."""

CRASH_GENERATIONS_KEPT = 16
"""Generations whose loss verdicts are kept: batches of older ones are all back."""

ORPHAN_GRACE = 10.0
"""Seconds after its workers were replaced that a batch of the old workers may still report;
after that it is handled as lost with its worker rather than waited for: the futures of a
broken executor that was shut down are not guaranteed to end (CPython 3.11 has races there,
python/cpython#116685 among them)."""

MIN_CHUNK_SECONDS = 1e-7
"""Floor of the per-chunk time estimate, so that batch sizing never divides by zero."""


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddJob:
    run: Run


@dataclass(frozen=True)
class CancelJob:
    run: Run


@dataclass(frozen=True)
class InterruptJob:
    run: Run


@dataclass(frozen=True)
class BatchDone:
    future: Future[Any]


@dataclass(frozen=True)
class Drain:
    """Let the running jobs finish, then stop."""


@dataclass(frozen=True)
class Stop:
    """Cancel the running jobs and stop once their batches are back."""


Event = AddJob | CancelJob | InterruptJob | BatchDone | Drain | Stop


@dataclass
class _InFlight:
    run: Run
    indices: range | tuple[int, ...]
    generation: int


class Dispatcher:
    """Runs the jobs of one pool on its backend; see the module docstring.

    Args:
        backend: where batches run.
        clock: seconds, monotonic (injectable for unit tests).
        threaded: start the dispatcher thread; without it, call :meth:`step`.
    """

    def __init__(
        self,
        backend: Backend,
        clock: Callable[[], float] = time.monotonic,
        threaded: bool = True,
    ) -> None:
        self.backend = backend
        self._clock = clock
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._runs: deque[Run] = deque()  # round-robin order of running jobs
        self._inflight: dict[Future[Any], _InFlight] = {}
        # generation -> exit codes of its lost workers, and those of them we killed on purpose
        self._crashes: dict[int, tuple[dict[int, int | None], set[int]]] = {}
        self._killed: set[int] = set()  # pids we killed on purpose (timeouts, interrupts)
        self._replaced_at: dict[int, float] = {}  # generation -> when its workers went
        self._last_tick = float("-inf")
        self._stopping = False
        self._draining = False
        self._orphans = threading.Lock()
        self._thread: threading.Thread | None = None
        self._on_exit: Callable[[], None] | None = None
        if threaded:
            self._thread = threading.Thread(
                target=self._loop, name="memmap-pool-dispatcher", daemon=True
            )
            backend.keep_alive(self._thread)
            self._thread.start()

    # -- API used by the pool and jobs (any thread) -------------------------------------------

    def add(self, run: Run) -> None:
        self._events.put(AddJob(run))
        if self._thread is not None and not self._thread.is_alive():
            # The dispatcher stopped in the meantime (the pool shut down): nobody else will
            # take the job; refuse it here, which also removes its files.
            with self._orphans:
                self._stopping = True
                self._handle_queued()

    def cancel(self, run: Run) -> None:
        status = run.status
        if status is not None:
            # Raise the job's cancel flag now, not when the dispatcher thread gets to the
            # event: no chunk may start after Job.cancel() has returned.
            status.cancel()
        self._events.put(CancelJob(run))

    def interrupt(self, run: Run) -> None:
        """Stop a job now: cancel it and kill the workers running its chunks."""
        self._events.put(InterruptJob(run))

    def stop(self, timeout: float | None = None, then: Callable[[], None] | None = None) -> None:
        """Cancel the running jobs and stop once their batches are back; ``then`` runs in the
        dispatcher's thread as its last act (see :meth:`_loop`)."""
        self._on_exit = then or self._on_exit
        self._events.put(Stop())
        self._join(timeout)

    def stop_when_idle(
        self, timeout: float | None = None, then: Callable[[], None] | None = None
    ) -> None:
        """Let the running jobs finish, then stop (and run ``then``, as :meth:`stop`)."""
        self._on_exit = then or self._on_exit
        self._events.put(Drain())
        self._join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _join(self, timeout: float | None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            # The backend is shut down from this thread: workers started from it ask the
            # kernel to kill them when it ends, so it must outlive them.
            on_exit = self._on_exit
            if on_exit is not None:
                try:
                    on_exit()
                except Exception:  # pragma: no cover - the pool must still close
                    log.exception("memmap-pool: stopping the workers failed")

    def _serve(self) -> None:
        while True:
            busy = bool(self._runs or self._inflight)
            try:
                event: Event | None = self._events.get(timeout=TICK if busy else None)
            except queue.Empty:
                event = None
            if event is not None:
                self._handle_safely(event)
            if not self.step():
                return

    def step(self) -> bool:
        """Handle every queued event, then look at running chunks and send batches.
        Returns False once the dispatcher has stopped."""
        self._handle_queued()
        if (self._stopping or self._draining) and not self._runs and not self._inflight:
            return False
        try:
            now = self._clock()
            if now - self._last_tick >= TICK:
                self._last_tick = now
                self._tick(now)
            self._fill()
        except Exception:  # pragma: no cover - a bug here must not kill the pool
            log.exception("memmap-pool dispatcher error")
        return True

    def _handle_queued(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._handle_safely(event)

    def _handle_safely(self, event: Event) -> None:
        try:
            self._handle(event)
        except Exception:  # pragma: no cover - a bug here must not kill the pool
            log.exception("memmap-pool dispatcher error on %s", type(event).__name__)

    def _handle(self, event: Event) -> None:
        match event:
            case BatchDone(future):
                self._on_batch_done(future)
            case AddJob(run):
                self._start(run)
            case CancelJob(run):
                self._close(run)
            case InterruptJob(run):
                self._interrupt(run)
            case Drain():
                self._draining = True
            case Stop():
                self._stopping = True
                for run in list(self._runs):
                    run.job.cancel()
                    self._close(run)

    def _start(self, run: Run) -> None:
        if self._stopping or self._draining:
            run.job._finish(error=RuntimeError("cannot run a job: the pool is shut down"))
            run.closed = True
            self._maybe_finalize(run)
            return
        if run.job.cancelled() or not run.job.set_running_or_notify_cancel():
            run.closed = True
            self._maybe_finalize(run)
            return
        self._runs.append(run)
        self._check_complete(run)

    # -- sending batches ----------------------------------------------------------------------

    def _fill(self) -> None:
        capacity = self.backend.n_workers * BATCHES_PER_WORKER
        while len(self._inflight) < capacity and not self._stopping:
            run = self._next_run()
            if run is None:
                return
            if not self._send(run, run.take_batch(self._batch_size(run))):
                # The backend lost its workers before taking the batch: the next step sends
                # again, after handling what happened meanwhile (a Stop, say).
                return

    def _next_run(self) -> Run | None:
        for _ in range(len(self._runs)):
            run = self._runs[0]
            self._runs.rotate(-1)
            if run.has_pending():
                return run
        return None

    def _batch_size(self, run: Run) -> int:
        if run.chunk_seconds is None:
            return 1  # measure before sending more
        by_time = int(TARGET_BATCH_SECONDS / max(run.chunk_seconds, MIN_CHUNK_SECONDS))
        workers = self.backend.n_workers
        if run.steps is not None:
            # A step of an iterate run ends at a barrier, and many are short: a step that
            # takes less than a batch's time per worker goes out as one batch per worker (one
            # round trip), a longer one as BATCHES_PER_WORKER; the sizes are the step's, not
            # the remainder's, so that its last batches don't dwindle into round trips.
            per_worker = run.count * run.chunk_seconds / workers
            shares = workers * (1 if per_worker < TARGET_BATCH_SECONDS else BATCHES_PER_WORKER)
            return max(1, min(-(-run.count // shares), by_time, MAX_BATCH_CHUNKS))
        # Keep the tail balanced: never more than a share of what is left per worker.
        by_balance = -(-run.remaining() // (workers * BATCHES_PER_WORKER))
        return max(1, min(by_time, by_balance, MAX_BATCH_CHUNKS))

    def _send(self, run: Run, indices: range | tuple[int, ...]) -> bool:
        """Submit a batch; False when the backend lost its workers before taking it."""
        generation = self.backend.generation
        files = run.files
        step = run.steps.step if run.steps is not None else 0
        batch = Batch(files.spec_path, files.spec_inode, run.spec.token, indices, step)
        try:
            future = self.backend.submit(run_batch, batch)
        except Exception as exc:
            if len(indices) == 1 and indices[0] in run.suspects:
                run.probing = False  # the probe never went out
            if self.backend.is_worker_loss(exc) and self.backend.capabilities.replaces_lost_workers:
                # The pool broke before this batch got in: replace it and send again later.
                run.requeue(indices)
                self._recover(generation)
                return False
            self._fail(run, exc)
            return True
        run.inflight += 1
        self._inflight[future] = _InFlight(run, indices, generation)
        future.add_done_callback(lambda f: self._events.put(BatchDone(f)))
        return True

    # -- receiving results --------------------------------------------------------------------

    def _on_batch_done(self, future: Future[Any]) -> None:
        batch = self._inflight.pop(future, None)
        if batch is None:
            return
        run = batch.run
        run.inflight -= 1
        if len(batch.indices) == 1 and batch.indices[0] in run.suspects:
            run.probing = False
            if not future.cancelled() and future.exception() is None:
                run.suspects.discard(batch.indices[0])
        if future.cancelled():
            run.requeue(batch.indices)
        elif (exc := future.exception()) is None:
            self._apply(run, batch, future.result())
        elif self.backend.is_worker_loss(exc):
            self._on_worker_loss(batch, exc)
        else:
            self._fail(run, exc)
        self._check_complete(run)
        self._maybe_finalize(run)

    def _apply(self, run: Run, batch: _InFlight, result: BatchResult) -> None:
        run.record_done(result.done, result.seconds, result.nbytes, result.results)
        run.observe_seconds(result.seconds)
        if run.fold is not None and run.fold.error is not None:
            self._fail(run, run.fold.error)  # combine raised: no point going on
            return
        failure = result.failure
        if failure is not None:
            status = run.status
            if status is not None and 0 <= failure.index < run.count:
                # The worker left the failed chunk marked running; it is not, and its pid
                # must not be taken for that chunk's (an interrupt would kill it).
                status.reset(failure.index)
            outputs = run.spec.outputs
            where = outputs[0].path if outputs else ""
            error = failure_error(failure, run.count, where, run.journal is not None)
            self._fail(run, error)
            return
        # Chunks the worker skipped (the job was closed meanwhile) go back if it wasn't.
        if not run.closed and len(result.done) < len(batch.indices):
            run.requeue(batch.indices)

    def _on_worker_loss(self, batch: _InFlight, exc: BaseException) -> None:
        crash = self._crashes.get(batch.generation)
        codes, deliberate = crash if crash is not None else self._recover(batch.generation)
        run = batch.run
        culprits = {
            pid
            for pid, code in codes.items()
            if code not in (None, -signal.SIGTERM) and pid not in deliberate
        }
        status = run.status if self.backend.capabilities.shares_page_cache else None
        verdict = judge_loss(batch.indices, run.done, status, culprits, deliberate)
        if verdict.salvaged and run.spec.flush and not _sync_outputs(run):
            # They can't be made durable: they run again rather than being journaled.
            assert status is not None
            for i in verdict.salvaged:
                status.reset(i)
            verdict.requeued = sorted(verdict.requeued + verdict.salvaged)
            verdict.salvaged = []
        for i in reversed(verdict.requeued):
            run.retry_queue.appendleft(i)
        run.record_done(verdict.salvaged)
        if status is None:
            run.suspects.update(verdict.charged)
        if run.closed or not verdict.charged:
            return
        exhausted = []
        for i in verdict.charged:
            n = run.attempts.get(i, 0) + 1
            run.attempts[i] = n
            # A user's executor can't be rebuilt by us: once broken, nothing can be retried.
            if n > run.retries or not self.backend.capabilities.replaces_lost_workers:
                exhausted.append(i)
            else:
                run.retry_queue.appendleft(i)
        run.job._update(ChunkReport(retried=len(verdict.charged) - len(exhausted)))
        lost = {pid: code for pid, code in codes.items() if pid in culprits} or codes
        exits = sorted({describe_exit(c) for c in lost.values()})
        if exhausted:
            codes_t = tuple(c for c in lost.values() if c is not None)
            error = crash_error(
                run.spec.plan,
                exhausted,
                run.retries,
                exits or [self.backend.describe_loss(exc)],
                codes_t,
                exc,
            )
            self._fail(run, error)
        else:
            log.warning(
                "retrying chunk(s) %s of a job after a worker died (%s)",
                ", ".join(map(str, verdict.charged)),
                "; ".join(exits) or self.backend.describe_loss(exc),
            )

    def _recover(self, generation: int) -> tuple[dict[int, int | None], set[int]]:
        codes = self.backend.recover(generation)
        if self.backend.generation > generation:
            self._replaced_at.setdefault(generation, self._clock())
        deliberate = self._killed & set(codes)
        self._killed -= deliberate  # a pid can come back as another process later
        died = {pid: code for pid, code in codes.items() if pid not in deliberate}
        if died:
            log.warning(
                "replaced the pool's workers after a worker died (%s)",
                "; ".join(f"pid {pid}: {describe_exit(code)}" for pid, code in died.items()),
            )
        else:
            # Workers the pool killed itself (a timeout, Ctrl-C): nothing to warn about.
            log.info("replaced the pool's workers after stopping %d of them", len(codes))
        self._crashes[generation] = (codes, deliberate)
        self._crashes.pop(generation - CRASH_GENERATIONS_KEPT, None)
        return codes, deliberate

    # -- closing jobs -------------------------------------------------------------------------

    def _check_complete(self, run: Run) -> None:
        if run.closed or run.n_done < run.count:
            return
        if run.steps is not None:
            if run.inflight:
                return  # a late batch of this step still runs: the next one must wait
            try:
                more = run.steps.finish_step()
            except Exception as exc:  # the journal or the checkpoint's fsync failed
                self._fail(run, exc)
                return
            if more:
                run.start_next_step()
                return
        run.closed = True
        run.succeeded = True
        self._maybe_finalize(run)

    def _fail(self, run: Run, exc: BaseException) -> None:
        if run.closed:
            return
        self._close(run)
        if run.journal is not None:
            # Before the caller sees the error, which it may answer with a resume at once.
            try:
                run.journal.sync()
            except OSError:
                log.exception("could not write the journal %s", run.journal.path)
        run.job._finish(error=exc)

    def _close(self, run: Run) -> None:
        """Stop sending the job's chunks and tell its workers to drop the ones not started."""
        if not run.closed:
            run.closed = True
            if run.status is not None:
                run.status.cancel()
        self._maybe_finalize(run)

    def _interrupt(self, run: Run) -> None:
        self._close(run)
        capabilities = self.backend.capabilities
        status = run.status
        if status is not None and capabilities.can_kill_workers:
            for i in status.running().tolist():
                pid = status.pid(i)
                if self.backend.kill(pid):
                    self._killed.add(pid)
        if not capabilities.shares_page_cache:
            # Remote workers can't be killed: drop the job's batches that have not finished,
            # so that it ends now even if they would never run (a cluster left without
            # workers). A batch already running on a worker still completes there.
            for future, batch in list(self._inflight.items()):
                if batch.run is run:
                    future.cancel()
        self._maybe_finalize(run)

    def _maybe_finalize(self, run: Run) -> None:
        if not run.closed or run.inflight or run.finalized.is_set():
            return
        if run in self._runs:
            self._runs.remove(run)
        value: Any = None
        error: BaseException | None = None
        if run.succeeded:
            try:
                value = run.result()
            except BaseException as exc:  # pragma: no cover - e.g. a full disk at fsync
                error = exc
        try:
            journal = run.journal
            if journal is not None:
                if run.succeeded and error is None:
                    journal.remove()  # every chunk is on disk: nothing left to resume
                else:
                    try:
                        journal.sync()
                    except OSError as exc:
                        # Marks not written only mean chunks computed again on resume.
                        log.warning("could not update the journal %s: %s", journal.path, exc)
                    journal.close()
            run.files.cleanup(run.succeeded and error is None)
        finally:
            run.finalized.set()
            if run.succeeded:
                run.job._finish(value, error)
            else:
                run.job._mark_ended()

    # -- every TICK: progress, timeouts, journal --------------------------------------------

    def _reap_orphans(self, now: float) -> None:
        """Batches of replaced workers that never reported (see :data:`ORPHAN_GRACE`)."""
        for future, batch in list(self._inflight.items()):
            since = self._replaced_at.get(batch.generation)
            if since is None or now - since < ORPHAN_GRACE or future.done():
                continue
            del self._inflight[future]  # a late report is ignored
            run = batch.run
            run.inflight -= 1
            lost = BrokenProcessPool("the batch was lost with its workers and never reported")
            self._on_worker_loss(batch, lost)
            self._check_complete(run)
            self._maybe_finalize(run)
        for generation in list(self._replaced_at):
            if now - self._replaced_at[generation] > CRASH_GENERATIONS_KEPT * ORPHAN_GRACE:
                del self._replaced_at[generation]

    def _tick(self, now: float) -> None:
        if self._replaced_at:
            self._reap_orphans(now)
        for run in list(self._runs):
            if run.closed:
                continue
            journal = run.journal
            if journal is not None:
                try:
                    journal.sync()
                except OSError as exc:  # kept marked: written at the next tick that can
                    if not run.journal_failing:
                        log.warning("could not update the journal %s: %s", journal.path, exc)
                    run.journal_failing = True
            status = run.status
            if status is None:
                continue
            run.job._update(ChunkReport(live_done=run.live_offset + status.count_done()))
            if run.timeout is None or not self.backend.capabilities.can_kill_workers:
                continue
            late = status.overdue(now, run.timeout)
            if late:
                self._on_timeout(run, late[0], status.pid(late[0]))

    def _on_timeout(self, run: Run, index: int, pid: int) -> None:
        region = describe_region(run.spec.plan.slices(index))
        killed = self.backend.kill(pid)
        if killed:
            self._killed.add(pid)
        msg = (
            f"chunk {index} (region {region}) of {run.count} ran longer than the timeout of "
            f"{run.timeout:g} s; its worker (pid {pid}) was "
            + ("killed and replaced" if killed else "left running (it cannot be killed)")
        )
        self._fail(run, ChunkTimeoutError(msg, index, float(run.timeout or 0)))


def _sync_outputs(run: Run) -> bool:
    """fsync the files of a job's outputs; False if one can't be.

    Chunks a lost worker finished are salvaged, but a worker msyncs its chunks at the end of
    its batch: those of a batch cut short by the loss are in the page cache, maybe not yet
    on disk. The journal must only record chunks whose bytes are on disk, so the parent
    makes them durable first.
    """
    for ref in run.spec.outputs:
        if memory.is_key(ref.path):
            continue  # in this process's memory: nothing on disk to journal
        try:
            fd = os.open(ref.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            os.fsync(fd)
        except OSError:
            return False
        finally:
            os.close(fd)
    return True
