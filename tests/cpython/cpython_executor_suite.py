"""CPython's own ``ProcessPoolExecutor`` tests, run against ``MemmapPool``.

CPython 3.11's ``test_concurrent_futures.py`` (fetched by ``fetch_suite.sh``, never copied
into this repository) builds its process pool test cases from mixins whose
``executor_type`` is ``ProcessPoolExecutor``, one per start method. This module imports that
file and derives, from each of those test cases, a subclass whose ``executor_type`` is
``MemmapPool``: same tests, same ``mp_context`` (the mixins pass a context object, which
``MemmapPool`` takes like ``ProcessPoolExecutor`` does), our pool under test.

The derived classes live in this module so that worker processes started with spawn or
forkserver can unpickle what the tests send them (methods of the test classes, functions of
the CPython module): this module and the CPython file are importable there because
multiprocessing hands ``sys.path`` to those workers, and ``SUITE_ENV`` tells this module,
when a worker imports it, where the CPython file is.

A few tests can't run against any executor but ``ProcessPoolExecutor`` itself: they read its
private attributes. They are listed, with the reason, in ``SKIPS``, the one place where a test
is left out; a name there that matches no test is an error, so the list can't go stale.

Run it through ``run.py`` (one start method per process); it writes one JSON line per event
to ``--results``, so a run cut short still tells which tests finished and which one hung.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import unittest
from collections.abc import Iterator
from typing import Any

import memmap_pool
from memmap_pool import MemmapPool

SUITE_ENV = "MEMMAP_POOL_CPYTHON_SUITE"
"""Path of CPython's test_concurrent_futures.py."""

MODULE_NAME = "test_concurrent_futures"
"""The name the CPython file is imported under (a top-level module: the stdlib's ``test``
package, where it would normally live, is the interpreter's and stays untouched)."""

START_METHODS = ("fork", "forkserver", "spawn")

TEST_TIMEOUT = 120.0
"""Seconds one test may take before the run dumps every thread's stack and exits. The
longest tests wait ``support.SHORT_TIMEOUT`` (30 s) for a deadlock to resolve."""

SCRIPT_TIMEOUT = 60.0
"""Seconds a child interpreter of the interpreter-exit tests may take (each runs ~1 s)."""

LEFTOVER_WAIT = 10.0
"""Seconds the processes the tests started get to exit after the last test."""


@dataclasses.dataclass(frozen=True)
class Skip:
    reason: str
    start_methods: frozenset[str] = frozenset(START_METHODS)


SKIPS: dict[str, Skip] = {
    # Key: "<class that defines the test>.<test method>" in CPython's file.
    "FailingInitializerMixin.test_initializer": Skip(
        "polls ProcessPoolExecutor._broken to see the executor break"
    ),
    "ProcessPoolShutdownTest.test_processes_terminate": Skip(
        "counts ProcessPoolExecutor._processes"
    ),
    "ProcessPoolShutdownTest.test_context_manager_shutdown": Skip(
        "builds a ProcessPoolExecutor itself (not executor_type) and joins its _processes"
    ),
    "ProcessPoolShutdownTest.test_del_shutdown": Skip(
        "builds a ProcessPoolExecutor itself (not executor_type) and joins its "
        "_executor_manager_thread, _processes and _call_queue"
    ),
    "ProcessPoolShutdownTest.test_shutdown_no_wait": Skip(
        "builds a ProcessPoolExecutor itself (not executor_type) and joins its "
        "_executor_manager_thread, _processes and _call_queue"
    ),
    "ProcessPoolExecutorTest.test_killed_child": Skip(
        "picks the worker to kill from ProcessPoolExecutor._processes"
    ),
    "ProcessPoolExecutorTest.test_saturation": Skip(
        "reads ProcessPoolExecutor._max_workers and counts _processes"
    ),
    "ProcessPoolExecutorTest.test_idle_process_reuse_one": Skip(
        "reads ProcessPoolExecutor._max_workers and counts _processes"
    ),
    "ProcessPoolExecutorTest.test_idle_process_reuse_multiple": Skip(
        "reads ProcessPoolExecutor._max_workers and counts _processes"
    ),
    "ProcessPoolExecutorTest.test_max_tasks_per_child": Skip(
        # Under fork the test only checks that the constructor refuses max_tasks_per_child.
        "counts ProcessPoolExecutor._processes",
        frozenset({"forkserver", "spawn"}),
    ),
    "ProcessPoolExecutorTest.test_max_tasks_per_child_defaults_to_spawn_context": Skip(
        "reads ProcessPoolExecutor._mp_context"
    ),
    "ExecutorDeadlockTest.test_shutdown_deadlock_pickle": Skip(
        "joins ProcessPoolExecutor._executor_manager_thread"
    ),
}

