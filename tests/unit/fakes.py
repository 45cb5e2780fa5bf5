"""Test doubles for driving the dispatcher without processes, threads or sleeps.

- :class:`FakeBackend` records every batch it is given and returns a plain ``Future`` that
  the test completes itself (a result, a worker loss, anything).
- :class:`FakeClock` is the dispatcher's clock; the test moves it.
- :class:`FakeFiles` stands in for a job's files: a real plan and spec, an in-memory status
  file, optionally a real journal, and a sentinel result.
- :class:`Rig` puts them together around a ``Dispatcher(threaded=False)``.
"""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memmap_pool._chunks import plan_chunks
from memmap_pool._dispatch import Dispatcher
from memmap_pool._jobs import Job
from memmap_pool._protocol import (
    Batch,
    BatchResult,
    ChunkFailure,
    FailureKind,
    JobSpec,
    StatusFile,
)
from memmap_pool._resume import Journal
from memmap_pool._run import Run, RunControl
from memmap_pool._storage import ArrayRef, contiguous_strides
from memmap_pool.backends import Backend, Capabilities

LOCAL = Capabilities(
    shares_page_cache=True, can_kill_workers=True, replaces_lost_workers=True, owned_by_pool=True
)
"""Like the pool's own processes: a status file, workers it kills and replaces."""

CLUSTER = Capabilities(
    shares_page_cache=False, can_kill_workers=False, replaces_lost_workers=True, owned_by_pool=False
)
"""Like Dask: workers on other hosts (no status file), replaced by the cluster."""

USER_EXECUTOR = Capabilities(
    shares_page_cache=True, can_kill_workers=False, replaces_lost_workers=False, owned_by_pool=False
)
"""Like a user's ProcessPoolExecutor: a status file, but nothing killed or replaced."""

DUMMY_DIR = "/nonexistent/unit-job-files"
"""Where the fake files claim to live; nothing ever opens them."""

_tokens = itertools.count()


class WorkerLost(Exception):
    """A worker loss as a cluster reports it: not a ``BrokenProcessPool``."""


@dataclass
class Sent:
    """One batch the dispatcher submitted, with the future the test completes."""

    fn: Callable[..., Any]
    batch: Batch
    future: Future[Any]

    @property
    def indices(self) -> list[int]:
        return list(self.batch.indices)

    @property
    def token(self) -> str:
        return self.batch.token

    @property
    def pending(self) -> bool:
        return not self.future.done()

    def succeed(
        self,
        done: Sequence[int] | None = None,
        seconds: float | Sequence[float] = 0.001,
        pid: int = 4242,
        results: dict[int, bytes] | None = None,
    ) -> None:
        """Complete the batch: ``done`` (default: every chunk) ran, each in ``seconds``."""
        ran = self.indices if done is None else list(done)
        if isinstance(seconds, (int, float)):
            times = [float(seconds)] * len(ran)
        else:
            times = [float(s) for s in seconds]
        self.future.set_result(
            BatchResult(
                pid=pid, done=ran, seconds=times, nbytes=8 * len(ran), results=results or {}
            )
        )

    def fail(self, failure: ChunkFailure, done: Sequence[int] = (), pid: int = 4242) -> None:
        """Complete the batch with a worker's report of a failure after ``done``."""
        ran = list(done)
        self.future.set_result(
            BatchResult(pid=pid, done=ran, seconds=[0.001] * len(ran), failure=failure)
        )

    def lose(self, exc: BaseException | None = None) -> None:
        """The batch's worker was lost (default: the process pool broke)."""
        self.future.set_exception(exc if exc is not None else BrokenProcessPool("a worker died"))


def kernel_failure(index: int, exc: BaseException | None, region: str = "[?]") -> ChunkFailure:
    """What a worker reports when the kernel raised ``exc`` on chunk ``index`` (``exc`` None:
    the exception could not be pickled)."""
    return ChunkFailure(
        index=index,
        region=region,
        kind=FailureKind.KERNEL,
        exception=None if exc is None else pickle.dumps(exc),
        type_name=type(exc).__name__ if exc is not None else "Unpicklable",
        message=str(exc) if exc is not None else "cannot be sent",
        traceback="Traceback (most recent call last):\n  in the kernel\n",
    )


class FakeBackend(Backend):
    """A backend whose batches never run: the test completes their futures."""

    def __init__(
        self,
        n_workers: int = 2,
        capabilities: Capabilities = LOCAL,
        loss_types: tuple[type[BaseException], ...] = (BrokenProcessPool,),
    ) -> None:
        self.n_workers = n_workers
        self.capabilities = capabilities
        self.generation = 0
        self.loss_types = loss_types
        self.exit_codes: dict[int, int | None] = {}  # what recover() reports, by pid
        self.kill_succeeds = True
        self.submit_errors: list[BaseException] = []  # raised by the next submit()s, one each
        self.sent: list[Sent] = []
        self.recovered: list[int] = []  # the generation of each recover() call
        self.killed: list[int] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self.submit_errors:
            raise self.submit_errors.pop(0)
        (batch,) = args
        assert isinstance(batch, Batch)
        future: Future[Any] = Future()
        self.sent.append(Sent(fn, batch, future))
        return future

    def is_worker_loss(self, exc: BaseException) -> bool:
        return isinstance(exc, self.loss_types)

    def recover(self, generation: int) -> dict[int, int | None]:
        self.recovered.append(generation)
        self.generation += 1
        return dict(self.exit_codes)

    def kill(self, pid: int) -> bool:
        self.killed.append(pid)
        return self.kill_succeeds

    # -- for the tests -------------------------------------------------------------------------

    def pending(self, token: str | None = None) -> list[Sent]:
        """Batches not completed yet, oldest first (of one job if ``token`` is given)."""
        return [s for s in self.sent if s.pending and (token is None or s.token == token)]

    def sent_indices(self, token: str | None = None) -> list[list[int]]:
        return [s.indices for s in self.sent if token is None or s.token == token]


