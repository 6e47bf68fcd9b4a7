"""A pytest plugin that runs INSIDE a grading sandbox: per-test limits and a results log.

Shipped into the grading image and loaded with `-p sandboxd_grading_plugin`; it imports
nothing from sandboxd, since sandboxd is not installed there.

Before each test it arms a wall-clock timer whose signal keeps its default action and a
CPU-time soft limit just above what the process has used, so a test that loops or sleeps
ends the process at once (SIGALRM, SIGXCPU) without any Python code having to run. The
collected node ids, each test's start and its result go to the exec's stderr as they
happen, one line each behind a nonce, so when a test takes the process down (even with
its sandbox), the tests before it keep their results and the grader knows which test it
was: it starts a new run with the tests after it. The stream is the file descriptor
pytest started with, duplicated at import: `-p` plugins load before pytest captures
output, and tests' own output is captured away from it.

Each test's end record carries what it cost: CPU seconds (its process and the children
it waited for) and peak resident memory. The peak is the kernel's high-water mark, reset
before the test where the kernel allows it (/proc/self/clear_refs); where it does not
(gVisor), it is the process's peak so far, an upper bound.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
from typing import Any

import pytest

SECONDS = float(os.environ.get("GRADER_TEST_SECONDS", "0") or 0)
NONCE = os.environ.get("GRADER_NONCE", "")
MAX_TEXT = 4000
_FD = os.dup(2) if NONCE else -1


def _write(record: dict[str, Any]) -> None:
    if _FD < 0:
        return
    line = f"{NONCE} {json.dumps(record)}\n".encode()
    while line:
        line = line[os.write(_FD, line) :]


def _arm() -> None:
    if SECONDS <= 0:
        return
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(used + SECONDS)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _disarm() -> None:
    if SECONDS > 0:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak stays the process's so far


def _peak() -> int:
    """Peak resident bytes: VmHWM, else ru_maxrss (KiB on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def pytest_collection_finish(session: pytest.Session) -> None:
    _write({"collected": [item.nodeid for item in session.items]})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    _write({"start": item.nodeid})
    _reset_peak()
    cpu = _cpu()
    _arm()
    try:
        yield
    finally:
        _disarm()
    _write({"end": item.nodeid, "cpu": round(_cpu() - cpu, 4), "peak": _peak()})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" and report.passed:
        return
    if report.when == "call" and report.passed:
        outcome, message, text = "passed", "", ""
    else:
        outcome = "skipped" if report.skipped else "failed" if report.when == "call" else "error"
        crash = getattr(report.longrepr, "reprcrash", None)
        message = str(getattr(crash, "message", "")) if crash is not None else ""
        text = str(report.longrepr or "")
        if report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
    _write(
        {
            "result": report.nodeid,
            "when": report.when,
            "outcome": outcome,
            "message": message[:MAX_TEXT],
            "output": text[-MAX_TEXT:],
        }
    )