EXPECTED_BASES = (
    "ExecutorTest",
    "ProcessPoolExecutorTest",
    "ExecutorShutdownTest",
    "ProcessPoolShutdownTest",
    "WaitTests",
    "AsCompletedTests",
    "ExecutorDeadlockTest",
    "InitializerMixin",
    "FailingInitializerMixin",
)
"""CPython's test bases that must each have a process pool test case per start method: a
file that lacks one is not the one this harness was written for."""

SKIP_PREFIX = "[skip list] "
"""Starts the reason of every skip that comes from SKIPS (other skips are CPython's own)."""


def load_cpython_module() -> Any:
    """Import CPython's test file from the path in ``SUITE_ENV``."""
    path = os.environ.get(SUITE_ENV)
    if not path or not os.path.isfile(path):
        msg = f"${SUITE_ENV} must name CPython's test_concurrent_futures.py (got {path!r})"
        raise RuntimeError(msg)
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module = importlib.import_module(MODULE_NAME)
    # Its child-interpreter tests import it as test.test_concurrent_futures; see _script_prelude.
    sys.modules.setdefault(f"test.{MODULE_NAME}", module)
    return module


def _defining_class(cls: type, attr: str) -> type:
    return next(k for k in cls.__mro__ if attr in vars(k))


def _skipped(reason: str) -> Any:
    @unittest.skip(SKIP_PREFIX + reason)
    def test(self: unittest.TestCase) -> None:
        pass

    return test


def _derive_classes(cpython: Any) -> dict[str, tuple[type, str]]:
    """MemmapPool variants of CPython's process pool test cases: name -> (class, method)."""
    mixins = {
        cpython.ProcessPoolForkMixin: "fork",
        cpython.ProcessPoolForkserverMixin: "forkserver",
        cpython.ProcessPoolSpawnMixin: "spawn",
    }
    used: set[str] = set()
    derived: dict[str, tuple[type, str]] = {}
    for name, cls in sorted(vars(cpython).items()):
        if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
            continue
        method = next((m for mixin, m in mixins.items() if issubclass(cls, mixin)), None)
        if method is None:
            continue
        new_name = "MemmapPool" + name.removeprefix("ProcessPool")
        namespace: dict[str, Any] = {
            "executor_type": MemmapPool,
            "__module__": __name__,
            "__qualname__": new_name,
        }
        for attr in dir(cls):
            if not attr.startswith("test"):
                continue
            key = f"{_defining_class(cls, attr).__name__}.{attr}"
            skip = SKIPS.get(key)
            if skip is not None:
                used.add(key)
                if method in skip.start_methods:
                    namespace[attr] = _skipped(skip.reason)
        if issubclass(cls, cpython.ExecutorDeadlockTest):
            namespace["_fail_on_deadlock"] = _fail_on_deadlock
        derived[new_name] = (type(new_name, (cls,), namespace), method)
    for base in EXPECTED_BASES:
        for method in START_METHODS:
            if not any(
                issubclass(c, getattr(cpython, base)) and m == method for c, m in derived.values()
            ):
                msg = f"CPython's file has no {base} test case for {method}: is it 3.11's?"
                raise RuntimeError(msg)
    stale = set(SKIPS) - used
    if stale:
        msg = f"SKIPS names tests that CPython's file doesn't have: {sorted(stale)}"
        raise RuntimeError(msg)
    return derived


