"""Who is to blame when a batch fails, and the error the user sees.

A lost worker takes its batch down with it, and, on a process pool, every batch in flight:
most of those chunks are innocent. Two ways to tell which chunk killed its worker:

- **From the status file** (workers on this host): each chunk's state and the pid running
  it are in shared memory. Chunks done are salvaged, chunks running in a worker that died
  of something other than a kill by the pool are charged a retry, the rest are requeued
  free of charge.
- **By probing** (workers on other hosts, no status file): the chunks of a lost batch
  become suspects, each charged once, and are retried alone, one at a time, so that a
  suspect that dies again is charged only for its own death.
"""

from __future__ import annotations

import pickle
import signal
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._chunks import ChunkPlan, describe_region
from ._protocol import ChunkFailure, ChunkState, FailureKind, StatusFile
from .errors import KernelError, NotEnoughSpaceError, SerializationError, WorkerCrashedError

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
class LossVerdict:
    """What a lost batch's chunks become."""

    charged: list[int] = field(default_factory=list)  # a retry is counted against them
    salvaged: list[int] = field(default_factory=list)  # they finished before the loss
    requeued: list[int] = field(default_factory=list)  # innocent: run again for free


def judge_loss(
    indices: range | tuple[int, ...],
    done: np.ndarray[Any, Any],
    status: StatusFile | None,
    culprits: set[int],
    deliberate: set[int],
) -> LossVerdict:
    """Sort the chunks of a batch lost with a worker (see the module docstring).

    ``culprits`` are the pids of workers that died of their own accord, ``deliberate`` those
    the pool killed itself (a timeout or an interrupt of another job). With neither known,
    every chunk that was running is charged.
    """
    verdict = LossVerdict()
    blame_all = not culprits and not deliberate
    for i in indices:
        if done[i]:
            continue
        if status is None:
            (verdict.charged if culprits or blame_all else verdict.requeued).append(i)
            continue
        state = status.state(i)
        if state == ChunkState.DONE:
            verdict.salvaged.append(i)
            continue
        # DONE_WITH_RESULT: its value was in the lost batch's reply; it runs again for it.
        status.reset(i)
        if state == ChunkState.RUNNING and (status.pid(i) in culprits or blame_all):
            verdict.charged.append(i)
        else:
            verdict.requeued.append(i)
    return verdict


def crash_error(
    plan: ChunkPlan,
    chunks: list[int],
    retries: int,
    exit_descriptions: list[str],
    codes: tuple[int, ...],
    cause: BaseException,
) -> WorkerCrashedError:
    names = ", ".join(
        f"chunk {i} (region {describe_region(plan.slices(i))})" for i in chunks[:5]
    ) + (f" and {len(chunks) - 5} more" if len(chunks) > 5 else "")
    tries = retries + 1
    msg = (
        f"a worker died while running {names} of {plan.count}, "
        f"{tries} time{'s' if tries > 1 else ''} (retries={retries}); "
        f"the worker ended with {'; '.join(exit_descriptions)}"
    )
    err = WorkerCrashedError(msg, tuple(chunks), codes)
    err.__cause__ = cause
    return err


def failure_error(
    failure: ChunkFailure, count: int, output_path: str, resumable: bool
) -> BaseException:
    """The exception a job raises for a worker's :class:`ChunkFailure`."""
    where = (
        f"chunk {failure.index} (region {failure.region}) of {count}"
        if failure.index >= 0
        else "the job"
    )
    remote = RemoteTraceback(failure.traceback)
    if failure.kind is FailureKind.KERNEL:
        return _kernel_error(failure, where, remote)
    err: BaseException
    if failure.kind is FailureKind.STORAGE:
        remedy = (
            "free some space there, or pass temp_dir= (MEMMAP_POOL_TEMP_DIR) or a .npy "
            "out= on a larger filesystem"
        )
        if resumable:
            remedy += "; resume=True then runs only the chunks that are missing"
        err = NotEnoughSpaceError(f"{failure.message} in {where}; {remedy}", output_path)
    elif failure.kind is FailureKind.FILES:
        # A file of the job is missing, truncated or unreadable in the worker: an OSError,
        # with what the worker saw.
        err = OSError(f"{failure.message} ({failure.type_name})")
    else:
        err = SerializationError(f"{failure.message} ({failure.type_name}) in {where}")
    err.__cause__ = remote
    return err


def _kernel_error(failure: ChunkFailure, where: str, remote: BaseException) -> BaseException:
    exc: BaseException | None = None
    if failure.exception is not None:
        try:
            exc = pickle.loads(failure.exception)
        except Exception:
            exc = None
    if exc is not None and not isinstance(exc, Exception):
        # SystemExit or KeyboardInterrupt from a kernel (sys.exit() in it) must not end or
        # interrupt the parent: they become an ordinary error.
        exc = KernelError(
            f"the kernel raised {failure.type_name}({failure.message}) in {where}; "
            "a kernel should raise an exception rather than exit"
        )
    elif exc is None:
        exc = KernelError(
            f"the kernel raised {failure.type_name}: {failure.message} in {where}; "
            "the exception could not be sent from the worker, its traceback follows"
        )
    else:
        exc.add_note(f"raised by the kernel in {where}")
    exc.__cause__ = remote
    return exc


class RemoteTraceback(Exception):
    """The worker's traceback, attached as ``__cause__`` of a re-raised kernel exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'
