"""The command line's parser, and the conversion of its strings into the Python values the
library takes. Values are checked by the library itself (``build_request``, ``MemmapPool``);
the parser only turns text into values, and says which text it could not read."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Any

PROG = "memmap-pool"

DEMO_SIZE = 4096
"""Pixels per side of the demo image: a few seconds of work on two cores."""

DEMO_DIR = "memmap-pool-demo"

DOCTOR_SIZE = "1G"
"""The job size ``doctor`` checks the temp dir for, unless told."""


class UsageError(Exception):
    """A bad command line: reported in one line, exit code 2."""


def parse_shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        msg = f"--shape must be comma-separated non-negative ints, e.g. 4096,4096 (got {text!r})"
        raise UsageError(msg) from None
    if any(n < 0 for n in shape):
        msg = f"--shape must be comma-separated non-negative ints, e.g. 4096,4096 (got {text!r})"
        raise UsageError(msg)
    return shape


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
"""Binary units: ``64M`` is 64 MiB, whether written 64M, 64MiB or 64MB."""

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str, option: str = "--size") -> int:
    """A size in bytes: ``1073741824``, ``64M``, ``8G``, ``1.5GiB``, ``512kB`` (binary units)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        msg = f"{option} must be a size such as 64M, 8G or 1073741824 (got {text!r})"
        raise UsageError(msg)
    number, unit = match.groups()
    size = int(float(number) * SIZE_UNITS[unit.upper()])
    if size < 1:
        msg = f"{option} must be at least one byte (got {text!r})"
        raise UsageError(msg)
    return size


def parse_dtype(text: str) -> Any:
    """A dtype given by name; the library checks that it can live in a file."""
    import numpy as np

    try:
        return np.dtype(text)
    except TypeError:
        msg = f"--dtype {text!r} is not a numpy dtype (e.g. float32, int64, uint8, complex128)"
        raise UsageError(msg) from None


def parse_chunks(text: str) -> Any:
    """``auto``, ``N`` (rows along axis 0) or ``AxB...`` (a block shape)."""
    text = text.strip()
    if text == "auto":
        return "auto"
    parts = text.split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        msg = (
            f"--chunks must be 'auto', a number of rows (e.g. 64) or a block shape (e.g. "
            f"256x256) (got {text!r})"
        )
        raise UsageError(msg) from None
    if any(v < 1 for v in values):
        msg = f"--chunks must hold positive ints (got {text!r})"
        raise UsageError(msg)
    return values[0] if len(values) == 1 else tuple(values)


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``name=value`` pairs; a value is a Python literal if it reads as one, else a string."""
    kwargs: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            msg = f"--kwarg must look like name=value, with a Python name (got {item!r})"
            raise UsageError(msg)
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = raw
        kwargs[name] = value
    return kwargs


def parse_halos(items: Sequence[str], inputs: Sequence[str]) -> list[Any]:
    """The inputs with ``--halo NAME=DEPTH[:BOUNDARY]`` applied: NAME is an input's position
    (0, 1, ...), its path as given to ``--input``, or its file name; DEPTH one int for every
    axis or one per axis (``16`` or ``16,16,0``); BOUNDARY a ``Halo`` boundary name or a
    number (default ``none``). The library checks the values."""
    from .. import Halo

    result: list[Any] = list(inputs)
    for item in items:
        name, sep, spec = item.rpartition("=")
        depth_text, _, boundary_text = spec.partition(":")
        if not sep or not name or not depth_text:
            msg = f"--halo must look like NAME=DEPTH or NAME=DEPTH:BOUNDARY (got {item!r})"
            raise UsageError(msg)
        k = _input_position(name, inputs, item)
        try:
            depths = [int(p) for p in depth_text.split(",")]
        except ValueError:
            msg = f"--halo {item!r}: DEPTH must be an int or comma-separated ints per axis"
            raise UsageError(msg) from None
        boundary: Any = boundary_text or "none"
        try:
            boundary = ast.literal_eval(boundary)
        except (ValueError, SyntaxError):
            pass  # a name
        if isinstance(boundary, bool) or not isinstance(boundary, (str, int, float)):
            boundary = boundary_text
        try:
            result[k] = Halo(inputs[k], depths[0] if len(depths) == 1 else tuple(depths), boundary)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--halo {item!r}: {exc}") from None
    return result


def _input_position(name: str, inputs: Sequence[str], item: str) -> int:
    if name.isdigit():
        k = int(name)
        if k < len(inputs):
            return k
    if name in inputs:
        return list(inputs).index(name)
    matches = [k for k, path in enumerate(inputs) if os.path.basename(path) == name]
    if len(matches) == 1:
        return matches[0]
    given = ", ".join(repr(p) for p in inputs) or "none"
    msg = (
        f"--halo {item!r}: {name!r} is not one of the --input files (given: {given}); "
        "name one by its position (0, 1, ...), its path or its file name"
    )
    raise UsageError(msg)


def load_target(target: str) -> Callable[..., Any]:
    """The function named by ``MODULE:FUNCTION``; MODULE is importable or a .py path."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        msg = (
            "the kernel must be given as MODULE:FUNCTION or path/to/file.py:FUNCTION "
            f"(got {target!r})"
        )
        raise UsageError(msg)
    if module_name.endswith(".py") or os.sep in module_name:
        module = _load_file(module_name)
    else:
        # As `python -m` does, so a module beside the user's data is found by the console
        # script too; workers inherit sys.path.
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                msg = (
                    f"no module named {module_name!r}: give an importable module or the "
                    f"path of a .py file"
                )
                raise UsageError(msg) from exc
            msg = f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            raise UsageError(msg) from exc
        except Exception as exc:
            msg = f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            raise UsageError(msg) from exc
    fn: Any = module
    for part in attr.split("."):
        try:
            fn = getattr(fn, part)
        except AttributeError:
            msg = f"{module_name} has no function {attr!r}"
            raise UsageError(msg) from None
    if not callable(fn):
        msg = f"{target} is not a function (it is a {type(fn).__name__})"
        raise UsageError(msg)
    return fn  # type: ignore[no-any-return]