def _fail_on_deadlock(self: Any, executor: Any) -> None:
    """Stands in for CPython's, which kills the workers it finds in ``_processes``."""
    with contextlib.suppress(Exception):
        faulthandler.dump_traceback(file=sys.__stderr__)
    for pid in _descendants():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    executor.shutdown(wait=True)
    self.fail("executor deadlock (stacks dumped to stderr)")


# -- the interpreter-exit tests ----------------------------------------------------------------


def _script_prelude() -> str:
    """Code run before the script of a child-interpreter test.

    Those scripts import the executor type from concurrent.futures by name and the test
    helpers from test.test_concurrent_futures, in an isolated interpreter (-I: no
    PYTHONPATH). The prelude makes both resolve: it puts this package's source, the CPython
    file and this module on sys.path, and exposes MemmapPool as concurrent.futures.MemmapPool.
    It also imports multiprocessing, which the test_hang_gh83386 script uses without
    importing (that script has only ever run for thread pools in CPython).
    """
    package_src = os.path.dirname(os.path.dirname(os.path.abspath(memmap_pool.__file__)))
    suite_dir = os.path.dirname(os.path.abspath(os.environ[SUITE_ENV]))
    paths = [package_src, suite_dir, os.path.dirname(os.path.abspath(__file__))]
    return "\n".join(
        [
            "import sys, os",
            f"sys.path[:0] = {paths!r}",
            f"os.environ[{SUITE_ENV!r}] = {os.environ[SUITE_ENV]!r}",
            "import multiprocessing",
            "import concurrent.futures",
            "import memmap_pool",
            f"import {MODULE_NAME}",
            f"sys.modules['test.{MODULE_NAME}'] = {MODULE_NAME}",
            "concurrent.futures.MemmapPool = memmap_pool.MemmapPool",
            "",
        ]
    )


def _assert_script_ok(*args: str) -> tuple[int, bytes, bytes]:
    """Stands in for test.support.script_helper.assert_python_ok in CPython's module: same
    interpreter flags (-X faulthandler -I), same checks, plus the prelude and a time limit, so
    that a child that never exits fails its test instead of hanging the run."""
    if len(args) != 2 or args[0] != "-c":
        msg = f"unexpected assert_python_ok arguments: {args!r}"
        raise AssertionError(msg)
    cmd = [sys.executable, "-X", "faulthandler", "-I", "-c", _script_prelude() + args[1]]
    env = dict(os.environ, TERM="")
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        msg = (
            f"child interpreter did not exit within {SCRIPT_TIMEOUT:g} s\n"
            f"stdout:\n{out.decode(errors='replace')}\nstderr:\n{err.decode(errors='replace')}"
        )
        raise AssertionError(msg) from None
    if proc.returncode != 0:
        msg = (
            f"child interpreter exited with {proc.returncode}\n"
            f"stdout:\n{out.decode(errors='replace')}\nstderr:\n{err.decode(errors='replace')}"
        )
        raise AssertionError(msg)
    return proc.returncode, out, err


# -- results --------------------------------------------------------------------------------


