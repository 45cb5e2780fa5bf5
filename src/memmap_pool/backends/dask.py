"""Run a pool's jobs on a Dask distributed cluster.

``MemmapPool.from_dask(client_or_address, shared_dir=...)`` puts a :class:`DaskBackend` under
the usual dispatcher. Nothing about a job changes: the dispatcher sends the same batches
(spec file path, job token, chunk indices: a few dozen bytes) as Dask tasks, and each Dask
worker maps the job's files in ``shared_dir`` and writes its chunks' regions::

    parent: MemmapPool + dispatcher          Dask scheduler            Dask workers (any host)
    files in shared_dir ── batch tasks ───▶  places tasks     ───▶     run_batch: map files,
                                                                       kernel, msync each chunk
                        ◀── BatchResult (indices, timings) ──────────  (no array data)

What differs from a local pool, because the workers may be on other hosts:

- There is no status file: the parent learns about chunks when their batch returns, so
  progress moves per batch, and when a worker is lost every unfinished chunk of its batch is
  charged one retry.
- Workers flush (msync) each chunk before reporting it, since another host only sees the
  data once it has reached the shared filesystem.
- The pool can't kill a remote worker, so per-chunk timeouts are not available.
- Dask restarts lost workers itself (through their nanny) and re-runs their tasks up to its
  ``distributed.scheduler.allowed-failures`` setting; only when it gives up does the task
  fail with ``KilledWorker``, and the pool's own ``retries`` start counting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from .._worker import release_ended_jobs
from .._worker_init import probe_dir
from ..errors import SharedDirError
from . import Backend, Capabilities

try:
    from distributed import Client
    from distributed.cfexecutor import ClientExecutor
    from distributed.comm.core import CommClosedError
    from distributed.deploy.cluster import Cluster
    from distributed.scheduler import KilledWorker
except ImportError as exc:  # pragma: no cover - exercised with distributed hidden
    msg = (
        "running memmap-pool on a Dask cluster needs the distributed package: "
        'pip install "memmap-pool[dask]"'
        f" ({exc})"
    )
    raise ImportError(msg) from exc
try:
    from distributed.client import FutureCancelledError
except ImportError:  # pragma: no cover - distributed before 2024: a plain CancelledError
    from concurrent.futures import (  # type: ignore[assignment, unused-ignore]
        CancelledError as FutureCancelledError,
    )

log = logging.getLogger("memmap_pool")

WORKER_WAIT_TIMEOUT = 60.0
"""Seconds to wait for a first worker when the cluster has none yet (a cluster still
scaling up); after that the pool refuses to start rather than wait forever."""

_LOSS_ERRORS = (KilledWorker, CommClosedError, FutureCancelledError)
"""What a batch's future raises when Dask lost the worker running it (``KilledWorker``, once
Dask gave up re-running it), lost the connection carrying its result (``CommClosedError``),
or dropped it because the scheduler restarted or the client lost the scheduler
(``FutureCancelledError``). None of these is the kernel's fault: the batch is retried."""


class _ClientExecutor(ClientExecutor):  # type: ignore[misc, unused-ignore]
    """``Client.get_executor(pure=False)``, whose futures always end.

    ``pure=False`` gives every call its own task: with Dask's default (``pure=True``), two
    calls with the same arguments, such as a batch sent again after a worker died, would be
    merged into one task. The futures of the stock executor never end when fetching a
    finished task's result fails (the result's worker died or the client lost the scheduler
    meanwhile); here the failure is set on the future instead, so the job retries the batch
    rather than wait forever.
    """

    def __init__(self, client: Client) -> None:
        super().__init__(client, pure=False)  # type: ignore[no-untyped-call, unused-ignore]

    def _wrap_future(self, future: Any) -> cf.Future[Any]:
        cf_future: cf.Future[Any] = cf.Future()

        def cancel_task(f: cf.Future[Any]) -> None:
            if f.cancelled() and future.status != "cancelled":
                future.cancel()

        cf_future.add_done_callback(cancel_task)
        self._client.loop.add_callback(_settle, future, cf_future)
        return cf_future