class FakeClock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeFiles:
    """A job's files as the dispatcher sees them (see ``RunFiles``), in memory.

    The plan is a real one over ``shape`` (by default ``count`` chunks of one row each), the
    outputs point into a directory that does not exist (or into ``output_dir``), and
    ``result()`` returns one fresh sentinel per output. ``flush``: the outputs are
    persistent, as ``.npy`` outputs are.
    """

    def __init__(
        self,
        count: int = 8,
        *,
        shape: tuple[int, ...] | None = None,
        chunks: object = 1,
        n_outputs: int = 1,
        status: bool = True,
        journal_dir: Path | None = None,
        done: Sequence[int] = (),
        output_dir: Path | None = None,
        flush: bool = False,
    ) -> None:
        dtype = np.dtype(np.float64)
        shape = (count,) if shape is None else shape
        plan = plan_chunks(shape, dtype, "C", chunks)
        self.token = f"job{next(_tokens)}"
        outputs = tuple(
            ArrayRef(
                f"{output_dir or DUMMY_DIR}/out{k}-{self.token}.bin",
                0,
                dtype,
                shape,
                contiguous_strides(shape, dtype.itemsize, "C"),
            )
            for k in range(n_outputs)
        )
        self.spec = JobSpec(
            token=self.token,
            plan=plan,
            outputs=outputs,
            order="C",
            inputs=(),
            kernel=b"",
            status_path=None,
            flush=flush,
        )
        self.spec_path = f"{DUMMY_DIR}/spec-{self.token}.pkl"
        self.spec_inode = 1000 + len(self.token)
        self.status: StatusFile | None = StatusFile.in_memory(plan.count) if status else None
        self.journal: Journal | None = None
        if journal_dir is not None:
            self.journal = Journal.create(
                str(journal_dir / f"{self.token}.journal"), plan.fingerprint()
            )
        self.done = np.zeros(plan.count, dtype=bool)
        self.done[list(done)] = True
        self.results = tuple(object() for _ in range(n_outputs))
        self.cleanups: list[bool] = []

    @property
    def count(self) -> int:
        return self.spec.plan.count

    def result(self) -> tuple[Any, ...]:
        return self.results

    def cleanup(self, succeeded: bool) -> None:
        self.cleanups.append(succeeded)


class Rig:
    """A dispatcher without a thread, on a fake backend and clock."""

    def __init__(
        self,
        n_workers: int = 2,
        capabilities: Capabilities = LOCAL,
        loss_types: tuple[type[BaseException], ...] = (BrokenProcessPool,),
    ) -> None:
        self.backend = FakeBackend(n_workers, capabilities, loss_types)
        self.clock = FakeClock()
        self.dispatcher = Dispatcher(self.backend, clock=self.clock, threaded=False)

    def run(
        self,
        files: FakeFiles | None = None,
        *,
        retries: int = 2,
        timeout: float | None = None,
        single_output: bool = True,
    ) -> Run:
        """A run of a new job over ``files``, attached to the dispatcher like the pool does
        (not added yet)."""
        files = files if files is not None else FakeFiles()
        resumed = int(files.done.sum())
        job = Job(files.count, self.backend.n_workers, files.token, resumed=resumed)
        run = Run(job, files, retries, timeout, single_output)
        job._attach(RunControl(run, self.dispatcher))
        return run

    def add(self, files: FakeFiles | None = None, **kwargs: Any) -> Run:
        """Add a new job and let the dispatcher take it (one step)."""
        run = self.run(files, **kwargs)
        self.dispatcher.add(run)
        self.step()
        return run

    def step(self) -> bool:
        return self.dispatcher.step()

    def tick(self, seconds: float = 1.0) -> bool:
        """Move the clock by ``seconds`` (at least a tick), then step."""
        self.clock.advance(seconds)
        return self.step()

    def pending(self, run: Run | None = None) -> list[Sent]:
        return self.backend.pending(None if run is None else run.spec.token)

    def finish_all(self, run: Run | None = None, limit: int = 10_000) -> None:
        """Complete every batch sent (and every batch sent in answer) until none is left."""
        for _ in range(limit):
            pending = self.pending(run)
            if not pending:
                return
            pending[0].succeed()
            self.step()
        raise AssertionError("batches kept coming")


def files_of(run: Run) -> FakeFiles:
    files = run.files
    assert isinstance(files, FakeFiles)
    return files


def status_of(run: Run) -> StatusFile:
    status = run.status
    assert status is not None
    return status
