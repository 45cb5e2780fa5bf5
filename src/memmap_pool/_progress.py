"""A tqdm progress bar that follows a job (``progress=True``)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from ._jobs import Job, Progress


def attach_progress_bar(job: Job, progress: bool | str, name: str) -> None:
    """Draw ``job``'s progress: on a terminal only for ``True``, always for ``"always"``."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=job.progress.total,
        desc=name,
        unit="chunk",
        disable=None if progress is True else False,
        initial=job.progress.done,
        leave=True,
    )
    lock = threading.Lock()

    def advance(p: Progress) -> None:
        with lock:
            if p.done > bar.n:
                bar.update(p.done - bar.n)
            if p.done >= p.total:
                # Close before the job's result is set, so the finished bar is drawn before
                # whatever the caller prints next (done callbacks run after the waiters wake).
                bar.close()

    def close(_: Future[Any]) -> None:
        with lock:
            bar.close()

    job.add_progress_callback(advance)
    job.add_done_callback(close)