async def _settle(future: Any, cf_future: cf.Future[Any]) -> None:
    """Wait for a Dask future on the client's event loop and pass its outcome on."""
    try:
        value = await future._result()
    except BaseException as exc:
        # The task's exception, a worker lost while its result was being fetched, or this
        # coroutine stopped because the client is closing: in every case the future must end.
        if not cf_future.done():
            try:
                cf_future.set_exception(exc)
            except cf.InvalidStateError:
                pass  # cancelled by the pool meanwhile
        if not isinstance(exc, Exception):
            raise
        return
    if not cf_future.done():
        try:
            cf_future.set_result(value)
        except cf.InvalidStateError:
            pass


def _connect(client_or_address: Any) -> tuple[Any, bool]:
    """The client to use, and whether we created it (and so must close it)."""
    if isinstance(client_or_address, Client):
        if client_or_address.status in ("closing", "closed"):
            msg = "the Dask client passed to MemmapPool.from_dask is closed"
            raise ValueError(msg)
        return client_or_address, False
    if isinstance(client_or_address, Cluster):
        client = Client(client_or_address, set_as_default=False)  # type: ignore[no-untyped-call, unused-ignore]
        return client, True
    if isinstance(client_or_address, (str, os.PathLike)):
        address = os.fspath(client_or_address)
        try:
            client = Client(address, set_as_default=False)  # type: ignore[no-untyped-call, unused-ignore]
            return client, True
        # Before Python 3.11 asyncio's TimeoutError, which Dask raises, is not the builtin.
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:  # noqa: UP041
            msg = (
                f"cannot connect to the Dask scheduler at {address!r} ({type(exc).__name__}: "
                f"{exc}); check the address (it is printed by `dask scheduler` when it "
                "starts, e.g. tcp://host:8786) and that the scheduler is running"
            )
            raise ConnectionError(msg) from exc
    msg = (
        "client_or_address must be a distributed.Client, a Dask cluster object or a scheduler "
        f"address such as 'tcp://host:8786' (got {type(client_or_address).__name__})"
    )
    raise TypeError(msg)


def _check_worker(path: str, token_path: str, token: bytes) -> tuple[str, str | None]:
    """Runs on each Dask worker: can it write ``path``, is it the directory the pool sees,
    and can it read the pool's private files (``token_path``: mode 0600 in a 0700 dir)?"""
    who, error = probe_dir(path)
    if error is not None:
        return who, error
    try:
        with open(token_path, "rb") as f:
            seen = f.read()
    except FileNotFoundError:
        seen = b""
    except PermissionError as exc:
        return who, (
            f"it cannot read a private file the pool wrote there ({exc}): the pool's files "
            "are readable by their owner only, so the workers must run as the same user as "
            "the pool"
        )
    except OSError as exc:
        return who, f"it cannot read a file the pool wrote there ({type(exc).__name__}: {exc})"
    if seen != token:
        return who, (
            "the directory exists on this worker but it is not the one the pool's process "
            "sees (a file the pool wrote there is missing): it is not on a shared filesystem"
        )
    return who, None


