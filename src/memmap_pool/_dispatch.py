"""The dispatcher: one thread per pool that feeds batches of chunk indices to the workers.

It owns all scheduling state, so nothing here needs a lock except the event queue::

    submit_chunks ──▶ events ──▶ dispatcher thread ──▶ backend.submit(run_batch, batch)
    batch futures ──▶ events ─┘      │  round robin over the running jobs (fairness)
    cancel / interrupt ──▶ events ──┘  │  batch size: ~TARGET_BATCH_SECONDS of chunks
                                       │  every TICK: progress, timeouts, journal
                                       ▼
              results: record chunks, journal them, retry chunks of dead workers,
                       fail fast on kernel errors, finish the job when all are done
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._chunks import describe_region, region_nbytes
from ._executors import Backend
from ._jobs import Job
from ._journal import Journal
from ._worker import (
    DONE,
    PENDING,
    RUNNING,
    BatchResult,
    ChunkFailure,
    JobSpec,
    run_batch,
)
from .errors import (
    ChunkTimeoutError,
    KernelError,
    NotEnoughSpaceError,
    SerializationError,
    WorkerCrashedError,
)

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

_SIGNAL_CAUSES = {
    signal.SIGKILL: "killed: most often by the out-of-memory killer (use smaller chunks or "
    "fewer workers), or by another process",
    signal.SIGSEGV: "a crash in native code (a C extension or a bad memory access)",
    signal.SIGBUS: "a memory-mapped file could not be backed: the disk or /dev/shm holding "
    "it is full, or the file was truncated",
    signal.SIGABRT: "the process aborted (an assertion in native code)",
    signal.SIGTERM: "terminated by another process",
    signal.SIGILL: "an illegal instruction in native code (a library built for another CPU)",
    signal.SIGFPE: "an arithmetic fault in native code",
}


def describe_exit(code: int | None) -> str:
    """``SIGKILL(-9)`` and its likely cause, or ``exit code 3``."""
    if code is None:
        return "an unknown exit status"
    if code < 0:
        try:
            sig = signal.Signals(-code)
        except ValueError:
            return f"signal {-code}({code})"
        cause = _SIGNAL_CAUSES.get(sig)
        return f"{sig.name}({code})" + (f": {cause}" if cause else "")
    if code == 0:
        return (
            "exit code 0: the worker exited on its own (an initializer that failed, or "
            "os._exit(0) in the kernel)"
        )
    return f"exit code {code}: the worker process exited (os._exit() in the kernel, or native code)"


@dataclass
class Run:
    """The dispatcher's state for one job."""

    job: Job
    spec: JobSpec
    spec_path: str
    retries: int
    timeout: float | None
    journal: Journal | None
    status: tuple[np.ndarray[Any, Any], ...] | None
    finish: Callable[[], Any]  # builds the result once every chunk is done
    cleanup: Callable[[bool], None]  # removes the job's files; argument: job succeeded
    done: np.ndarray[Any, Any]  # bool per chunk
    next_fresh: int = 0
    retry_queue: deque[int] = field(default_factory=deque)
    attempts: dict[int, int] = field(default_factory=dict)
    suspects: set[int] = field(default_factory=set)  # retried alone (see _take_batch)
    probing: bool = False  # a suspect is being retried
    inflight: int = 0
    n_done: int = 0
    closed: bool = False  # outcome decided (success, failure or cancel)
    succeeded: bool = False
    chunk_seconds: float | None = None  # running estimate, for batch sizing
    journal_failing: bool = False  # a journal update failed (logged once)
    finalized: threading.Event = field(default_factory=threading.Event)

    @property
    def count(self) -> int:
        return self.spec.plan.count

    def has_pending(self) -> bool:
        if self.closed:
            return False
        if self.retry_queue and self.retry_queue[0] in self.suspects and self.probing:
            return False  # one suspect at a time (see Dispatcher._take_batch)
        return bool(self.retry_queue) or self.next_fresh < self.count

    def remaining(self) -> int:
        return len(self.retry_queue) + self.count - self.next_fresh


