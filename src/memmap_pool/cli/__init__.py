"""The ``memmap-pool`` command: run a chunk kernel from the shell, the demo, ``info`` and
``doctor``.

::

    memmap-pool run MODULE:FUNCTION --shape 4096,4096 --dtype float32 --out result.npy
    memmap-pool demo [--size N] [--out DIR] [--workers N]
    memmap-pool info FILE.npy
    memmap-pool doctor [--temp-dir DIR] [--size SIZE] [--json]

Exit codes: 0 success; 1 the job failed (the error and its chunk on one line of stderr), or
``doctor`` found something to do; 2 bad usage (unknown module or function, bad shape, dtype or
chunks, ...); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). No traceback is printed
unless ``--verbose`` is given.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence

from .._signals import EXIT_TERMINATED, sigterm_as_exit
from ._commands import cmd_demo, cmd_doctor, cmd_info, cmd_run
from ._parse import PROG, UsageError, build_parser

log = logging.getLogger("memmap_pool")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

__all__ = ["main"]


def _one_line(exc: BaseException) -> str:
    """``ValueError: bad value (raised by the kernel in chunk 3 (region [..]) of 32)``."""
    text = str(exc)
    notes = [str(n) for n in getattr(exc, "__notes__", ()) or ()]
    if notes:
        text = f"{text} ({'; '.join(notes)})"
    text = " ".join(text.split())
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


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
    parser = build_parser(
        {"run": cmd_run, "demo": cmd_demo, "info": cmd_info, "doctor": cmd_doctor}
    )
    args = parser.parse_args(argv)  # exits with 2 on a bad command line
    verbose = bool(getattr(args, "verbose", False) or getattr(args, "verbose_first", False))
    _setup_logging(verbose)
    try:
        # SIGTERM (from a batch scheduler, say) stops the job cleanly like Ctrl-C: the job's
        # workers and temporary files go, and a .npy output keeps its finished chunks.
        with sigterm_as_exit():
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
