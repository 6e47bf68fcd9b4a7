"""Grading without an engine: reading submissions, parsing JUnit XML, judging a run."""

from __future__ import annotations

import os
import signal
import zipfile
from pathlib import Path

import pytest

from sandboxd import errors
from sandboxd.api import ExecResult
from sandboxd.gradebook import Course
from sandboxd.grading import (
    GradeSettings,
    collection_verdict,
    jobs,
    judge_run,
    parse_junit,
    pytest_files,
    resolved,
)
from sandboxd.limits import Caps
from sandboxd.submissions import load_submissions

JUNIT = b"""<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="test_a" name="test_ok" time="0.1"/>
<testcase classname="test_a" name="test_bad" time="0.1"><failure message="x"/></testcase>
<testcase classname="test_b" name="test_skip[1]" time="0"><skipped message="s"/></testcase>
<testcase classname="test_b" name="test_err" time="0"><error message="e"/></testcase>
<testcase classname="test_b" name="test_err" time="0"/>
</testsuite></testsuites>"""


def test_parse_junit_outcomes_sorted_and_worst_kept() -> None:
    assert parse_junit(JUNIT) == {
        "test_a::test_bad": "failed",
        "test_a::test_ok": "passed",
        "test_b::test_err": "error",
        "test_b::test_skip[1]": "skipped",
    }
    with pytest.raises(errors.InvalidArgument):
        parse_junit(b"<not xml")


@pytest.mark.parametrize(
    ("result", "tests", "verdict"),
    [
        (ExecResult(verdict="ok"), {"t::a": "passed"}, "passed"),
        (ExecResult(verdict="nonzero_exit", exit_code=1), {"t::a": "failed"}, "failed"),
        (ExecResult(verdict="timed_out", message="timed out after 2.0s"), None, "timed_out"),
        (ExecResult(verdict="out_of_memory"), None, "out_of_memory"),
        (ExecResult(verdict="nonzero_exit", exit_code=139, signal=11), None, "crashed"),
        (
            ExecResult(verdict="nonzero_exit", exit_code=152, signal=signal.SIGXCPU),
            None,
            "timed_out",
        ),
        (
            ExecResult(verdict="nonzero_exit", exit_code=137, signal=9, cpu_seconds=5.1),
            None,
            "timed_out",
        ),
        (ExecResult(verdict="nonzero_exit", exit_code=2), None, "error"),
        (ExecResult(verdict="ok"), None, "error"),  # exit 0 but no results written
        # Results that contradict the exit status: a forged file without a matching exit.
        (ExecResult(verdict="nonzero_exit", exit_code=1), {"t::a": "passed"}, "inconsistent"),
        (ExecResult(verdict="ok"), {"t::a": "failed"}, "inconsistent"),
        (ExecResult(verdict="ok"), {}, "inconsistent"),
    ],
)
def test_judge_run(result: ExecResult, tests: dict[str, str] | None, verdict: str) -> None:
    assert judge_run(result, tests, cpu_limit=4)[0] == verdict  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("result", "verdict", "message"),
    [
        # A loop at import spends the submission's CPU budget: timed out, as a suite run says.
        (ExecResult(verdict="nonzero_exit", signal=signal.SIGXCPU), "timed_out", "CPU time"),
        (ExecResult(verdict="nonzero_exit", signal=11), "crashed", "signal 11"),
        (ExecResult(verdict="out_of_memory", message="out of memory"), "out_of_memory", "out of"),
        (ExecResult(verdict="nonzero_exit", exit_code=2), "error", "collection failed: E"),
    ],
)
def test_a_submission_stopped_before_its_first_test(
    result: ExecResult, verdict: str, message: str
) -> None:
    got = collection_verdict(result, "collection failed: E", GradeSettings())
    assert got[0] == verdict and message in got[1], got


def test_defaults_come_from_the_machine_and_the_server_caps(tmp_path: Path) -> None:
    assert jobs(GradeSettings(jobs=3), slots=64) == 3
    assert jobs(GradeSettings(jobs=100), slots=8) == 8  # more would queue for admission
    assert jobs(GradeSettings(), slots=64) == 2 * (os.cpu_count() or 1)
    caps = Caps(timeout_seconds=2.0, sandboxes=1)
    course, settings = resolved(Course(tmp_path), GradeSettings(cpu_seconds=20.0), caps)
    assert (course.test_timeout, settings.jobs) == (2.0, 1)  # the server's cap on a run
    course, _ = resolved(Course(tmp_path), GradeSettings(cpu_seconds=6.0), Caps())
    assert course.test_timeout == 3.0  # half the CPU budget: a loop leaves room
    course, _ = resolved(Course(tmp_path), GradeSettings(), Caps())
    assert course.test_timeout == 5.0
    course, _ = resolved(Course(tmp_path, test_timeout=0.0), GradeSettings(), Caps())
    assert course.test_timeout == 0.0  # off: one run for the whole suite


def test_load_submissions_folders_and_zips_safely(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "calc.py").write_text("x = 1\n")
    (tmp_path / "b" / "__pycache__").mkdir()
    (tmp_path / "b" / "__pycache__" / "calc.pyc").write_bytes(b"\0")
    (tmp_path / "b" / "link.py").symlink_to("/etc/passwd")
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("a/calc.py", "x = 2\n")
        zf.writestr("a/pkg/mod.py", "y = 3\n")
    (tmp_path / "notes.txt").write_text("ignored")
    subs = load_submissions(tmp_path)
    assert [(s.name, dict(s.files)) for s in subs] == [
        ("a", {"calc.py": b"x = 2\n", "pkg/mod.py": b"y = 3\n"}),
        ("b", {"calc.py": b"x = 1\n"}),
    ]
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../../escape.py", "boom")
    with pytest.raises(errors.InvalidArgument, match=r"\.\."):
        load_submissions(tmp_path)


def test_pytest_files_are_pure_python_with_metadata() -> None:
    files = pytest_files()
    names = set(files)
    assert "grader/lib/_pytest/main.py" in names and "grader/lib/pluggy/__init__.py" in names
    assert any(
        n.startswith("grader/lib/pytest-") and n.endswith("/entry_points.txt") for n in names
    )
    assert not any(n.endswith((".so", ".pyc")) for n in names)
