"""``reduce_chunks``: a value computed from every chunk of some inputs, with no output array.

Each chunk's kernel returns a small partial result, which the worker pickles into its batch
result (as any chunk's return value). The parent folds the partials in the order of the chunk
indices, ``combine(combine(p0, p1), p2) ...``, as they arrive: partials that come early wait,
pickled, for their turn, and each is dropped once folded, so the parent's memory does not grow
with the number of chunks. The order of the fold is fixed by the plan alone, so a float
reduction gives the same bits on every run with the same chunking, whatever the number of
workers, the backend or the order in which chunks finish ("auto" chunks do not depend on the
machine either).
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from ._chunks import Chunk, describe_region, normalize_shape, plan_chunks
from ._request import (
    InputSpec,
    JobRequest,
    PoolDefaults,
    auto_sizing,
    bind_inputs,
    check_args,
    check_call,
    check_name,
    check_progress,
    describe_inputs,
    pickle_kernel,
)


class ReduceKernel:
    """The chunk kernel of a reduction: ``fn(chunk, *input_views, *args, **kwargs)``; the job
    has no output, and the kernel's return value is the partial result."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn = fn
        self.name = name

    def __call__(self, out: Any, chunk: Chunk, *views_and_args: Any, **kwargs: Any) -> Any:
        partial = self.fn(chunk, *views_and_args, **kwargs)
        if partial is None:
            msg = (
                f"reduce_chunks: {self.name} returned None for chunk {chunk.index} "
                f"{describe_region(chunk.slices)}; it must return the chunk's partial result "
                "(a number or a small array) for combine"
            )
            raise TypeError(msg)
        return partial


_NOTHING: Any = object()


class Fold:
    """Partial results combined in the order of chunk indices, as they arrive (see the module
    docstring). An exception raised by ``combine`` is kept in :attr:`error`, and the fold stops.
    """

    def __init__(self, count: int, combine: Callable[[Any, Any], Any], done: int = 0) -> None:
        self.count = count
        self.combine = combine
        self.next = done
        self.value: Any = _NOTHING
        self.pending: dict[int, bytes] = {}
        self.error: BaseException | None = None

    def add(self, partials: dict[int, bytes]) -> None:
        if self.error is not None:
            return
        self.pending.update(partials)
        try:
            while self.next in self.pending:
                part = pickle.loads(self.pending.pop(self.next))
                self.value = part if self.value is _NOTHING else self.combine(self.value, part)
                self.next += 1
        except Exception as exc:
            exc.add_note(f"raised by combine while folding the partial result of chunk {self.next}")
            self.error = exc
            self.pending.clear()

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        if self.next != self.count or self.value is _NOTHING:
            msg = (
                f"reduce_chunks: {self.count - self.next} of {self.count} partial results "
                "never arrived"
            )
            raise RuntimeError(msg)
        return self.value


def build_reduce_request(
    fn: Callable[..., Any],
    inputs: Any,
    combine: Any,
    *,
    shape: Any,
    chunks: Any,
    args: Any,
    kwargs: Any,
    progress: Any,
    name: Any,
    defaults: PoolDefaults,
) -> JobRequest:
    """Check a reduction's arguments and return its request: a job with no output.

    Raises:
        TypeError: ``fn`` or ``combine`` is not callable; ``fn``'s signature doesn't fit;
            an input of the wrong type.
        ValueError: no ``shape`` and no input to take it from, a shape with no elements
            (nothing to combine), an input that does not fit the chunks, bad ``chunks``.
        FileNotFoundError: a missing ``.npy`` input.
        SerializationError: ``fn`` or its arguments can't be pickled.
    """
    if not callable(fn):
        msg = f"fn must be callable, the chunk function (got {fn!r})"
        raise TypeError(msg)
    if not callable(combine):
        msg = f"combine must be callable, combine(a, b) of two partial results (got {combine!r})"
        raise TypeError(msg)
    job_name = check_name(name, fn)
    raw_inputs, described = describe_inputs(inputs)
    if shape is None:
        if not described:
            msg = "reduce_chunks needs shape= when there are no inputs to take it from"
            raise ValueError(msg)
        shape_t = described[0].shape
    else:
        shape_t = normalize_shape(shape)
    if math.prod(shape_t) == 0:
        msg = (
            f"reduce_chunks over shape {shape_t} has no elements, so no partial results to "
            "combine; check the shape, or handle the empty case before the call"
        )
        raise ValueError(msg)
    sizing = auto_sizing(described, shape_t)
    # No output: chunks are sized by the inputs' bytes per element of the grid (at least one
    # byte, for a reduction over a bare shape), which also aligns them with the inputs' pages.
    per_cell = max(1, round(sizing.pop("input_bytes") / math.prod(shape_t)))
    chunks = "auto" if chunks is None else chunks
    plan = plan_chunks(shape_t, np.dtype(np.uint8), "C", chunks, (per_cell,), **sizing)
    check_args(args, kwargs)
    input_specs: tuple[InputSpec, ...]
    input_specs, caller_maps = bind_inputs(raw_inputs, described, plan, chunks)
    progress_v = check_progress(progress)
    check_call(fn, job_name, ("chunk",), len(input_specs), args, kwargs or {})
    kernel = ReduceKernel(fn, job_name)
    return JobRequest(
        name=job_name,
        kernel=pickle_kernel(kernel, job_name, args, kwargs or {}),
        plan=plan,
        outputs=(),
        inputs=input_specs,
        resume=False,
        retries=defaults.retries,
        timeout=defaults.timeout,
        progress=progress_v,
        caller_maps=caller_maps,
    )