class DaskBackend(Backend):
    """Runs the pool's batches on a Dask distributed cluster.

    Args:
        client_or_address: a ``distributed.Client`` (used, not closed at the end), a Dask
            cluster object, or a scheduler address such as ``"tcp://host:8786"`` (a client
            is then created for the pool and closed with it).
    """

    def __init__(self, client_or_address: Any) -> None:
        self.client, self._owns_client = _connect(client_or_address)
        # Dask's nannies replace lost workers, so the pool retries their chunks; it can't
        # kill a remote worker, and the cluster's workers are not the pool's to stop.
        self.capabilities = Capabilities(
            shares_page_cache=False,
            can_kill_workers=False,
            replaces_lost_workers=True,
            owned_by_pool=False,
        )
        try:
            self.n_workers = self._count_threads()
            self.executor = _ClientExecutor(self.client)
        except BaseException:
            self._close_client()
            raise
        self.address = str(self.client.scheduler.address)

    def _count_threads(self) -> int:
        nthreads = self.client.nthreads()
        if not nthreads:
            try:
                self.client.wait_for_workers(1, timeout=WORKER_WAIT_TIMEOUT)
            except (TimeoutError, asyncio.TimeoutError, OSError) as exc:  # noqa: UP041
                msg = (
                    f"no Dask worker joined the scheduler at {self.client.scheduler.address} "
                    f"within {WORKER_WAIT_TIMEOUT:g} s; start workers (`dask worker "
                    "<address>`) or scale the cluster before creating the pool"
                )
                raise TimeoutError(msg) from exc
            nthreads = self.client.nthreads()
        # Sized once: a batch in flight per worker thread (twice that, with one queued) keeps
        # every thread busy. Threads that join later still get work, only less queued ahead.
        return max(1, sum(int(n) for n in nthreads.values()))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        try:
            if self.client.status in ("closing", "closed"):
                # The client gave up on the scheduler; a task sent now would never end.
                msg = "the Dask client is closed"
                raise RuntimeError(msg)
            return self.executor.submit(fn, *args, **kwargs)
        except Exception as exc:
            # Not a worker loss: the client itself can't send (closed, or the scheduler is
            # gone), and resending would fail the same way.
            msg = (
                f"cannot send work to the Dask scheduler at {self.address} "
                f"({type(exc).__name__}: {exc}); is it still running?"
            )
            raise RuntimeError(msg) from exc

    def is_worker_loss(self, exc: BaseException) -> bool:
        return isinstance(exc, _LOSS_ERRORS)

    def recover(self, generation: int) -> dict[int, int | None]:
        # Dask restarts lost workers itself; there is nothing to rebuild and no exit code to
        # report (the worker's host may be another machine).
        return {}

    def describe_loss(self, exc: BaseException) -> str:
        # Completes "the worker ended with ..." in WorkerCrashedError's message.
        if isinstance(exc, KilledWorker):
            worker = getattr(getattr(exc, "last_worker", None), "address", "?")
            tries = int(getattr(exc, "allowed_failures", 0)) + 1
            return (
                f"a KilledWorker error from Dask (worker {worker}, the last of {tries} to die "
                "running the batch): most often the worker ran out of memory (its nanny or the "
                "out-of-memory killer ended it: use smaller chunks or give workers more "
                "memory) or crashed in native code; see the worker's log"
            )
        if isinstance(exc, FutureCancelledError):
            return (
                f"a cancellation by Dask ({getattr(exc, 'reason', exc)}): the scheduler "
                "restarted, or the client lost its connection to it"
            )
        return f"a closed connection to a Dask worker ({type(exc).__name__}: {exc})"

    def check_shared_dir(self, path: str) -> None:
        """Raise :class:`SharedDirError` unless this process and every worker of the cluster
        can write ``path`` and see the same directory there."""
        who, error = probe_dir(path)
        if error is not None:
            msg = (
                f"shared_dir {path!r} cannot be written by the pool's own process ({who}): "
                f"{error}; pass a directory on a filesystem every node mounts at the same path"
            )
            raise SharedDirError(msg)
        # The probe file is made like the pool's own files (a 0700 dir, a 0600 file), so
        # that workers running as another user are found now rather than by the first job.
        token = secrets.token_hex(16).encode()
        probe = tempfile.mkdtemp(prefix=".memmap-pool-probe-", dir=path)
        try:
            token_path = os.path.join(probe, "token")
            fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as f:
                f.write(token)
            outcomes = self._run_on_workers(_check_worker, path, token_path, token)
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        problems = []
        for address, outcome in sorted(outcomes.items()):
            if isinstance(outcome, BaseException):
                problems.append(
                    f"worker {address} could not run the check ({type(outcome).__name__}: "
                    f"{outcome}); is memmap-pool installed on it?"
                )
            elif outcome[1] is not None:
                problems.append(f"worker {address} ({outcome[0]}): {outcome[1]}")
        if problems:
            msg = (
                f"shared_dir {path!r} is not usable by every Dask worker: "
                + "; ".join(problems)
                + ". Pass a directory on a shared filesystem (NFS, Lustre, GPFS, ...) mounted "
                "at the same path on every node and writable by the workers' user"
            )
            raise SharedDirError(msg)

    def _run_on_workers(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self.client.run(fn, *args, on_error="return")
        except TypeError:  # pragma: no cover - distributed before on_error= existed
            result = self.client.run(fn, *args)
        return result

    def _close_client(self) -> None:
        if self._owns_client:
            try:
                self.client.close()
            except Exception:  # pragma: no cover - closing a client whose scheduler is gone
                log.debug("closing the Dask client failed", exc_info=True)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop sending work; close the client only if the pool created it."""
        self.executor.shutdown(wait=wait and not cancel_futures)
        if self.client.status == "running":
            try:
                self._run_on_workers(release_ended_jobs)
            except Exception:
                log.debug("releasing the workers' mappings failed", exc_info=True)
        self._close_client()
