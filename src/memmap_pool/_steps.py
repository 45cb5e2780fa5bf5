"""``iterate``: time-stepping on a state that stays in place.

A simulation computes step ``k`` from step ``k - 1``, chunk by chunk. The state lives in two
buffers of the same shape, which alternate: step ``k`` writes ``buffers[k % 2]`` and reads the
other (step 1 reads ``initial``, which is never written). The whole run is one job: one spec,
one status file, the buffers mapped once by each worker and kept mapped and resident from step
to step (no page is released, no block reserved after the start: the parent allocates the
buffers whole). A step is one round of batches; no step starts before the previous one is
complete (the dispatcher waits for every batch of a step, retries included).

With ``out="state.npy"`` the buffers are two siblings, ``state.npy.a`` and ``state.npy.b``
(``.npy`` files of the state padded as the halo says, like the temporary buffers), and the run
keeps a *step journal*, ``state.npy.journal``: after each step it records the step and which
file holds it; every ``checkpoint`` steps the state file is made durable (fsync) first.
``resume=True`` continues from the last step recorded. At the end the final state is written
to ``state.npy`` (renamed there when the buffers are not padded), the siblings are removed,
and the journal stays beside it (a resume with more steps continues from it).

The journal is a page of JSON (its fingerprint: shape, dtype, order) and two slots written
alternately, each a small JSON record with a sequence number and a CRC, so that a torn write
never loses the previous record. A record also holds the machine's boot id: after a process
crash the page cache holds every write, so the last step recorded is whole; after a machine
restart only steps made durable are, and only with ``checkpoint=1`` (with longer intervals,
the steps after a checkpoint overwrite the buffer that holds it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._chunks import AUTO_MAX_STEP_CHUNK_BYTES, ChunkPlan, normalize_shape, plan_chunks
from ._halo import Halo
from ._request import (
    InputSpec,
    PoolDefaults,
    auto_sizing,
    bind_inputs,
    check_args,
    check_call,
    check_flag,
    check_name,
    check_progress,
    describe_inputs,
    pickle_kernel,
)

SIBLING_SUFFIXES = (".a", ".b")
"""The two state buffers of a ``.npy`` out are files beside it with these suffixes."""
JOURNAL_SUFFIX = ".journal"


@dataclass(frozen=True, eq=False)
class IterateRequest:
    """A validated ``iterate`` call."""

    name: str
    kernel: bytes
    plan: ChunkPlan
    dtype: np.dtype[Any]
    initial: InputSpec  # read by step 1, with the previous state's role
    inputs: tuple[InputSpec, ...]
    steps: int
    out: str | None
    resume: bool
    checkpoint: int | None
    retries: int
    timeout: float | None
    progress: bool | str
    caller_maps: tuple[np.memmap[Any, Any], ...]

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes


def build_iterate_request(
    fn: Callable[..., Any],
    initial: Any,
    steps: Any,
    *,
    depth: Any,
    boundary: Any,
    inputs: Any,
    args: Any,
    kwargs: Any,
    chunks: Any,
    out: Any,
    resume: Any,
    checkpoint: Any,
    progress: Any,
    name: Any,
    defaults: PoolDefaults,
) -> IterateRequest:
    """Check an ``iterate`` call and return its request; nothing is created.

    Raises:
        TypeError, ValueError: a bad argument, named in the message.
        FileNotFoundError: a missing ``.npy`` or directory of ``out``.
    """
    if not callable(fn):
        msg = f"fn must be callable, the step kernel (got {fn!r})"
        raise TypeError(msg)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        msg = f"steps must be a positive int (got {steps!r})"
        raise ValueError(msg)
    job_name = check_name(name, fn)
    if isinstance(initial, Halo):
        msg = "initial is the state itself: give its halo with depth= and boundary="
        raise TypeError(msg)
    prev = Halo(initial, depth, boundary)
    raw_all, described = describe_inputs([prev, *_input_list(inputs)])
    state = described[0]
    shape = state.shape
    dtype = state.dtype
    if math.prod(shape) == 0:
        msg = f"initial has shape {shape}: a state with no elements has nothing to step"
        raise ValueError(msg)
    resume = check_flag("resume", resume)
    out_path = _check_out(out, resume)
    checkpoint_n = _check_checkpoint(checkpoint, out_path)
    chunks = "auto" if chunks is None else chunks
    sizing = auto_sizing(described, shape)
    plan = plan_chunks(
        normalize_shape(shape),
        dtype,
        "C",
        chunks,
        max_chunk_bytes=AUTO_MAX_STEP_CHUNK_BYTES,
        **sizing,
    )
    check_args(args, kwargs)
    specs, caller_maps = bind_inputs(raw_all, described, plan, chunks)
    if out_path is not None:
        for spec in specs:
            if spec.ref is not None and _same_file(spec.ref.path, out_path):
                msg = f"out={out_path!r} is also an input (or initial): the run overwrites it"
                raise ValueError(msg)
    progress_v = check_progress(progress)
    check_call(fn, job_name, ("out", "chunk", "prev"), len(specs) - 1, args, kwargs or {})
    return IterateRequest(
        name=job_name,
        kernel=pickle_kernel(fn, job_name, args, kwargs or {}),
        plan=plan,
        dtype=dtype,
        initial=specs[0],
        inputs=specs[1:],
        steps=int(steps),
        out=out_path,
        resume=resume,
        checkpoint=checkpoint_n,
        retries=defaults.retries,
        timeout=defaults.timeout,
        progress=progress_v,
        caller_maps=caller_maps,
    )


def _input_list(inputs: Any) -> list[Any]:
    if inputs is None:
        return []
    if isinstance(inputs, (np.ndarray, str, os.PathLike, Halo)):
        return [inputs]
    if not isinstance(inputs, (tuple, list)):
        msg = (
            f"inputs must be a tuple or list of arrays or .npy paths (got {type(inputs).__name__})"
        )
        raise TypeError(msg)
    return list(inputs)


def _check_out(out: Any, resume: bool) -> str | None:
    if out is None:
        if resume:
            msg = "resume=True needs out= to be a .npy path (its step journal lives beside it)"
            raise ValueError(msg)
        return None
    if not isinstance(out, (str, os.PathLike)):
        msg = (
            "iterate's out must be a .npy path or None: the state is two buffers that "
            f"alternate, which an existing array can't be (got {type(out).__name__})"
        )
        raise TypeError(msg)
    path = os.path.abspath(os.fspath(out))
    if not path.endswith(".npy"):
        msg = f"out must be a path ending in .npy (got {os.fspath(out)!r})"
        raise ValueError(msg)
    if not os.path.isdir(os.path.dirname(path)):
        msg = f"the directory of out={os.fspath(out)!r} does not exist"
        raise FileNotFoundError(msg)
    return path


def _check_checkpoint(checkpoint: Any, out: str | None) -> int | None:
    if checkpoint is None:
        return 1 if out is not None else None
    if out is None:
        msg = "checkpoint= needs out= to be a .npy path: a temporary state is not kept"
        raise ValueError(msg)
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 1:
        msg = (
            "checkpoint must be a positive int, the steps between durable states "
            f"(got {checkpoint!r})"
        )
        raise ValueError(msg)
    return checkpoint


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
