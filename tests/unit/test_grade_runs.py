"""Reading what a per-test run streamed, and naming what ended it."""

from __future__ import annotations

import json
import signal

from sandboxd.api import ExecResult
from sandboxd.grade_runs import _killed_case, junit_id, parse_cases, read_log
from sandboxd.gradebook import Case


def test_junit_ids_follow_pytest() -> None:
    assert junit_id("test_a.py::test_x") == "test_a::test_x"
    assert junit_id("sub/test_a.py::TestK::test_y[1-2]") == "sub.test_a.TestK::test_y[1-2]"


def _lines(nonce: str, *records: dict[str, object]) -> bytes:
    return b"".join(f"{nonce} {json.dumps(r)}\n".encode() for r in records)


def test_the_log_keeps_the_worst_phase_and_ignores_unframed_lines() -> None:
    raw = (
        _lines("n0", {"start": "t.py::a"})
        + b'{"result": "t.py::a", "outcome": "passed"}\n'  # not behind the nonce: ignored
        + b"other n0 noise\n"
        + _lines(
            "n0",
            {"result": "t.py::a", "when": "call", "outcome": "passed"},
            {"result": "t.py::a", "when": "teardown", "outcome": "error", "message": "boom"},
            {"end": "t.py::a", "cpu": 0.25, "peak": 4096},
            {"start": "t.py::b"},
        )
        + _lines("other", {"end": "t.py::b"})
    )
    log = read_log(raw + _lines("n0", {"collected": ["t.py::a", "t.py::b"]}), "n0")
    assert log.cases == {"t.py::a": Case("error", "boom", "")}
    assert log.started == {"t.py::a", "t.py::b"} and set(log.ended) == {"t.py::a"}
    assert log.finished("t.py::a") == Case("error", "boom", "", 0.25, 4096)
    assert log.collected == ["t.py::a", "t.py::b"]


def test_the_killed_test_gets_the_cause() -> None:
    alarm = ExecResult("nonzero_exit", exit_code=142, signal=signal.SIGALRM)
    assert _killed_case(alarm, 2.0) == ("timed_out", Case("failed", "timed out after 2.0s"))
    xcpu = ExecResult("nonzero_exit", exit_code=152, signal=signal.SIGXCPU)
    assert _killed_case(xcpu, 1.5)[1].message == "timed out after 1.5s"
    oom = ExecResult("out_of_memory", signal=9, message="out of memory (limit 64 MiB)")
    assert _killed_case(oom, 2.0) == (
        "out_of_memory",
        Case("failed", "out of memory (limit 64 MiB)"),
    )
    segv = ExecResult("nonzero_exit", signal=signal.SIGSEGV, message="killed by SIGSEGV")
    assert _killed_case(segv, 2.0) == ("crashed", Case("failed", "crashed: killed by SIGSEGV"))
    quit_ = ExecResult("ok", message="ok")
    assert _killed_case(quit_, 2.0)[1].outcome == "error"


def test_parse_cases_keeps_messages() -> None:
    data = (
        b'<testsuites><testsuite><testcase classname="m" name="a"/>'
        b'<testcase classname="m" name="b"><failure message="assert 1 == 2">trace</failure>'
        b"</testcase></testsuite></testsuites>"
    )
    assert parse_cases(data) == {
        "m::a": Case("passed"),
        "m::b": Case("failed", "assert 1 == 2", "trace"),
    }