@dataclass
class _Batch:
    run: Run
    indices: range | tuple[int, ...]
    generation: int


class Dispatcher:
    """Runs the jobs of one pool on its backend; see the module docstring."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._runs: deque[Run] = deque()  # round-robin order of running jobs
        self._inflight: dict[Future[Any], _Batch] = {}
        # generation -> exit codes of its lost workers, and those of them we killed on purpose
        self._crashes: dict[int, tuple[dict[int, int | None], set[int]]] = {}
        self._killed: set[int] = set()  # pids we killed on purpose (timeouts, interrupts)
        self._last_tick = 0.0
        self._stopping = False
        self._draining = False
        self._orphans = threading.Lock()
        self._thread = threading.Thread(
            target=self._loop, name="memmap-pool-dispatcher", daemon=True
        )
        self._thread.start()

    # -- API used by the pool (any thread) ----------------------------------------------------

    def add(self, run: Run) -> None:
        self._events.put(("add", run))
        if not self._thread.is_alive():
            # The dispatcher stopped in the meantime (the pool shut down): nobody else will
            # take the job; refuse it here, which also removes its files.
            with self._orphans:
                self._stopping = True
                while True:
                    try:
                        kind, payload = self._events.get_nowait()
                    except queue.Empty:
                        break
                    self._handle(kind, payload)

    def cancel(self, run: Run) -> None:
        status = run.status
        if status is not None:
            # Raise the job's cancel flag now, not when the dispatcher thread gets to the
            # event: no chunk may start after Job.cancel() has returned.
            status[0][0] = 1
        self._events.put(("cancel", run))

    def interrupt(self, run: Run) -> None:
        """Stop a job now: cancel it and kill the workers running its chunks."""
        self._events.put(("interrupt", run))

    def stop(self, timeout: float | None = None) -> None:
        """Cancel the running jobs and stop once their batches are back."""
        self._events.put(("stop", None))
        self._thread.join(timeout)

    def stop_when_idle(self, timeout: float | None = None) -> None:
        """Let the running jobs finish, then stop."""
        self._events.put(("drain", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                event: tuple[str, Any] | None = self._events.get(
                    timeout=TICK if (self._runs or self._inflight) else None
                )
            except queue.Empty:
                event = None
            while event is not None:
                try:
                    self._handle(*event)
                except Exception:  # pragma: no cover - a bug here must not kill the pool
                    log.exception("memmap-pool dispatcher error on %s", event[0])
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    event = None
            if (self._stopping or self._draining) and not self._runs and not self._inflight:
                return
            try:
                now = time.monotonic()
                if now - self._last_tick >= TICK:
                    self._last_tick = now
                    self._tick(now)
                self._fill()
            except Exception:  # pragma: no cover
                log.exception("memmap-pool dispatcher error")

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "done":
            self._on_batch_done(payload)
        elif kind == "add":
            self._start(payload)
        elif kind == "cancel":
            self._close(payload)
        elif kind == "interrupt":
            self._interrupt(payload)
        elif kind == "drain":
            self._draining = True
        elif kind == "stop":
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
        if run.job.cancelled():
            run.closed = True
            self._maybe_finalize(run)
            return
        try:
            run.job.set_running_or_notify_cancel()
        except RuntimeError:
            pass  # cancelled between the check and here
        if run.job.cancelled():
            run.closed = True
            self._maybe_finalize(run)
            return
        # Chunks a resume found done are not sent again.
        if run.n_done:
            run.next_fresh = run.count
            run.retry_queue.extend(np.flatnonzero(~run.done).tolist())
        self._runs.append(run)
        self._check_complete(run)

    # -- sending batches ----------------------------------------------------------------------

    def _fill(self) -> None:
        capacity = self.backend.n_workers * BATCHES_PER_WORKER
        while len(self._inflight) < capacity and not self._stopping:
            run = self._next_run()
            if run is None:
                return
            self._send(run, self._take_batch(run))

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
        by_time = int(TARGET_BATCH_SECONDS / max(run.chunk_seconds, 1e-7))
        # Keep the tail balanced: never more than a share of what is left per worker.
        by_balance = -(-run.remaining() // (self.backend.n_workers * BATCHES_PER_WORKER))
        return max(1, min(by_time, by_balance, MAX_BATCH_CHUNKS))

    def _take_batch(self, run: Run) -> range | tuple[int, ...]:
        if run.retry_queue and run.retry_queue[0] in run.suspects:
            # A chunk of a batch lost with its worker, on a backend that can't tell which of
            # the batch's chunks was running (nor which batches were queued behind it on that
            # worker): retried alone, one at a time, it is charged only for its own death.
            run.probing = True
            return (run.retry_queue.popleft(),)
        size = self._batch_size(run)
        if run.retry_queue:
            take = min(size, len(run.retry_queue))
            return tuple(run.retry_queue.popleft() for _ in range(take))
        start = run.next_fresh
        run.next_fresh = min(run.count, start + size)
        return range(start, run.next_fresh)

    def _send(self, run: Run, indices: range | tuple[int, ...]) -> None:
        generation = self.backend.generation
        try:
            future = self.backend.submit(run_batch, run.spec_path, run.spec.token, indices)
        except Exception as exc:
            if self.backend.is_worker_loss(exc) and self.backend.can_recover:
                # The pool broke before this batch got in: replace it and send again later.
                self._requeue(run, indices)
                self._recover(generation)
                return
            self._fail(run, exc)
            return
        run.inflight += 1
        batch = _Batch(run, indices, generation)
        self._inflight[future] = batch
        future.add_done_callback(lambda f: self._events.put(("done", f)))

    def _requeue(self, run: Run, indices: Any) -> None:
        for i in reversed(list(indices)):
            if not run.done[i]:
                run.retry_queue.appendleft(int(i))

    # -- receiving results --------------------------------------------------------------------

    def _on_batch_done(self, future: Future[Any]) -> None:
        batch = self._inflight.pop(future, None)
        if batch is None:
            return
        run = batch.run
        run.inflight -= 1
        if len(batch.indices) == 1 and batch.indices[0] in run.suspects:
            run.probing = False
            if future.done() and not future.cancelled() and future.exception() is None:
                run.suspects.discard(batch.indices[0])
        exc: BaseException | None
        if future.cancelled():
            exc = None
            self._requeue(run, batch.indices)
        else:
            exc = future.exception()
        if exc is None and not future.cancelled():
            self._apply(run, batch, future.result())
        elif exc is not None:
            if self.backend.is_worker_loss(exc):
                self._on_worker_loss(batch, exc)
            else:
                self._fail(run, exc)
        self._check_complete(run)
        self._maybe_finalize(run)

    def _apply(self, run: Run, batch: _Batch, result: BatchResult) -> None:
        done = [i for i in result.done if not run.done[i]]
        if done:
            run.done[done] = True
            run.n_done += len(done)
            results = {i: result.results[i] for i in done if i in result.results}
            run.job._record(done, result.seconds, result.nbytes, results)
            if run.journal is not None:
                run.journal.mark(done)
        if result.seconds:
            mean = sum(result.seconds) / len(result.seconds)
            run.chunk_seconds = (
                mean if run.chunk_seconds is None else 0.5 * run.chunk_seconds + 0.5 * mean
            )
        if result.failure is not None:
            failed = result.failure.index
            if run.status is not None and 0 <= failed < run.count:
                # The worker left the failed chunk marked running; it is not, and its pid
                # must not be taken for that chunk's (an interrupt would kill it).
                run.status[1][failed] = PENDING
            self._fail(run, self._failure_error(run, result.failure))
            return
        # Chunks the worker skipped (the job was closed meanwhile) go back if it wasn't.
        if not run.closed and len(result.done) < len(batch.indices):
            self._requeue(run, [i for i in batch.indices if not run.done[i]])

    def _failure_error(self, run: Run, failure: ChunkFailure) -> BaseException:
        where = (
            f"chunk {failure.index} (region {failure.region}) of {run.count}"
            if failure.index >= 0
            else "the job"
        )
        remote = _RemoteTraceback(failure.traceback)
        if failure.kind == "kernel":
            exc: BaseException | None = None
            if failure.exception is not None:
                import pickle

                try:
                    exc = pickle.loads(failure.exception)
                except Exception:
                    exc = None
            if exc is not None and not isinstance(exc, Exception):
                # SystemExit or KeyboardInterrupt from a kernel (sys.exit() in it) must not
                # end or interrupt the parent: they become an ordinary error.
                exc = KernelError(
                    f"the kernel raised {failure.type_name}({failure.message}) in {where}; "
                    "a kernel should raise an exception rather than exit"
                )
            elif exc is None:
                exc = KernelError(
                    f"the kernel raised {failure.type_name}: {failure.message} in {where}; "
                    "the exception could not be sent from the worker, its traceback follows"
                )
            elif hasattr(exc, "add_note"):
                exc.add_note(f"raised by the kernel in {where}")
            exc.__cause__ = remote
            return exc
        if failure.kind == "storage":
            remedy = (
                "free some space there, or pass temp_dir= (MEMMAP_POOL_TEMP_DIR) or a .npy "
                "out= on a larger filesystem"
            )
            if run.journal is not None:
                remedy += "; resume=True then runs only the chunks that are missing"
            err: BaseException = NotEnoughSpaceError(
                f"{failure.message} in {where}; {remedy}", run.spec.output.path
            )
        elif failure.kind == "files":
            # A file of the job is missing, truncated or unreadable in the worker: an
            # OSError, with what the worker saw.
            err = OSError(f"{failure.message} ({failure.type_name})")
        else:
            err = SerializationError(f"{failure.message} ({failure.type_name}) in {where}")
        err.__cause__ = remote
        return err

    def _on_worker_loss(self, batch: _Batch, exc: BaseException) -> None:
        crash = self._crashes.get(batch.generation)
        codes, deliberate = crash if crash is not None else self._recover(batch.generation)
        run = batch.run
        culprits = {
            pid
            for pid, code in codes.items()
            if code not in (None, -signal.SIGTERM) and pid not in deliberate
        }
        # Nobody to blame: charge the running chunks, unless the loss is explained by a
        # worker we killed ourselves (a timeout or an interrupt of another job), in which
        # case the chunks that were running beside it are innocent.
        blame_all = not culprits and not deliberate
        status = run.status if self.backend.same_host else None
        charged: list[int] = []
        salvaged: list[int] = []
        for i in batch.indices:
            if run.done[i]:
                continue
            if status is None:
                if culprits or blame_all:
                    charged.append(i)
                    run.suspects.add(i)
                else:
                    run.retry_queue.appendleft(i)
                continue
            state, pids = status[1], status[2]
            s = int(state[i])
            if s == DONE:
                salvaged.append(i)
                continue
            state[i] = PENDING
            if s == RUNNING and (int(pids[i]) in culprits or blame_all):
                charged.append(i)
            else:
                run.retry_queue.appendleft(i)
        if salvaged:
            run.done[salvaged] = True
            run.n_done += len(salvaged)
            nbytes = sum(
                region_nbytes(run.spec.plan.slices(i), run.spec.output.dtype.itemsize)
                for i in salvaged
            )
            run.job._record(salvaged, [], nbytes, {})
            if run.journal is not None:
                run.journal.mark(salvaged)
        if run.closed or not charged:
            return
        exhausted = []
        for i in charged:
            n = run.attempts.get(i, 0) + 1
            run.attempts[i] = n
            # A user's executor can't be rebuilt by us: once broken, nothing can be retried.
            if n > run.retries or not self.backend.can_recover:
                exhausted.append(i)
            else:
                run.retry_queue.appendleft(i)
        with run.job._lock:
            run.job._retries += len(charged) - len(exhausted)
        lost = {pid: code for pid, code in codes.items() if pid in culprits} or codes
        if exhausted:
            self._fail(run, self._crash_error(run, exhausted, lost, exc))
        else:
            log.warning(
                "retrying chunk(s) %s of a job after a worker died (%s)",
                ", ".join(map(str, charged)),
                "; ".join(sorted({describe_exit(c) for c in lost.values()}))
                or self.backend.describe_loss(exc),
            )

    def _crash_error(
        self, run: Run, chunks: list[int], codes: dict[int, int | None], exc: BaseException
    ) -> WorkerCrashedError:
        plan = run.spec.plan
        names = ", ".join(
            f"chunk {i} (region {describe_region(plan.slices(i))})" for i in chunks[:5]
        ) + (f" and {len(chunks) - 5} more" if len(chunks) > 5 else "")
        exits = sorted({describe_exit(c) for c in codes.values()}) or [
            self.backend.describe_loss(exc)
        ]
        tries = run.retries + 1
        msg = (
            f"a worker died while running {names} of {run.count}, "
            f"{tries} time{'s' if tries > 1 else ''} (retries={run.retries}); "
            f"the worker ended with {'; '.join(exits)}"
        )
        err = WorkerCrashedError(
            msg, tuple(chunks), tuple(c for c in codes.values() if c is not None)
        )
        err.__cause__ = exc
        return err

    def _recover(self, generation: int) -> tuple[dict[int, int | None], set[int]]:
        codes = self.backend.recover(generation)
        deliberate = self._killed & set(codes)
        self._killed -= deliberate  # a pid can come back as another process later
        self._crashes[generation] = (codes, deliberate)
        self._crashes.pop(generation - 16, None)  # batches of old generations are all back
        return codes, deliberate

    # -- closing jobs -------------------------------------------------------------------------

    def _check_complete(self, run: Run) -> None:
        if run.closed or run.n_done < run.count:
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
                run.status[0][0] = 1
        self._maybe_finalize(run)

    def _interrupt(self, run: Run) -> None:
        self._close(run)
        # Only workers the pool can replace are killed: a user's executor would stay broken.
        if run.status is not None and self.backend.same_host and self.backend.can_recover:
            state, pids = run.status[1], run.status[2]
            for i in np.flatnonzero(state == RUNNING):
                pid = int(pids[i])
                if self.backend.kill(pid):
                    self._killed.add(pid)
        if not self.backend.same_host:
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
                value = run.finish()
            except BaseException as exc:  # pragma: no cover - e.g. a full disk at fsync
                error = exc
        try:
            if run.journal is not None:
                if run.succeeded and error is None:
                    run.journal.remove()  # every chunk is on disk: nothing left to resume
                else:
                    try:
                        run.journal.sync()
                    except OSError as exc:
                        # Marks not written only mean chunks computed again on resume.
                        log.warning("could not update the journal %s: %s", run.journal.path, exc)
                    run.journal.close()
            run.cleanup(run.succeeded and error is None)
        finally:
            run.status = None
            run.finalized.set()
            if run.succeeded:
                run.job._finish(value, error)
            else:
                run.job._mark_ended()

    # -- every TICK: progress, timeouts, journal --------------------------------------------

    def _tick(self, now: float) -> None:
        for run in list(self._runs):
            if run.closed:
                continue
            if run.journal is not None:
                try:
                    run.journal.sync()
                except OSError as exc:  # kept marked: written at the next tick that can
                    if not run.journal_failing:
                        log.warning("could not update the journal %s: %s", run.journal.path, exc)
                    run.journal_failing = True
            status = run.status
            if status is None:
                continue
            state = status[1]
            run.job._set_live_done(int(np.count_nonzero(state >= DONE)))
            if run.timeout is None or not self.backend.same_host:
                continue
            running = np.flatnonzero(state == RUNNING)
            if not running.size:
                continue
            late = running[now - status[3][running] > run.timeout]
            for i in late.tolist():
                self._on_timeout(run, int(i), int(status[2][i]))
                break

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


class _RemoteTraceback(Exception):
    """The worker's traceback, attached as ``__cause__`` of a re-raised kernel exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'
