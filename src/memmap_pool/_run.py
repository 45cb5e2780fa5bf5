"""The dispatcher's state for one job: which chunks are done, queued, retried or suspect."""

from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ._jobs import ChunkReport, Job
from ._protocol import JobSpec, StatusFile
from ._reduce import Fold
from ._resume import Journal, JournalGroup
from ._stepfiles import StepControl

if TYPE_CHECKING:
    from ._dispatch import Dispatcher


class RunFiles(Protocol):
    """What the dispatcher needs of a job's files (:class:`._jobfiles.JobFiles`)."""

    spec: JobSpec
    spec_path: str
    spec_inode: int
    status: StatusFile | None
    journal: Journal | JournalGroup | None
    done: np.ndarray[Any, Any]

    def result(self) -> tuple[Any, ...]: ...

    def cleanup(self, succeeded: bool) -> None: ...


@dataclass(eq=False)
class Run:
    """The dispatcher's state for one job (only the dispatcher thread changes it)."""

    job: Job
    files: RunFiles
    retries: int
    timeout: float | None
    single_output: bool = True  # the job returns one array, not a tuple
    fold: Fold | None = None  # a reduction: its partial results, folded as they arrive
    steps: StepControl | None = None  # an iterate run: the steps, one round of chunks each
    live_offset: int = 0  # chunks of the steps already complete, for progress
    done: np.ndarray[Any, Any] = field(init=False)  # bool per chunk
    next_fresh: int = 0  # chunks below this were sent at least once
    retry_queue: deque[int] = field(default_factory=deque)
    attempts: dict[int, int] = field(default_factory=dict)
    suspects: set[int] = field(default_factory=set)  # retried alone (see _blame)
    probing: bool = False  # a suspect is being retried
    inflight: int = 0
    n_done: int = 0
    closed: bool = False  # outcome decided (success, failure or cancel)
    succeeded: bool = False
    chunk_seconds: float | None = None  # running estimate, for batch sizing
    journal_failing: bool = False  # a journal update failed (logged once)
    finalized: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.done = self.files.done.copy()
        self.n_done = int(self.done.sum())
        if self.n_done:
            # Chunks a resume found done are not sent again.
            self.next_fresh = self.count
            self.retry_queue.extend(np.flatnonzero(~self.done).tolist())

    @property
    def spec(self) -> JobSpec:
        return self.files.spec

    @property
    def status(self) -> StatusFile | None:
        return self.files.status

    @property
    def journal(self) -> Journal | JournalGroup | None:
        return self.files.journal

    @property
    def count(self) -> int:
        return self.spec.plan.count

    # -- what to send next ---------------------------------------------------------------------

    def has_pending(self) -> bool:
        if self.closed:
            return False
        if self.retry_queue and self.retry_queue[0] in self.suspects and self.probing:
            return False  # one suspect at a time
        return bool(self.retry_queue) or self.next_fresh < self.count

    def remaining(self) -> int:
        return len(self.retry_queue) + self.count - self.next_fresh

    def take_batch(self, size: int) -> range | tuple[int, ...]:
        """The next chunks to send: a suspect alone, else retries, else fresh chunks."""
        if self.retry_queue and self.retry_queue[0] in self.suspects:
            self.probing = True
            return (self.retry_queue.popleft(),)
        if self.retry_queue:
            # Retries in bulk, up to the first suspect: a suspect only ever goes alone.
            taken: list[int] = []
            queue = self.retry_queue
            while queue and len(taken) < size and queue[0] not in self.suspects:
                taken.append(queue.popleft())
            return tuple(taken)
        start = self.next_fresh
        self.next_fresh = min(self.count, start + size)
        return range(start, self.next_fresh)

    def requeue(self, indices: Any) -> None:
        """Send these chunks again (before anything else), except those done meanwhile."""
        for i in reversed(list(indices)):
            if not self.done[i]:
                self.retry_queue.appendleft(int(i))

    # -- what came back ------------------------------------------------------------------------

    def record_done(
        self,
        indices: list[int],
        seconds: list[float] | None = None,
        nbytes: int | None = None,
        results: dict[int, bytes] | None = None,
    ) -> None:
        """Mark chunks done, journal them and tell the job."""
        fresh = [i for i in indices if not self.done[i]]
        if not fresh:
            return
        self.done[fresh] = True
        self.n_done += len(fresh)
        if nbytes is None:
            plan = self.spec.plan
            nbytes = plan.chunks_nbytes(fresh, plan.itemsize)  # all outputs' bytes
        picked = {i: results[i] for i in fresh if i in results} if results else {}
        if self.steps is not None:
            picked = {}  # a step kernel's return value means nothing
        if self.fold is not None:
            self.fold.add(picked)  # not kept by the job: folded, then dropped
            picked = {}
        self.job._update(ChunkReport(fresh, seconds or (), nbytes, picked))
        if self.journal is not None:
            self.journal.mark(fresh)

    def start_next_step(self) -> None:
        """Every chunk of the step is done: the next step's chunks are all to do."""
        self.live_offset += self.count
        self.done[:] = False
        self.n_done = 0
        self.next_fresh = 0
        self.retry_queue.clear()
        self.attempts.clear()
        self.suspects.clear()
        self.probing = False

    def observe_seconds(self, seconds: list[float]) -> None:
        """Update the per-chunk time estimate that sizes batches."""
        if seconds:
            mean = sum(seconds) / len(seconds)
            old = self.chunk_seconds
            self.chunk_seconds = mean if old is None else 0.5 * old + 0.5 * mean

    def result(self) -> Any:
        if self.fold is not None:
            return self.fold.result()
        results = self.files.result()
        return results[0] if self.single_output else results


class RunControl:
    """A job's handle on its run (the :class:`._jobs.JobControl` of a job).

    It holds the run only weakly: a job whose result was dropped frees its file at once,
    and the dispatcher holds the run until the job's files are removed (finalized), so a
    dead reference means there is nothing left to wait for.
    """

    def __init__(self, run: Run, dispatcher: Dispatcher) -> None:
        self._run = weakref.ref(run)
        self._dispatcher = dispatcher
        self.kills_workers = dispatcher.backend.capabilities.can_kill_workers

    def cancel(self) -> None:
        run = self._run()
        if run is not None:
            self._dispatcher.cancel(run)

    def interrupt(self) -> None:
        run = self._run()
        if run is not None:
            self._dispatcher.interrupt(run)

    def wait_released(self, timeout: float) -> bool:
        run = self._run()
        return run is None or run.finalized.wait(timeout)