def _load_file(path: str) -> Any:
    import cloudpickle

    path = os.path.abspath(path)
    if not os.path.isfile(path):
        msg = f"no such file: {path}"
        raise UsageError(msg)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    # A unique name: the file is not importable as a module, and must not shadow one.
    name = f"_memmap_pool_user_{stem}_{secrets.token_hex(4)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        msg = f"cannot load {path} as a Python module"
        raise UsageError(msg)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # As for a script: modules beside the file can be imported by it.
    here = os.path.dirname(path)
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        msg = f"loading {path} failed: {type(exc).__name__}: {exc}"
        raise UsageError(msg) from exc
    # Workers started by spawn or forkserver can't import this module by its made-up name:
    # send its functions by value instead.
    cloudpickle.register_pickle_by_value(module)
    return module


def build_parser(
    commands: dict[str, Callable[[argparse.Namespace], int]],
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run numpy chunk kernels on every core, writing straight into a "
        "memory-mapped .npy file.",
        epilog="exit codes: 0 success, 1 the job failed (doctor: something to do), 2 bad "
        "usage, 130 interrupted, 143 terminated",
    )
    # Also accepted before the command; its own name, since a subcommand's default would
    # overwrite a shared one.
    parser.add_argument(
        "--verbose", "-v", dest="verbose_first", action="store_true", help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    adders = ((_add_run, "run"), (_add_demo, "demo"), (_add_info, "info"), (_add_doctor, "doctor"))
    for add, name in adders:
        command = add(sub)
        command.add_argument(
            "--verbose",
            "-v",
            action="store_true",
            help="debug logging on stderr, and tracebacks of errors",
        )
        command.set_defaults(func=commands[name])
    return parser


def _add_run(sub: Any) -> argparse.ArgumentParser:
    run: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="run a kernel into a .npy file",
        description="Compute an array chunk by chunk with FUNCTION(out, chunk, *inputs, "
        "**kwargs) and write it to a .npy file. Prints a one-line summary.",
    )
    run.add_argument(
        "target",
        metavar="MODULE:FUNCTION",
        help="the kernel: an importable module or a .py file, and a function",
    )
    run.add_argument("--shape", required=True, help="output shape, e.g. 4096,4096")
    run.add_argument("--dtype", default="float64", help="output dtype (default: float64)")
    run.add_argument("--out", required=True, help="the .npy file to write")
    run.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: every usable CPU)"
    )
    run.add_argument(
        "--chunks",
        default="auto",
        help="'auto' (default), rows per chunk (64), or a block shape (256x256)",
    )
    run.add_argument("--order", default="C", choices=["C", "F"], help="memory layout")
    run.add_argument(
        "--input",
        action="extend",
        nargs="+",
        default=[],
        metavar="NPY",
        dest="inputs",
        help=".npy files the kernel reads (passed by reference, in this order)",
    )
    run.add_argument(
        "--halo",
        action="append",
        default=[],
        metavar="NAME=DEPTH[:BOUNDARY]",
        dest="halos",
        help="see input NAME (its position, path or file name) with a halo of DEPTH elements "
        "(an int, or one per axis: 16,16,0) and what lies beyond its edges: none (default), "
        "edge, reflect, symmetric, wrap or a number (repeatable)",
    )
    run.add_argument(
        "--kwarg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        dest="kwargs",
        help="keyword argument of the kernel; VALUE is a Python literal if it "
        "reads as one, else a string (repeatable)",
    )
    run.add_argument(
        "--resume", action="store_true", help="compute only the chunks the output's journal lacks"
    )
    run.add_argument(
        "--progress",
        action="store_true",
        help="show a progress bar on stderr (even when it is not a terminal)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds a chunk may run before its worker is killed",
    )
    run.add_argument(
        "--retries",
        type=int,
        default=None,
        help="re-runs of a chunk whose worker died (default: 2)",
    )
    run.add_argument(
        "--start-method",
        choices=["fork", "forkserver", "spawn"],
        default=None,
        help="how workers start (default: the platform's)",
    )
    run.add_argument(
        "--backend",
        choices=["processes", "threads"],
        default="processes",
        help="worker processes (default), or threads for kernels that release the GIL",
    )
    run.add_argument("--temp-dir", default=None, help="directory for temporary files")
    run.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="run on a Dask cluster, e.g. tcp://host:8786 (needs --shared-dir)",
    )
    run.add_argument(
        "--shared-dir",
        default=None,
        metavar="DIR",
        help="with --scheduler: a directory every cluster worker sees",
    )
    return run


