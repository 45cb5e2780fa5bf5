"""The ``memmap-pool`` command: run a chunk kernel from the shell, the demo, and ``info``.

::

    memmap-pool run MODULE:FUNCTION --shape 4096,4096 --dtype float32 --out result.npy
    memmap-pool demo [--size N] [--out DIR] [--workers N]
    memmap-pool info FILE.npy

Exit codes: 0 success; 1 the job failed (the error and its chunk on one line of stderr);
2 bad usage (unknown module or function, bad shape, dtype or chunks, ...); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM). No traceback is printed unless ``--verbose`` is given.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import math
import os
import re
import secrets
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._storage import format_bytes

log = logging.getLogger("memmap_pool")

PROG = "memmap-pool"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM

DEMO_SIZE = 4096
"""Pixels per side of the demo image: a few seconds of work on two cores."""

DEMO_DIR = "memmap-pool-demo"


class UsageError(Exception):
    """A bad command line: reported in one line, exit code 2."""


# -- parsing -----------------------------------------------------------------------------------


def _parse_shape(text: str) -> tuple[int, ...]:
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


def _parse_dtype(text: str) -> np.dtype[Any]:
    try:
        dtype = np.dtype(text)
    except TypeError:
        msg = f"--dtype {text!r} is not a numpy dtype (e.g. float32, int64, uint8, complex128)"
        raise UsageError(msg) from None
    if dtype.hasobject:
        msg = f"--dtype {text!r} holds Python objects, which can't live in a file"
        raise UsageError(msg)
    return dtype


def _parse_chunks(text: str) -> Any:
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


def _parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
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


def _load_target(target: str) -> Callable[..., Any]:
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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run numpy chunk kernels on every core, writing straight into a "
        "memory-mapped .npy file.",
        epilog="exit codes: 0 success, 1 the job failed, 2 bad usage, 130 interrupted, "
        "143 terminated",
    )
    # Also accepted before the command; its own name, since a subcommand's default would
    # overwrite a shared one.
    parser.add_argument(
        "--verbose", "-v", dest="verbose_first", action="store_true", help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--verbose",
            "-v",
            action="store_true",
            help="debug logging on stderr, and tracebacks of errors",
        )

    run = sub.add_parser(
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
    common(run)
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser(
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
    common(demo)
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser(
        "info",
        help="describe a .npy file, and how far an unfinished job got",
        description="Print the shape, dtype and size of a .npy file and, when a job writing "
        "it did not finish, how many of its chunks are done.",
    )
    info.add_argument("file", metavar="FILE.npy")
    common(info)
    info.set_defaults(func=_cmd_info)
    return parser


# -- commands ----------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from ._pool import MemmapPool

    shape = _parse_shape(args.shape)
    dtype = _parse_dtype(args.dtype)
    chunks = _parse_chunks(args.chunks)
    kwargs = _parse_kwargs(args.kwargs)
    if not args.out.endswith(".npy"):
        msg = f"--out must be a path ending in .npy (got {args.out!r})"
        raise UsageError(msg)
    if args.workers is not None and args.workers < 1:
        msg = f"--workers must be a positive int (got {args.workers})"
        raise UsageError(msg)
    for path in args.inputs:
        if not os.path.isfile(path):
            msg = f"--input {path!r}: no such file"
            raise UsageError(msg)
    if args.scheduler is not None:
        if args.shared_dir is None:
            msg = "--scheduler needs --shared-dir, a directory every cluster worker sees"
            raise UsageError(msg)
        if args.workers is not None or args.start_method is not None:
            msg = "--workers and --start-method apply to the local pool, not to --scheduler"
            raise UsageError(msg)
    elif args.shared_dir is not None:
        msg = "--shared-dir goes with --scheduler (a local pool uses --temp-dir)"
        raise UsageError(msg)
    fn = _load_target(args.target)

    options: dict[str, Any] = {"temp_dir": args.temp_dir}
    if args.retries is not None:
        options["retries"] = args.retries
    if args.timeout is not None:
        options["timeout"] = args.timeout
    try:
        if args.scheduler is not None:
            shared_dir = str(args.shared_dir)
            pool = MemmapPool.from_dask(args.scheduler, shared_dir=shared_dir, **options)
        else:
            pool = MemmapPool(args.workers, mp_context=args.start_method, **options)
    except ImportError as exc:
        msg = f"{exc} (the Dask extra: pip install 'memmap-pool[dask]')"
        raise UsageError(msg) from exc
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc

    with pool:
        try:
            job = pool.submit_chunks(
                fn,
                shape,
                dtype,
                chunks=chunks,
                order=args.order,
                inputs=args.inputs,
                kwargs=kwargs,
                out=args.out,
                resume=args.resume,
                progress="always" if args.progress else False,
            )
        except (ValueError, TypeError, LookupError, FileNotFoundError, ImportError) as exc:
            # Raised before any work started: the arguments don't fit.
            raise UsageError(str(exc)) from exc
        try:
            result = pool._wait_interruptibly(job)
        except (KeyboardInterrupt, SystemExit):
            _say_resumable(args.out)
            raise
        stats = job.stats
        del result
    ran = stats.chunks_done - stats.chunks_resumed
    resumed = f", {stats.chunks_resumed} already done" if stats.chunks_resumed else ""
    nbytes = math.prod(shape) * dtype.itemsize
    shape_text = "x".join(map(str, shape)) or "scalar"
    sys.stdout.write(
        f"wrote {args.out}: {shape_text} {dtype}, {format_bytes(nbytes)} in "
        f"{stats.wall_time:.2f} s, {stats.throughput / 1e9:.3g} GB/s, "
        f"{ran} of {stats.chunks} chunks run{resumed}, {stats.workers} workers\n"
    )
    return EXIT_OK


def _say_resumable(out: str) -> None:
    """After an interrupt: say how much is kept and how to finish."""
    from ._journal import Journal, journal_path

    try:
        journal = Journal.load(journal_path(os.path.abspath(out)))
    except (OSError, ValueError):
        return
    sys.stderr.write(
        f"{PROG}: {journal.done_count} of {len(journal.done)} chunks are saved in {out}; "
        "rerun with --resume to compute only the rest\n"
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    if args.size < 1:
        msg = f"--size must be a positive number of pixels (got {args.size})"
        raise UsageError(msg)
    if args.workers is not None and args.workers < 1:
        msg = f"--workers must be a positive int (got {args.workers})"
        raise UsageError(msg)
    r = run_demo(args.size, args.out, args.workers, progress="always" if args.progress else False)
    png_bytes = os.path.getsize(r.png)
    sys.stdout.write(
        f"Mandelbrot {r.shape[0]}x{r.shape[1]} on {r.workers} workers, {r.chunks} chunks: "
        f"{r.compute_seconds:.2f} s, {r.mpixels_per_second:.1f} Mpixel/s, "
        f"{r.gb_per_second:.3f} GB/s\n"
        f"  escape times: {os.path.abspath(r.npy)} ({format_bytes(r.bytes_written)} float32)\n"
        f"  image:        {os.path.abspath(r.png)} ({format_bytes(png_bytes)}; colouring "
        f"{r.colour_seconds:.2f} s, PNG {r.png_seconds:.2f} s)\n"
    )
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    from ._journal import Journal, journal_path
    from ._storage import read_npy_header

    path = args.file
    jpath = journal_path(os.path.abspath(path))
    if not os.path.isfile(path):
        msg = f"no such file: {path}"
        raise UsageError(msg)
    try:
        header = read_npy_header(path)
    except (ValueError, OSError, EOFError) as exc:
        msg = f"{path} is not a .npy file ({exc})"
        raise UsageError(msg) from exc
    shape, dtype = header.shape, header.dtype
    nbytes = math.prod(shape) * dtype.itemsize
    lines = [
        f"file:   {path}",
        f"shape:  {shape}",
        f"dtype:  {dtype}",
        f"order:  {header.order}",
        f"size:   {format_bytes(nbytes)} ({nbytes} bytes)",
    ]
    if os.path.exists(jpath):
        try:
            journal = Journal.load(jpath)
        except ValueError as exc:
            lines.append(f"status: unfinished; its journal {jpath} is unreadable ({exc})")
        else:
            lines.append(
                f"status: unfinished: {journal.done_count} of {len(journal.done)} chunks done "
                f"(rerun the job with --resume to finish it)"
            )
    else:
        lines.append("status: complete")
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


# -- errors, signals, logging ------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    """``ValueError: bad value (raised by the kernel in chunk 3 (region [..]) of 32)``."""
    text = str(exc)
    notes = [str(n) for n in getattr(exc, "__notes__", ()) or ()]
    if notes:
        text = f"{text} ({'; '.join(notes)})"
    text = " ".join(text.split())
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


_MAIN_PID = os.getpid()


def _on_sigterm(signum: int, frame: Any) -> None:
    if os.getpid() != _MAIN_PID:
        # A worker forked from this process inherited the handler: die as SIGTERM says.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise SystemExit(EXIT_TERMINATED)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``memmap-pool`` command; returns its exit code.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    global _MAIN_PID
    parser = _build_parser()
    args = parser.parse_args(argv)  # exits with 2 on a bad command line
    verbose = bool(getattr(args, "verbose", False) or getattr(args, "verbose_first", False))
    _setup_logging(verbose)
    _MAIN_PID = os.getpid()
    # SIGTERM (from a batch scheduler, say) stops the job cleanly like Ctrl-C: the job's
    # workers and temporary files go, and a .npy output keeps its finished chunks.
    previous: Any = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args))
    except UsageError as exc:
        if verbose:
            traceback.print_exc()
        sys.stderr.write(f"{PROG} {args.command}: error: {' '.join(str(exc).split())}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        sys.stderr.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    except SystemExit as exc:
        if exc.code != EXIT_TERMINATED:
            raise
        if verbose:
            traceback.print_exc()
        sys.stderr.write(f"{PROG}: terminated\n")
        return EXIT_TERMINATED
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        sys.stderr.write(f"{PROG}: error: {_one_line(exc)}\n")
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
