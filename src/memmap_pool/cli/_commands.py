"""The commands: ``run`` a kernel into a ``.npy``, the ``demo``, ``info`` on a file, and
``doctor`` on the machine."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from .._storage import format_bytes
from ._parse import (
    PROG,
    UsageError,
    load_target,
    parse_chunks,
    parse_dtype,
    parse_halos,
    parse_kwargs,
    parse_shape,
    parse_size,
)

USAGE_ERRORS = (ValueError, TypeError, LookupError, FileNotFoundError, ImportError)
"""What the library raises for arguments that don't fit, before any work starts."""


def cmd_run(args: argparse.Namespace) -> int:
    from .._pool import MemmapPool

    shape = parse_shape(args.shape)
    dtype = parse_dtype(args.dtype)
    chunks = parse_chunks(args.chunks)
    kwargs = parse_kwargs(args.kwargs)
    inputs = parse_halos(args.halos, args.inputs)
    if args.scheduler is not None:
        if args.shared_dir is None:
            msg = "--scheduler needs --shared-dir, a directory every cluster worker sees"
            raise UsageError(msg)
        if args.workers is not None or args.start_method is not None:
            msg = "--workers and --start-method apply to the local pool, not to --scheduler"
            raise UsageError(msg)
        if args.backend != "processes":
            msg = "--backend applies to the local pool, not to --scheduler"
            raise UsageError(msg)
    elif args.shared_dir is not None:
        msg = "--shared-dir goes with --scheduler (a local pool uses --temp-dir)"
        raise UsageError(msg)
    fn = load_target(args.target)

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
            pool = MemmapPool(
                args.workers, mp_context=args.start_method, backend=args.backend, **options
            )
    except ImportError as exc:
        msg = f"{exc} (the Dask extra: pip install 'memmap-pool[dask]')"
        raise UsageError(msg) from exc
    except (ValueError, TypeError) as exc:
        if args.workers is not None and "max_workers" in str(exc):
            raise UsageError(f"--workers: {exc}") from exc
        raise UsageError(str(exc)) from exc

    with pool:
        try:
            job = pool.submit_chunks(
                fn,
                shape,
                dtype,
                chunks=chunks,
                order=args.order,
                inputs=inputs,
                kwargs=kwargs,
                out=args.out,
                resume=args.resume,
                progress="always" if args.progress else False,
            )
        except USAGE_ERRORS as exc:
            raise UsageError(_in_cli_terms(str(exc))) from exc
        try:
            result = job.wait()
        except (KeyboardInterrupt, SystemExit):
            _say_resumable(args.out)
            raise
        stats = job.stats
        del result
    ran = stats.chunks_done - stats.chunks_resumed
    resumed = f", {stats.chunks_resumed} already done" if stats.chunks_resumed else ""
    nbytes = math.prod(shape) * dtype.itemsize
    shape_text = "x".join(map(str, shape)) or "scalar"
    if ran == 0 and stats.chunks:
        sys.stdout.write(
            f"{args.out} is complete: {shape_text} {dtype}, {format_bytes(nbytes)}, all "
            f"{stats.chunks} chunks were already done; nothing to run\n"
        )
        return 0
    sys.stdout.write(
        f"wrote {args.out}: {shape_text} {dtype}, {format_bytes(nbytes)} in "
        f"{stats.wall_time:.2f} s, {stats.throughput / 1e9:.3g} GB/s, "
        f"{ran} of {stats.chunks} chunks run{resumed}, {stats.workers} workers\n"
    )
    return 0


def _in_cli_terms(message: str) -> str:
    """The library names its Python arguments; say the command line's options instead."""
    return message.replace("pass resume=False", "run without --resume").replace(
        "resume=True needs out=", "--resume needs --out"
    )


def _say_resumable(out: str) -> None:
    """After an interrupt: say how much is kept and how to finish."""
    from .._resume import Journal, journal_path

    try:
        journal = Journal.load(journal_path(os.path.abspath(out)))
    except (OSError, ValueError):
        return
    sys.stderr.write(
        f"{PROG}: {journal.done_count} of {len(journal.done)} chunks are saved in {out}; "
        "rerun with --resume to compute only the rest\n"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    try:
        r = run_demo(
            args.size, args.out, args.workers, progress="always" if args.progress else False
        )
    except (ValueError, TypeError) as exc:
        flag = "--size" if "size" in str(exc) else "--workers"
        raise UsageError(f"{flag}: {exc}") from exc
    png_bytes = os.path.getsize(r.png)
    sys.stdout.write(
        f"Mandelbrot {r.shape[0]}x{r.shape[1]} on {r.workers} workers, {r.chunks} chunks: "
        f"{r.compute_seconds:.2f} s, {r.mpixels_per_second:.1f} Mpixel/s, "
        f"{r.gb_per_second:.3f} GB/s\n"
        f"  escape times: {os.path.abspath(r.npy)} ({format_bytes(r.bytes_written)} float32)\n"
        f"  image:        {os.path.abspath(r.png)} ({format_bytes(png_bytes)}; colouring "
        f"{r.colour_seconds:.2f} s, PNG {r.png_seconds:.2f} s)\n"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .._npy import read_npy
    from .._resume import Journal, journal_path

    path = args.file
    jpath = journal_path(os.path.abspath(path))
    if not os.path.isfile(path):
        msg = f"no such file: {path}"
        raise UsageError(msg)
    try:
        header = read_npy(path, "")
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from exc
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
        except (ValueError, OSError) as exc:
            lines.append(f"status: unfinished; its journal {jpath} is unreadable ({exc})")
        else:
            lines.append(
                f"status: unfinished: {journal.done_count} of {len(journal.done)} chunks done "
                f"(rerun the job with --resume to finish it)"
            )
    else:
        lines.append("status: complete")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """One line per finding on stdout (or a JSON document); 0 when all are ok, else 1."""
    from .._doctor import diagnose, worst

    size = parse_size(args.size)
    if args.temp_dir is not None and not os.path.isdir(args.temp_dir):
        msg = f"--temp-dir {args.temp_dir!r} is not a directory"
        raise UsageError(msg)
    findings = diagnose(args.temp_dir, size)
    level = worst(findings)
    if args.json:
        document = {"level": level, "findings": [f.as_dict() for f in findings]}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        sys.stdout.write("".join(f.line() + "\n" for f in findings))
    return 0 if level == "ok" else 1