def _add_demo(sub: Any) -> argparse.ArgumentParser:
    demo: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="compute a Mandelbrot image on every core",
        description="Compute a Mandelbrot image with the local pool into a .npy file, colour "
        "it into a PNG, and print time and throughput.",
    )
    demo.add_argument(
        "--size", type=int, default=DEMO_SIZE, help=f"pixels per side (default: {DEMO_SIZE})"
    )
    demo.add_argument(
        "--out",
        default=DEMO_DIR,
        metavar="DIR",
        help=f"directory for mandelbrot.npy and mandelbrot.png (default: ./{DEMO_DIR})",
    )
    demo.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: every usable CPU)"
    )
    demo.add_argument("--progress", action="store_true", help="show progress bars")
    return demo


def _add_info(sub: Any) -> argparse.ArgumentParser:
    info: argparse.ArgumentParser = sub.add_parser(
        "info",
        help="describe a .npy file, and how far an unfinished job got",
        description="Print the shape, dtype and size of a .npy file and, when a job writing "
        "it did not finish, how many of its chunks are done.",
    )
    info.add_argument("file", metavar="FILE.npy")
    return info


def _add_doctor(sub: Any) -> argparse.ArgumentParser:
    doctor: argparse.ArgumentParser = sub.add_parser(
        "doctor",
        help="check this machine as the pool will use it, and say what to do",
        description="Look at the temp dir the pool would choose, huge pages, CPUs and CPU "
        "quotas, BLAS threads, memory-map and open-file limits and the start method; print "
        "one line per finding (ok, warning or problem) with what to do.",
        epilog="exit codes: 0 every finding is ok, 1 something needs doing (a warning or a "
        "problem), 2 bad usage",
    )
    doctor.add_argument(
        "--temp-dir",
        default=None,
        metavar="DIR",
        help="the temp dir to check (default: the pool's choice: $MEMMAP_POOL_TEMP_DIR, else "
        "/dev/shm when it has room, else the system temp dir)",
    )
    doctor.add_argument(
        "--size",
        default=DOCTOR_SIZE,
        metavar="SIZE",
        help=f"the size of a job's output to check for, e.g. 64M, 8G (default: {DOCTOR_SIZE})",
    )
    doctor.add_argument(
        "--json",
        action="store_true",
        help="print the findings as a JSON document, with the values measured",
    )
    return doctor