class _Recorder(unittest.TextTestResult):
    """Writes one JSON line per test start and outcome, and bounds each test's time."""

    def __init__(self, *args: Any, sink: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink
        self._started = 0.0
        self._current = ""

    def _emit(self, **record: Any) -> None:
        self._sink.write(json.dumps(record) + "\n")
        self._sink.flush()

    def startTest(self, test: unittest.TestCase) -> None:
        self._current = test.id()
        self._started = time.monotonic()
        self._emit(event="start", id=self._current)
        faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True, file=sys.__stderr__)
        super().startTest(test)

    def stopTest(self, test: unittest.TestCase) -> None:
        faulthandler.cancel_dump_traceback_later()
        super().stopTest(test)

    def _outcome(self, test: Any, outcome: str, detail: str = "") -> None:
        seconds = time.monotonic() - self._started if test.id() == self._current else 0.0
        self._emit(event="result", id=test.id(), outcome=outcome, detail=detail, seconds=seconds)

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self._outcome(test, "passed")

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self._outcome(test, "failed", self._exc_info_to_string(err, test))

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        self._outcome(test, "error", self._exc_info_to_string(err, test))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self._outcome(test, "skipped", reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._outcome(test, "passed", "expected failure")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self._outcome(test, "failed", "unexpected success")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "failed" if issubclass(err[0], test.failureException) else "error"
            self._outcome(subtest, kind, self._exc_info_to_string(err, test))

    def warn(self, text: str) -> None:
        """Environment changes CPython's helpers report (dangling threads, unreaped children)."""
        self._emit(event="warning", id=self._current, text=text)


_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def _descendants() -> list[int]:
    """Live descendants of this process, less multiprocessing's per-process helpers."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(h in " ".join(proc.cmdline()) for h in _HELPERS):
                continue
        except psutil.Error:
            continue
        found.append(proc.pid)
    return found


def _become_subreaper() -> None:
    """Have the workers that outlive the process that started them (the pools of the
    interpreter-exit tests' child interpreters) re-parented to this process rather than to
    init, so that _leftovers() sees them."""
    import ctypes

    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _leftovers() -> list[int]:
    deadline = time.monotonic() + LEFTOVER_WAIT
    while True:
        left = _descendants()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return left


def _suite(classes: Iterator[type], names: list[str] | None) -> unittest.TestSuite:
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for cls in classes:
        for test in loader.loadTestsFromTestCase(cls):
            if not names or any(n in test.id() for n in names):
                suite.addTest(test)
    return suite


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start-method", choices=START_METHODS, required=True)
    parser.add_argument(
        "--future-tests", action="store_true", help="also run FutureTests (no executor)"
    )
    parser.add_argument("--results", required=True, help="JSON lines file to write")
    parser.add_argument("-k", action="append", help="only tests whose id contains this")
    args = parser.parse_args(argv)

    cpython = load_cpython_module()
    from test import support

    _become_subreaper()

    cpython.assert_python_ok = _assert_script_ok
    with open(args.results, "w", encoding="utf-8") as sink:
        recorder: list[_Recorder] = []

        def print_warning(text: str) -> None:
            if recorder:
                recorder[0].warn(text)
            print(f"Warning -- {text}", file=sys.__stderr__, flush=True)

        support.print_warning = print_warning
        classes = [c for c, m in DERIVED.values() if m == args.start_method]
        if args.future_tests:
            classes.append(cpython.FutureTests)
        suite = _suite(iter(classes), args.k)

        def make_result(*a: Any, **kw: Any) -> _Recorder:
            result = _Recorder(*a, sink=sink, **kw)
            recorder.append(result)
            return result

        runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=2, resultclass=make_result)  # type: ignore[arg-type]
        sink.write(json.dumps({"event": "plan", "count": suite.countTestCases()}) + "\n")
        sink.flush()
        runner.run(suite)
        left = _leftovers()
        sink.write(json.dumps({"event": "end", "leftover_processes": left}) + "\n")
    return 0


# Built at import, also in workers: they unpickle test methods by these classes' names.
_CPYTHON = load_cpython_module() if os.environ.get(SUITE_ENV) else None
DERIVED: dict[str, tuple[type, str]] = _derive_classes(_CPYTHON) if _CPYTHON else {}
globals().update({name: cls for name, (cls, _) in DERIVED.items()})
