"""A job request: one ``map_chunks``/``submit_chunks`` call, validated.

:func:`build_request` is the one place where a job's arguments are checked. It reads the
headers of the files it is given (``.npy`` inputs and outputs, a resume journal) and creates
nothing, so a bad argument is an error before anything is written. The result is a frozen
:class:`JobRequest` whose arrays are data: each output and each input is a record with its
role, and the files are made from it by :mod:`._jobfiles`.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle
import numpy as np

from ._chunks import (
    AUTO_HALO_MULTIPLE,
    ChunkPlan,
    normalize_dtype,
    normalize_order,
    normalize_shape,
    plan_chunks,
)
from ._halo import Halo
from ._kernel import Kernel
from ._npy import read_npy
from ._output import Output
from ._resume import resumed_plan
from ._roles import InputRole, SameRegion
from ._storage import ArrayRef, contiguous_strides, memmap_holder, memmap_ref
from .backends import Capabilities
from .errors import SerializationError

UNSET: Any = object()
"""Default of options whose ``None`` means something (``timeout=None``: no limit)."""


class OutputKind(enum.Enum):
    TEMPORARY = "temporary"  # a file in the pool's private dir, removed with its result
    NPY = "npy"  # a persistent .npy file, journaled for resume
    MEMMAP = "memmap"  # the caller's np.memmap, updated in place


@dataclass(frozen=True, eq=False)
class OutputSpec:
    """One output array of a job and where it goes."""

    kind: OutputKind
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    order: str
    path: str | None = None  # NPY: the absolute path of the .npy
    array: np.ndarray[Any, Any] | None = None  # MEMMAP: the caller's array

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, eq=False)
class InputSpec:
    """One input: by reference to a file (``ref``), or an in-memory ``array`` that the job
    writes once to the temp dir; and its role."""

    role: InputRole
    ref: ArrayRef | None = None
    array: np.ndarray[Any, Any] | None = None


@dataclass(frozen=True)
class PoolDefaults:
    """What a request takes from its pool."""

    workers: int
    retries: int
    timeout: float | None
    capabilities: Capabilities


@dataclass(frozen=True, eq=False)
class JobRequest:
    """A validated job; see the module docstring."""

    name: str
    kernel: bytes  # cloudpickle of (fn, args, kwargs): sent once per job
    plan: ChunkPlan
    outputs: tuple[OutputSpec, ...]
    inputs: tuple[InputSpec, ...]
    resume: bool
    retries: int
    timeout: float | None
    progress: bool | str
    caller_maps: tuple[np.memmap[Any, Any], ...]  # the caller's mappings the workers open

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def cell_nbytes(self) -> int:
        """Bytes the outputs hold together per element of the chunk grid."""
        return self.plan.itemsize


def build_request(
    fn: Callable[..., Any],
    shape: Any,
    dtype: Any = None,
    *,
    chunks: Any = None,
    order: Any = None,
    inputs: Any = (),
    args: Any = (),
    kwargs: Any = None,
    out: Any = None,
    outputs: Any = None,
    resume: Any = False,
    retries: Any = None,
    timeout: Any = UNSET,
    progress: Any = False,
    name: Any = None,
    defaults: PoolDefaults,
    check_kernel: bool = True,
) -> JobRequest:
    """Check a job's arguments and return its request.

    ``check_kernel=False``: the caller checks how ``fn`` will be called (``map_blocks``
    wraps the user's function).

    Raises:
        TypeError, ValueError: an argument is of the wrong type or value; the message names
            it and what was given.
        FileNotFoundError: an input or the directory of ``out`` does not exist.
        JournalMismatchError: ``resume=True`` and the output's journal is for another job.
        SerializationError: the kernel or its args/kwargs can't be pickled.
        ImportError: ``progress`` without tqdm installed.
    """
    if not callable(fn):
        msg = f"fn must be callable, the chunk kernel (got {fn!r})"
        raise TypeError(msg)
    if outputs is not None and (dtype is not None or out is not None):
        given = " and ".join(n for n, v in (("dtype=", dtype), ("out=", out)) if v is not None)
        msg = (
            f"outputs= and {given} can't be given together: with several outputs, give each "
            "its dtype and out in Output(dtype, out=...)"
        )
        raise TypeError(msg)
    # Precedence: the call's arguments, then an out= array's own dtype and layout (it
    # exists already and can't change), then the kernel's defaults.
    if isinstance(out, np.ndarray):
        if dtype is None:
            dtype = out.dtype
        if order is None:
            order = "F" if out.flags.f_contiguous and not out.flags.c_contiguous else "C"
    if isinstance(fn, Kernel):
        if outputs is None:
            dtype = fn.dtype if dtype is None else dtype
        chunks = fn.chunks if chunks is None else chunks
        order = fn.order if order is None else order
        fn = fn.fn
    job_name = check_name(name, fn)
    raw_inputs, described = describe_inputs(inputs)
    shape_t = normalize_shape(shape)
    order_s = normalize_order("C" if order is None else order)
    chunks = "auto" if chunks is None else chunks
    if outputs is None:
        dtype_n = normalize_dtype("float64" if dtype is None else dtype)
        if dtype_n.subdtype is not None:
            # numpy's rule: an array of a subarray dtype has its element's axes as trailing
            # axes, and the element's type as its dtype; chunks never split those axes.
            dtype_n, sub_shape = dtype_n.subdtype
            shape_t = (*shape_t, *sub_shape)
            if isinstance(chunks, (tuple, list)):
                chunks = (*chunks, *(None for _ in sub_shape))
        plan = plan_chunks(shape_t, dtype_n, order_s, chunks, **auto_sizing(described, shape_t))
        output_specs: tuple[OutputSpec, ...] = (_check_out(out, shape_t, dtype_n, order_s),)
        outs_given = [out]
    else:
        layouts = _check_outputs(outputs, shape_t, order_s)
        itemsizes = [
            dt.itemsize * math.prod(oshape[len(shape_t) :]) for oshape, dt, _o, _x in layouts
        ]
        plan = plan_chunks(
            shape_t, layouts[0][1], order_s, chunks, itemsizes, **auto_sizing(described, shape_t)
        )
        output_specs = tuple(
            _check_out(x, oshape, dt, o, f"outputs[{k}].out")
            for k, (oshape, dt, o, x) in enumerate(layouts)
        )
        outs_given = [x for _s, _d, _o, x in layouts]
    resume = check_flag("resume", resume)
    if resume and any(o.kind is not OutputKind.NPY for o in output_specs):
        msg = (
            "resume=True needs out= to be a .npy path (the journal lives beside it)"
            if outputs is None
            else "resume=True needs every output's out= to be a .npy path (each journal "
            "lives beside its output)"
        )
        raise ValueError(msg)
    if resume and chunks == "auto":
        first = output_specs[0]
        assert first.path is not None
        plan = resumed_plan(plan, first.path, first.dtype, first.shape)
    check_args(args, kwargs)
    input_specs, caller_maps = _check_inputs(
        raw_inputs, described, plan, chunks, output_specs, outs_given
    )
    retries_n = defaults.retries if retries is None else check_retries(retries)
    timeout_s = defaults.timeout if timeout is UNSET else check_timeout(timeout)
    check_timeout_enforceable(timeout_s, defaults.capabilities)
    progress_v = check_progress(progress)
    kernel_bytes = pickle_kernel(fn, job_name, args, kwargs or {})
    if check_kernel:
        check_call(fn, job_name, ("out", "chunk"), len(input_specs), args, kwargs or {})
    return JobRequest(
        name=job_name,
        kernel=kernel_bytes,
        plan=plan,
        outputs=output_specs,
        inputs=input_specs,
        resume=resume,
        retries=retries_n,
        timeout=timeout_s,
        progress=progress_v,
        caller_maps=caller_maps,
    )


def _check_outputs(
    outputs: Any, shape: tuple[int, ...], order: str
) -> list[tuple[tuple[int, ...], np.dtype[Any], str, Any]]:
    """``(shape, dtype, order, out)`` of each ``Output``; a subarray dtype's axes become
    trailing axes of its output."""
    if not isinstance(outputs, (tuple, list)) or not outputs:
        msg = f"outputs must be a non-empty list of Output(...) (got {outputs!r})"
        raise TypeError(msg)
    layouts = []
    for k, spec in enumerate(outputs):
        if not isinstance(spec, Output):
            msg = f"outputs[{k}] must be an Output(dtype, ...) (got {type(spec).__name__})"
            raise TypeError(msg)
        dt = spec.dtype
        oshape = shape if spec.shape is None else normalize_shape(spec.shape)
        if oshape[: len(shape)] != shape:
            msg = (
                f"outputs[{k}] has shape {oshape}, which does not start with the job's shape "
                f"{shape}: an output may only add trailing axes to it"
            )
            raise ValueError(msg)
        if dt.subdtype is not None:
            dt, sub_shape = dt.subdtype
            oshape = (*oshape, *sub_shape)
        oorder = order if spec.order is None else normalize_order(spec.order)
        if isinstance(spec.out, np.ndarray) and spec.order is None:
            oorder = "F" if spec.out.flags.f_contiguous and not spec.out.flags.c_contiguous else "C"
        layouts.append((oshape, dt, oorder, spec.out))
    return layouts


# -- options shared with the pool ----------------------------------------------------------------


def pickle_kernel(
    fn: Callable[..., Any], name: str, args: Sequence[Any], kwargs: dict[str, Any]
) -> bytes:
    """The kernel with its arguments, as the workers will load them (once per job).

    Raises:
        SerializationError: cloudpickle can't pickle them.
    """
    try:
        payload: bytes = cloudpickle.dumps((fn, tuple(args), dict(kwargs)))
        return payload
    except Exception as exc:
        msg = (
            f"cannot send the kernel {name!r} or its args/kwargs to the workers: "
            f"{type(exc).__name__}: {exc}"
        )
        raise SerializationError(msg) from exc


def check_retries(retries: object) -> int:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        msg = f"retries must be a non-negative int (got {retries!r})"
        raise ValueError(msg)
    return retries


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        msg = f"timeout must be a positive number of seconds or None (got {timeout!r})"
        raise ValueError(msg)
    return float(timeout)


def check_timeout_enforceable(timeout: float | None, capabilities: Capabilities) -> None:
    """A timed-out chunk's worker is killed: only where the pool can kill its workers."""
    if timeout is None or capabilities.can_kill_workers:
        return
    if capabilities.same_process:
        msg = (
            f"timeout={timeout:g} can't be enforced with backend='threads': a thread can't "
            "be killed; pass timeout=None, or use backend='processes' for kernels that may hang"
        )
    elif not capabilities.shares_page_cache:
        msg = (
            f"timeout={timeout:g} can't be enforced when the workers run on other hosts (a "
            "Dask cluster): the pool can't see how long a remote chunk has been running nor "
            "kill its worker; pass timeout=None (see docs/distributed.md)"
        )
    else:
        msg = (
            f"timeout={timeout:g} can't be enforced on an executor the pool doesn't own: a "
            "timed out chunk's worker must be killed, which would leave your executor broken "
            "for good; use the pool's own workers (no executor=) or pass timeout=None"
        )
    raise ValueError(msg)


# -- one argument at a time ----------------------------------------------------------------------


def check_call(
    fn: Callable[..., Any],
    name: str,
    leading: tuple[str, ...],
    n_inputs: int,
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> None:
    """Check that the kernel can be called as the workers will call it, so that a wrong
    argument is an error now rather than in the first chunk: ``fn(*leading, *inputs, *args,
    **kwargs)``. Callables whose signature Python can't tell (some builtins) are not checked.

    Raises:
        TypeError: the arguments don't fit the kernel's parameters (a keyword argument that
            collides with ``out`` or ``chunk``, one input too many, ...).
    """
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    shown = [*leading, *(f"inputs[{k}]" for k in range(n_inputs))]
    try:
        signature.bind(*shown, *args, **kwargs)
    except TypeError as exc:
        call = ", ".join([*shown, *(["*args"] if args else []), *(["**kwargs"] if kwargs else [])])
        msg = (
            f"the kernel {name!r} can't be called as {name}({call}) with the given inputs, "
            f"args and kwargs: {exc} (its signature is {name}{signature})"
        )
        raise TypeError(msg) from None


def check_args(args: object, kwargs: object) -> None:
    if not isinstance(args, (tuple, list)):
        msg = f"args must be a tuple or list of extra arguments (got {type(args).__name__})"
        raise TypeError(msg)
    if kwargs is not None and not isinstance(kwargs, dict):
        msg = f"kwargs must be a dict (got {type(kwargs).__name__})"
        raise TypeError(msg)


def check_name(name: object, fn: Callable[..., Any]) -> str:
    if name is None:
        return str(getattr(fn, "__name__", "job"))
    if not isinstance(name, str):
        msg = f"name must be a str (got {type(name).__name__})"
        raise TypeError(msg)
    return name


def check_flag(what: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        msg = f"{what} must be True or False (got {value!r})"
        raise TypeError(msg)
    return bool(value)


def check_progress(progress: object) -> bool | str:
    if not (progress is None or isinstance(progress, bool) or progress == "always"):
        msg = f"progress must be True, False or 'always' (got {progress!r})"
        raise ValueError(msg)
    if progress:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            msg = "progress bars need tqdm: pip install 'memmap-pool[progress]'"
            raise ImportError(msg) from None
    return progress or False


def _as_input_list(inputs: Any) -> list[Any]:
    if inputs is None:
        return []
    if isinstance(inputs, (np.ndarray, str, os.PathLike)):
        return [inputs]  # one input given bare: iterating it would go over its rows
    if not isinstance(inputs, (tuple, list)):
        msg = (
            f"inputs must be a tuple or list of arrays or .npy paths (got {type(inputs).__name__})"
        )
        raise TypeError(msg)
    return list(inputs)


def describe_inputs(inputs: Any) -> tuple[list[Any], list[_RawInput]]:
    """The inputs as given (a list), and what each one is (see :func:`_describe_input`).

    Raises:
        TypeError, ValueError, FileNotFoundError: an input of the wrong type, a path that is
            not a ``.npy`` file or does not exist.
    """
    raw_inputs = _as_input_list(inputs)
    return raw_inputs, [_describe_input(x, k) for k, x in enumerate(raw_inputs)]


def bind_inputs(
    raw_inputs: Sequence[Any],
    described: Sequence[_RawInput],
    plan: ChunkPlan,
    chunks: Any,
    outs_given: Sequence[Any] = (),
) -> tuple[tuple[InputSpec, ...], tuple[np.memmap[Any, Any], ...]]:
    """The inputs' specs, and the caller's own mappings of files the workers will open
    (flushed before a job whose workers are on other hosts; ``outs_given``: the outputs'
    ``out=`` arrays, mapped too).

    Raises:
        ValueError: an input does not fit the plan, or its halo does not fit the input.
    """
    axes = _input_axes(plan, chunks)
    specs = tuple(_bind_input(raw, k, plan, axes) for k, raw in enumerate(described))
    unwrapped = [x.array if isinstance(x, Halo) else x for x in raw_inputs]
    arrays = [x for x in (*unwrapped, *outs_given) if isinstance(x, np.ndarray)]
    holders = (memmap_holder(a) for a in arrays)
    return specs, tuple(h for h in holders if h is not None)


def _check_inputs(
    raw_inputs: Sequence[Any],
    described: Sequence[_RawInput],
    plan: ChunkPlan,
    chunks: Any,
    outputs: Sequence[OutputSpec],
    outs_given: Sequence[Any],
) -> tuple[tuple[InputSpec, ...], tuple[np.memmap[Any, Any], ...]]:
    """:func:`bind_inputs`, and the checks of the outputs against the inputs and each other."""
    specs, caller_maps = bind_inputs(raw_inputs, described, plan, chunks, outs_given)
    for k, output in enumerate(outputs):
        if output.kind is OutputKind.NPY:
            assert output.path is not None
            what = "out" if len(outputs) == 1 else f"outputs[{k}].out"
            _check_input_is_not_output(specs, output.path, what)
    _check_distinct_outputs(outputs)
    return specs, caller_maps


def _input_axes(plan: ChunkPlan, chunks: Any) -> tuple[int, ...]:
    """Output axes along which inputs are sliced: those the plan splits, and always the
    leading axis that "auto" and an int split, so that whether an input fits does not
    depend on the size of the array."""
    axes = set(plan.chunked_axes)
    if plan.shape and not isinstance(chunks, (tuple, list)):
        axes.add(0 if (plan.order == "C" or isinstance(chunks, int)) else len(plan.shape) - 1)
    return tuple(sorted(axes))


@dataclass(frozen=True, eq=False)
class _RawInput:
    """An input read but not yet bound to the plan: what it is, and its halo if any."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    halo: Halo | None
    ref: ArrayRef | None = None
    array: np.ndarray[Any, Any] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def auto_sizing(described: Sequence[_RawInput], shape: tuple[int, ...]) -> dict[str, Any]:
    """What "auto" chunks take from the inputs: their bytes (a chunk's memory is its regions
    of the outputs and of the inputs), and the halos' depths (a chunk much thinner than its
    halo would spend its time on the halo)."""
    min_extent = [0] * len(shape)
    for k, raw in enumerate(described):
        if raw.halo is None:
            continue
        for axis, depth in enumerate(raw.halo.depths(len(raw.shape), k)[: len(shape)]):
            min_extent[axis] = max(min_extent[axis], AUTO_HALO_MULTIPLE * depth)
    return {
        "input_bytes": sum(raw.nbytes for raw in described),
        "min_extent": tuple(min_extent),
    }


def _describe_input(value: Any, k: int) -> _RawInput:
    """Read what input ``k`` is (its ``.npy`` header for a path), checking its type."""
    halo = value if isinstance(value, Halo) else None
    if halo is not None:
        value = halo.array
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not path.endswith(".npy"):
            msg = f"inputs[{k}]: a path must name a .npy file (got {path!r})"
            raise ValueError(msg)
        if not os.path.exists(path):
            msg = f"inputs[{k}]: no such file: {path!r}"
            raise FileNotFoundError(msg)
        info = read_npy(path, f"inputs[{k}]")
        if info.dtype.hasobject:
            msg = f"inputs[{k}]: {path} holds Python objects, which can't be shared"
            raise TypeError(msg)
        ref = ArrayRef(
            os.path.abspath(path),
            info.offset,
            info.dtype,
            info.shape,
            contiguous_strides(info.shape, info.dtype.itemsize, info.order),
        )
        return _RawInput(info.shape, info.dtype, halo, ref=ref)
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            msg = f"inputs[{k}]: arrays of Python objects (dtype {value.dtype}) can't be shared"
            raise TypeError(msg)
        shape = tuple(value.shape)
        mapped = memmap_ref(value)
        if mapped is not None and os.path.exists(mapped.path):
            return _RawInput(shape, value.dtype, halo, ref=mapped)
        return _RawInput(shape, value.dtype, halo, array=value)
    msg = (
        f"inputs[{k}] must be a numpy array, an np.memmap or the path of a .npy file "
        f"(got {type(value).__name__})"
    )
    raise TypeError(msg)


def _bind_input(raw: _RawInput, k: int, plan: ChunkPlan, axes: tuple[int, ...]) -> InputSpec:
    """Input ``k``'s spec: its role in the job, once it is known to fit the plan."""
    role: InputRole = SameRegion(axes)
    if raw.halo is not None:
        role = raw.halo.role(k, raw.shape, raw.dtype, axes)
    role.check_shape(k, raw.shape, plan.shape)
    return InputSpec(role, ref=raw.ref, array=raw.array)


def _check_distinct_outputs(outputs: Sequence[OutputSpec]) -> None:
    """Two outputs in one file would overwrite each other's chunks."""
    seen: dict[tuple[int, int] | str, int] = {}
    for k, output in enumerate(outputs):
        key: tuple[int, int] | str | None = None
        if output.kind is OutputKind.NPY:
            assert output.path is not None
            key = output.path
        elif output.kind is OutputKind.MEMMAP:
            assert output.array is not None
            ref = memmap_ref(output.array)
            if ref is not None:
                st = os.stat(ref.path)
                key = (st.st_dev, st.st_ino)
        if key is None:
            continue
        if key in seen:
            msg = f"outputs[{seen[key]}] and outputs[{k}] are the same file; give each its own"
            raise ValueError(msg)
        seen[key] = k


def _check_input_is_not_output(inputs: Sequence[InputSpec], out: str, what: str) -> None:
    """A .npy ``out`` is created anew: an input in the same file would be read from the new,
    empty file at the old file's offsets."""
    try:
        target = os.stat(out)
    except FileNotFoundError:
        return
    for k, spec in enumerate(inputs):
        if spec.ref is None:
            continue
        try:
            st = os.stat(spec.ref.path)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            msg = (
                f"inputs[{k}] is the file {what}={out!r} itself, which the job creates anew; to "
                "update a file in place pass out=np.load(path, mmap_mode='r+') and read the "
                "current values from the kernel's out"
            )
            raise ValueError(msg)


def _check_out(
    out: Any, shape: tuple[int, ...], dtype: np.dtype[Any], order: str, what: str = "out"
) -> OutputSpec:
    """The spec of one output; ``what`` names the argument in messages."""
    try:
        return _check_one_out(out, shape, dtype, order)
    except (TypeError, ValueError, FileNotFoundError) as exc:
        if what == "out":
            raise
        raise type(exc)(f"{what}: {exc}") from None


def _check_one_out(
    out: Any, shape: tuple[int, ...], dtype: np.dtype[Any], order: str
) -> OutputSpec:
    if out is None:
        return OutputSpec(OutputKind.TEMPORARY, shape, dtype, order)
    if isinstance(out, (str, os.PathLike)):
        path = os.fspath(out)
        if not path.endswith(".npy"):
            msg = f"out must be a path ending in .npy (got {path!r})"
            raise ValueError(msg)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            msg = f"the directory of out={path!r} does not exist"
            raise FileNotFoundError(msg)
        return OutputSpec(OutputKind.NPY, shape, dtype, order, path=os.path.abspath(path))
    # An np.memmap, or a plain view of one (np.asarray(memmap)): both live in a file.
    if isinstance(out, np.memmap) or (isinstance(out, np.ndarray) and memmap_ref(out) is not None):
        _check_memmap_out(out, shape, dtype, order)
        return OutputSpec(OutputKind.MEMMAP, shape, dtype, order, array=out)
    if isinstance(out, np.ndarray):
        msg = (
            "out must be an np.memmap, a .npy path or None: an in-memory array can't be "
            "shared with worker processes without copying (np.lib.format.open_memmap "
            "creates a .npy-backed one)"
        )
        raise TypeError(msg)
    msg = f"out must be None, a .npy path or a writable np.memmap (got {type(out).__name__})"
    raise TypeError(msg)


def _check_memmap_out(
    out: np.ndarray[Any, Any], shape: tuple[int, ...], dtype: np.dtype[Any], order: str
) -> None:
    if tuple(out.shape) != shape:
        msg = f"out has shape {tuple(out.shape)}, but the job makes shape {shape}"
        raise ValueError(msg)
    if out.dtype != dtype:
        msg = f"out has dtype {out.dtype}, but the job makes dtype {dtype}"
        raise ValueError(msg)
    if not out.flags.writeable:
        msg = (
            "out is a read-only memmap; open it with mode 'r+' (np.load(path, "
            "mmap_mode='r+')) to update it in place"
        )
        raise ValueError(msg)
    if getattr(out, "mode", None) == "c":
        msg = (
            "out is a copy-on-write memmap (mode 'c'): its changes stay private to this "
            "process, so workers could neither see nor update them; open it with mode "
            "'r+' to update the file in place"
        )
        raise ValueError(msg)
    ref = memmap_ref(out)
    if ref is None or not os.path.exists(ref.path):
        msg = "out is an np.memmap whose file can't be found; pass its path instead"
        raise ValueError(msg)
    expected = contiguous_strides(shape, dtype.itemsize, order)
    if out.size > 1 and ref.strides != expected:
        msg = (
            f"out must be a whole, {order}-contiguous memmap (its strides are "
            f"{ref.strides}, a {order}-ordered array has {expected}); pass order= to "
            "match its layout, or the base memmap rather than a view"
        )
        raise ValueError(msg)
