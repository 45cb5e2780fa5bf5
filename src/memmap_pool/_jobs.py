"""Job: the future of one ``submit_chunks`` call, with its progress and statistics.

A job's state has one owner: the dispatcher, which tells the job what happened through
:meth:`Job._update` (chunks done, their timings, retries, live progress) and ends it through
:meth:`Job._finish`. The job asks the dispatcher to stop it through its :class:`JobControl`.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import cloudpickle

from ._signals import sigterm_as_exit
from .errors import SerializationError

log = logging.getLogger("memmap_pool")

INTERRUPT_CLEANUP_TIMEOUT = 10.0
"""After Ctrl-C or SIGTERM in :meth:`Job.wait`, seconds to wait for the job's workers to be
killed and its files removed before the exception propagates anyway."""

FAILURE_DRAIN_TIMEOUT = 2.0
"""After a job fails (a kernel exception, a timeout, a crash), seconds :meth:`Job.wait` lets
the job's chunks still running finish before it kills their workers and raises."""


class Progress(NamedTuple):
    """How far a job is: ``done`` of ``total`` chunks."""

    done: int
    total: int

    @property
    def fraction(self) -> float:
        """``done / total``, from 0.0 to 1.0 (1.0 for a job without chunks)."""
        return self.done / self.total if self.total else 1.0


@dataclass(frozen=True)
class JobStats:
    """Where a job's time went. Times are in seconds.

    Attributes:
        chunks: chunks in the job.
        chunks_done: chunks finished (including those found done by a resume).
        chunks_resumed: chunks a resume found already done, not run again.
        bytes_written: bytes of the output regions of finished chunks (including those a
            resume found done, counted in ``bytes_resumed``).
        wall_time: from submission to the end (or until now for a running job).
        chunk_time_min: fastest chunk, kernel call only.
        chunk_time_median: median chunk.
        chunk_time_max: slowest chunk.
        busy_time: sum of the kernel times of all chunks.
        workers: number of workers of the pool.
        utilisation: ``busy_time / (wall_time * workers)``, between 0 and 1: how much of the
            pool the job kept busy in kernels (the rest is overhead, waiting, other jobs).
        retries: chunks re-run after a worker died.
        bytes_resumed: bytes of the chunks a resume found already done.
    """

    chunks: int
    chunks_done: int
    chunks_resumed: int
    bytes_written: int
    wall_time: float
    chunk_time_min: float
    chunk_time_median: float
    chunk_time_max: float
    busy_time: float
    workers: int
    utilisation: float
    retries: int
    bytes_resumed: int = 0

    @property
    def throughput(self) -> float:
        """Bytes written by this run per second of wall time (chunks a resume found done
        are not counted: they cost nothing)."""
        written = self.bytes_written - self.bytes_resumed
        return written / self.wall_time if self.wall_time > 0 else 0.0


class JobControl(Protocol):
    """What a job can ask of whoever runs it (the dispatcher)."""

    @property
    def kills_workers(self) -> bool:
        """Whether :meth:`interrupt` kills the workers running the job's chunks."""
        ...

    def cancel(self) -> None:
        """Start no further chunk of the job."""
        ...

    def interrupt(self) -> None:
        """Stop the job now: cancel it and kill the workers running its chunks."""
        ...

    def wait_released(self, timeout: float) -> bool:
        """Wait until no chunk of the job runs and its files are removed; False on timeout."""
        ...


@dataclass(frozen=True)
class ChunkReport:
    """What the dispatcher tells a job: chunks finished since the last report, and more."""

    done: Sequence[int] = ()
    seconds: Sequence[float] = ()
    nbytes: int = 0
    results: dict[int, bytes] = field(default_factory=dict)
    retried: int = 0  # chunks re-run after their worker died
    live_done: int | None = None  # chunks the status file shows done, ahead of batch results


