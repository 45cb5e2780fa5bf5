"""Job: the future of one ``submit_chunks`` call, with its progress and statistics."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from dataclasses import dataclass
from typing import Any, NamedTuple

import cloudpickle

log = logging.getLogger("memmap_pool")


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


class Job(Future):  # type: ignore[type-arg]
    """The future of a chunked job; its result is the output array.

    It works with ``concurrent.futures.wait`` and ``as_completed``. Unlike a plain future,
    ``cancel()`` also stops a job that is running: chunks not started are dropped, chunks
    being computed finish, and ``result()`` raises ``CancelledError``.
    """

    def __init__(self, count: int, workers: int, name: str = "") -> None:
        super().__init__()
        self.name = name
        self._count = count
        self._workers = workers
        self._lock = threading.Lock()
        self._done = 0
        self._resumed = 0
        self._bytes = 0
        self._bytes_resumed = 0
        self._retries = 0
        self._seconds: list[float] = []
        self._results: dict[int, bytes] = {}
        self._started = time.perf_counter()
        self._ended: float | None = None
        # Chunks seen done in the status file, ahead of batch results. The status file is
        # fresh for each run, so it never counts the chunks a resume found done.
        self._live_done = 0
        self._on_cancel: Callable[[], None] | None = None
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
            return [
                cloudpickle.loads(self._results[i]) if i in self._results else None
                for i in range(self._count)
            ]

    def add_progress_callback(self, fn: Callable[[Progress], None]) -> None:
        """Call ``fn(progress)`` each time chunks finish.

        ``fn`` runs in the pool's dispatcher thread, so it must be quick and must not wait
        for a job; an exception it raises is logged and otherwise ignored. A job that is
        already done calls ``fn`` once, at once, with its final progress.
        """
        self._on_progress.append(fn)
        if self.done():
            self._call_progress(fn, self.progress)

    # -- cancellation -------------------------------------------------------------------------

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
        hook = self._on_cancel
        if hook is not None:
            hook()
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

    def _mark_ended(self) -> None:
        with self._lock:
            if self._ended is None:
                self._ended = time.perf_counter()

    def _record(
        self, indices: list[int], seconds: list[float], nbytes: int, results: dict[int, bytes]
    ) -> None:
        with self._lock:
            self._done += len(indices)
            self._seconds.extend(seconds)
            self._bytes += nbytes
            self._results.update(results)
        self._notify_progress()

    def _record_resumed(self, n: int, nbytes: int) -> None:
        with self._lock:
            self._done += n
            self._resumed += n
            self._bytes += nbytes
            self._bytes_resumed += nbytes

    def _set_live_done(self, n: int) -> None:
        with self._lock:
            changed = n > self._live_done
            self._live_done = max(self._live_done, n)
        if changed:
            self._notify_progress()

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