class Job(Future):  # type: ignore[type-arg]
    """The future of a chunked job; its result is the output array.

    It works with ``concurrent.futures.wait`` and ``as_completed``. Unlike a plain future,
    ``cancel()`` also stops a job that is running: chunks not started are dropped, chunks
    being computed finish, and ``result()`` raises ``CancelledError``. :meth:`wait` waits for
    the result as ``map_chunks`` does: Ctrl-C or SIGTERM while waiting stops the job.
    """

    def __init__(
        self,
        count: int,
        workers: int,
        name: str = "",
        *,
        resumed: int = 0,
        resumed_bytes: int = 0,
    ) -> None:
        super().__init__()
        self.name = name
        self._count = count
        self._workers = workers
        self._lock = threading.Lock()
        self._done = resumed
        self._resumed = resumed
        self._bytes = resumed_bytes
        self._bytes_resumed = resumed_bytes
        self._retries = 0
        self._seconds: list[float] = []
        self._results: dict[int, bytes] = {}
        self._started = time.perf_counter()
        self._ended: float | None = None
        # Chunks seen done in the status file, ahead of batch results. The status file is
        # fresh for each run, so it never counts the chunks a resume found done.
        self._live_done = 0
        self._control: JobControl | None = None
        self._on_progress: list[Callable[[Progress], None]] = []

    def __repr__(self) -> str:
        p = self.progress
        name = f" {self.name}" if self.name else ""
        return f"<Job{name} {p.done}/{p.total} chunks, {self._state.lower()}>"

    # -- progress and statistics --------------------------------------------------------------

    @property
    def progress(self) -> Progress:
        """Chunks done and total, updated while the job runs."""
        with self._lock:
            done = max(self._done, self._live_done + self._resumed)
            return Progress(min(done, self._count), self._count)

    @property
    def stats(self) -> JobStats:
        """Statistics of the job so far (final once the job is done)."""
        with self._lock:
            seconds = list(self._seconds)
            end = self._ended if self._ended is not None else time.perf_counter()
            wall = end - self._started
            busy = float(sum(seconds))
            return JobStats(
                chunks=self._count,
                chunks_done=self._done,
                chunks_resumed=self._resumed,
                bytes_written=self._bytes,
                wall_time=wall,
                chunk_time_min=min(seconds) if seconds else 0.0,
                chunk_time_median=statistics.median(seconds) if seconds else 0.0,
                chunk_time_max=max(seconds) if seconds else 0.0,
                busy_time=busy,
                workers=self._workers,
                utilisation=min(1.0, busy / (wall * self._workers)) if wall > 0 else 0.0,
                retries=self._retries,
                bytes_resumed=self._bytes_resumed,
            )

    def chunk_results(self, timeout: float | None = None) -> list[Any]:
        """The values the kernel returned, one per chunk in chunk order (None where it
        returned nothing). Waits for the job like ``result()`` and raises what it raises.

        These values are pickled in the worker and sent to the parent: keep them small (a
        sum, a count, a histogram), never arrays the size of a chunk. Chunks that a resume
        found already done were not run, so their entry is None.

        Raises:
            SerializationError: a value could not be unpickled in this process.

        Example:
            >>> def total(out, chunk):  # doctest: +SKIP
            ...     out[:] = 1.0
            ...     return float(out.sum())
            >>> job = pool.submit_chunks(total, (10**9,), "float32")  # doctest: +SKIP
            >>> sum(job.chunk_results())  # doctest: +SKIP
            1000000000.0
        """
        self.result(timeout)
        with self._lock:
            payloads = dict(self._results)
        values: list[Any] = [None] * self._count
        for i, payload in payloads.items():
            try:
                values[i] = cloudpickle.loads(payload)
            except Exception as exc:
                msg = (
                    f"the value chunk {i} of job {self.name!r} returned was pickled in its "
                    f"worker but can't be unpickled here ({type(exc).__name__}: {exc}); return "
                    "plain data (numbers, tuples, small numpy arrays)"
                )
                raise SerializationError(msg) from exc
        return values

    def add_progress_callback(self, fn: Callable[[Progress], None]) -> None:
        """Call ``fn(progress)`` each time chunks finish.

        ``fn`` runs in the pool's dispatcher thread, so it must be quick and must not wait
        for a job; an exception it raises is logged and otherwise ignored. A job that is
        already done calls ``fn`` once, at once, with its final progress.
        """
        self._on_progress.append(fn)
        if self.done():
            self._call_progress(fn, self.progress)

    # -- waiting and cancelling ---------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the job and return its result, stopping it if the wait is interrupted.

        This is how ``map_chunks`` and the command line wait. Ctrl-C (``KeyboardInterrupt``)
        or SIGTERM (in the main thread, where no other handler is installed) while waiting
        cancels the job, kills the workers running its chunks, removes its temporary files
        (a ``.npy`` output keeps its finished chunks and journal, for ``resume=True``) and
        re-raises (SIGTERM as ``SystemExit(143)``). When the job fails, the chunks still
        running get a moment to finish, then their workers are killed: once ``wait`` has
        raised, nothing writes into the output any more.

        Args:
            timeout: seconds to wait; None waits as long as the job runs.

        Raises:
            TimeoutError: the job did not end within ``timeout`` (it goes on running).
            CancelledError: the job was cancelled.
            Exception: what the job raised (see ``map_chunks``).
        """
        with sigterm_as_exit():
            try:
                return self.result(timeout)
            except FutureTimeoutError:
                raise
            except (KeyboardInterrupt, SystemExit):
                control = self._control
                if control is not None:
                    self.cancel()
                    control.interrupt()
                    control.wait_released(INTERRUPT_CLEANUP_TIMEOUT)
                raise
            except BaseException:
                control = self._control
                if (
                    control is not None
                    and control.kills_workers
                    and not control.wait_released(FAILURE_DRAIN_TIMEOUT)
                ):
                    control.interrupt()
                    control.wait_released(INTERRUPT_CLEANUP_TIMEOUT)
                raise

    def cancel(self) -> bool:
        """Cancel the job, running or not. Returns False only if it already finished."""
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._state = CANCELLED
            self._condition.notify_all()
        # Tell waiters of concurrent.futures.wait/as_completed at once, as an executor does
        # when it picks up a cancelled future.
        self.set_running_or_notify_cancel()
        self._mark_ended()
        control = self._control
        if control is not None:
            control.cancel()
        p = self.progress
        log.info("job %s: cancelled with %d of %d chunks done", self.name, p.done, p.total)
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    def set_running_or_notify_cancel(self) -> bool:
        # A job can be cancelled at any time, so the dispatcher may find it already
        # cancelled-and-notified, which the base class reports as a critical error.
        with self._condition:
            if self._state == CANCELLED_AND_NOTIFIED:
                return False
        return super().set_running_or_notify_cancel()

    def result(self, timeout: float | None = None) -> Any:
        """The output array once every chunk is done; raises what the job raised, or
        ``CancelledError`` for a cancelled job (see ``concurrent.futures.Future.result``)."""
        try:
            return super().result(timeout)
        except CancelledError:
            what = f"job {self.name!r}" if self.name else "the job"
            raise CancelledError(f"{what} was cancelled") from None

    # -- called by the dispatcher -------------------------------------------------------------

    def _attach(self, control: JobControl) -> None:
        self._control = control

    def _update(self, report: ChunkReport) -> None:
        """Take what the dispatcher saw happen; the one way the job's counters change."""
        with self._lock:
            changed = bool(report.done)
            self._done += len(report.done)
            self._seconds.extend(report.seconds)
            self._bytes += report.nbytes
            self._results.update(report.results)
            self._retries += report.retried
            if report.live_done is not None and report.live_done > self._live_done:
                self._live_done = report.live_done
                changed = True
        if changed:
            self._notify_progress()

    def _mark_ended(self) -> None:
        with self._lock:
            if self._ended is None:
                self._ended = time.perf_counter()

    def _notify_progress(self) -> None:
        if self._on_progress:
            p = self.progress
            for fn in list(self._on_progress):
                self._call_progress(fn, p)

    def _call_progress(self, fn: Callable[[Progress], None], p: Progress) -> None:
        # The dispatcher calls this: a failing callback must not stop the job's bookkeeping.
        try:
            fn(p)
        except Exception:
            log.exception("progress callback %r of job %s raised", fn, self.name)

    def _finish(self, value: Any = None, error: BaseException | None = None) -> None:
        """End the job with its result or error (a cancelled job stays cancelled)."""
        self._mark_ended()
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
                return
        try:
            if error is not None:
                self.set_exception(error)
            else:
                self.set_result(value)
        except InvalidStateError:
            return  # cancelled in the meantime: the cancellation wins
        if error is not None:
            log.info("job %s: failed: %s: %s", self.name, type(error).__name__, error)
        elif log.isEnabledFor(logging.INFO):
            st = self.stats
            log.info(
                "job %s: done, %d chunks in %.3f s (%.3f GB/s, workers %.0f%% busy in kernels)",
                self.name,
                st.chunks,
                st.wall_time,
                st.throughput / 1e9,
                100 * st.utilisation,
            )
