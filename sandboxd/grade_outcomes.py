"""What running a submission gives before points: its verdict and per-test outcomes.

The three ways a submission runs: the course's build command, then either the whole
suite in one exec under the submission-wide limits, or (pytest courses) every test under
its own limits (grade_runs.py). The verdict for a limit or a crash is the service's,
measured outside the sandbox.
"""

from __future__ import annotations

import dataclasses
import posixpath
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

from sandboxd.api import ExecResult
from sandboxd.grade_runs import (
    GRADER,
    PYTEST,
    SubmissionBox,
    cpu_killed,
    cpu_limited,
    fresh_junit_path,
    parse_cases,
    run_tests,
    tail,
)
from sandboxd.gradebook import Case, Course, Outcome
from sandboxd.verdicts import VERDICTS, StoppedVerdict
from sandboxd.verdicts import Verdict as ExecVerdict

#: Exec verdicts where the command ran to its own end.
VERDICT_RAN = ("ok", "nonzero_exit")

#: A submission's verdict: what the tests' results say, or the service's verdict when it
#: stopped the run (a limit, or a crash: the test runner itself died or the sandbox did).
Verdict = Literal[
    "passed",  # every test passed
    "failed",  # tests ran, some failed (per-test runs: also tests a limit stopped)
    "error",  # the tests could not run (collection error, no tests, bad usage)
    "build_failed",  # the course's build command failed; its output is the message
    "inconsistent",  # the JUnit XML contradicts the runner's exit status
    StoppedVerdict,
]


@dataclass(frozen=True)
class GradeSettings:
    profile: str = "untrusted"
    runtime: str = ""
    #: CPU seconds the test run may use: what stops a loop, however loaded the host is.
    cpu_seconds: float = 10.0
    #: Wall seconds: the backstop for a run that waits instead of computing.
    timeout_seconds: float = 60.0
    memory_bytes: int = 256 * 1024 * 1024
    cpus: float = 1.0
    pids: int = 64
    #: Submissions at once; 0: two per core here, at most the server's slots.
    jobs: int = 0


def parse_junit(data: bytes) -> dict[str, Outcome]:
    """Test id -> outcome from pytest's JUnit XML.

    Raises:
        InvalidArgument: not JUnit XML.
    """
    return {test_id: case.outcome for test_id, case in parse_cases(data).items()}


def _stopped(verdict: ExecVerdict) -> StoppedVerdict | None:
    """The service's verdict when it, not pytest, ended the run."""
    return None if VERDICTS[verdict].finished else cast(StoppedVerdict, verdict)


def judge_run(
    result: ExecResult, tests: Mapping[str, Outcome] | None, cpu_limit: int = 0
) -> tuple[Verdict, str]:
    """The submission's verdict from the service's result and the parsed JUnit XML."""
    stopped = _stopped(result.verdict)
    if stopped is not None:
        return stopped, result.message
    code = result.exit_code
    if cpu_killed(result, cpu_limit):
        return "timed_out", f"CPU time limit of {cpu_limit}s exceeded"
    if result.signal:
        return "crashed", f"pytest was killed by signal {result.signal}"
    if tests is None:
        return "error", f"pytest wrote no results (exit code {code})"
    failed = [t for t, o in tests.items() if o in ("failed", "error")]
    if code == 0:
        if failed or not tests:
            return "inconsistent", "pytest exited 0 but its results show failures or no tests"
        return "passed", f"all {len(tests)} tests passed"
    if code == 1:
        if not failed:
            return "inconsistent", "pytest exited 1 but its results show no failure"
        return "failed", f"{len(failed)} of {len(tests)} tests failed"
    if code == 5:
        return "error", "no tests were collected"
    return "error", f"pytest could not run the tests (exit code {code})"


@dataclass(frozen=True)
class Outcomes:
    """What running a submission's tests gave, before points: the verdict, each test's
    result by id, and what the run cost."""

    verdict: Verdict
    message: str
    cases: Mapping[str, Case]
    exit_code: int = 0
    cpu_seconds: float = 0.0
    peak_memory_bytes: int = 0
    wall_seconds: float = 0.0

    @classmethod
    def stopped(cls, verdict: Verdict, message: str, result: ExecResult) -> Outcomes:
        """A submission stopped before any test ran: a failed build or collection."""
        return cls(
            verdict,
            message,
            {},
            exit_code=result.exit_code,
            cpu_seconds=result.cpu_seconds,
            peak_memory_bytes=result.peak_memory_bytes,
            wall_seconds=result.wall_seconds,
        )


def suite_run(box: SubmissionBox, course: Course, settings: GradeSettings) -> Outcomes:
    """The whole suite in one exec under the submission-wide limits."""
    junit_path = fresh_junit_path()
    if course.runner == "command":
        command = course.test.replace("{junit}", junit_path)
        command = f"mkdir -p {posixpath.dirname(junit_path)} && {command}"
    else:
        command = shlex.join([*PYTEST, f"--junitxml={junit_path}", f"{GRADER}/tests"])
        command = f"exec {command}"
    command, cpu_limit = cpu_limited(command, settings.cpu_seconds)
    # A course's own runner may apply its per-test limit itself.
    seconds = course.test_timeout or 0.0
    env = {"GRADER_TEST_SECONDS": f"{seconds:g}"} if seconds else {}
    output = bytearray()
    result = box.exec(["sh", "-c", command], settings.timeout_seconds, output, env)
    cases = box.fetch_cases(junit_path) if _stopped(result.verdict) is None else None
    tests = {t: c.outcome for t, c in (cases or {}).items()}
    if course.runner == "command" and cases is not None and result.verdict in VERDICT_RAN:
        # Test runners differ in exit codes; what they wrote decides, as pytest's 0/1 would.
        failed = any(o in ("failed", "error") for o in tests.values())
        result = dataclasses.replace(
            result, verdict="nonzero_exit" if failed else "ok", exit_code=int(failed)
        )
    verdict, message = judge_run(result, None if cases is None else tests, cpu_limit)
    if verdict == "error" and course.runner == "command":
        message = _no_junit(result, bytes(output))
    keep = verdict in ("passed", "failed")
    return Outcomes(
        verdict,
        message,
        (cases or {}) if keep else {},
        exit_code=result.exit_code,
        cpu_seconds=result.cpu_seconds,
        peak_memory_bytes=result.peak_memory_bytes,
        wall_seconds=result.wall_seconds,
    )


def _no_junit(result: ExecResult, output: bytes) -> str:
    """Why a course's test command gave no results, with the end of what it printed."""
    code = result.exit_code
    why = f"exit code {code}" + (": command not found" if code == 127 else "")
    said = tail(output, 1500).strip()
    return f"the test command wrote no JUnit XML to {{junit}} ({why})" + (
        f": {said}" if said else ""
    )


def collection_verdict(
    first: ExecResult, error: str, settings: GradeSettings
) -> tuple[Verdict, str]:
    """A submission that stopped before its first test: the limit or crash that stopped
    it, as a whole-suite run would say (a loop or a segfault at import), else `error`."""
    verdict, message = judge_run(first, None, cpu_limited("", settings.cpu_seconds)[1])
    return (verdict, message) if verdict != "error" else ("error", error)


def per_test_run(box: SubmissionBox, course: Course, settings: GradeSettings) -> Outcomes:
    """Every test under its own limits, in as few processes as the kills allow."""
    started = time.monotonic()
    seconds = course.test_timeout or 0.0
    suite = run_tests(box, seconds, settings.timeout_seconds, settings.cpu_seconds)
    if suite.collection_error:
        return Outcomes.stopped(
            *collection_verdict(suite.first, suite.collection_error, settings), suite.first
        )
    runs = suite.runs
    failed = [r for r in runs if r.case.outcome in ("failed", "error")]
    spent = [r for r in runs if r.case.message.startswith("not run:")]
    verdict: Verdict = "timed_out" if spent else "failed" if failed else "passed"
    message = (
        f"{len(failed)} of {len(runs)} tests failed" if failed else f"all {len(runs)} tests passed"
    )
    if spent:
        message = f"{spent[0].case.message} ({len(spent)} of {len(runs)} tests not run)"
    return Outcomes(
        verdict,
        message,
        {r.test_id: r.case for r in runs},
        exit_code=suite.first.exit_code,
        cpu_seconds=suite.cpu_seconds,
        peak_memory_bytes=suite.peak_memory_bytes,
        wall_seconds=time.monotonic() - started,
    )


def build(box: SubmissionBox, course: Course) -> Outcomes | None:
    """The course's build command; an `Outcomes` when it failed, else None."""
    output = bytearray()
    result = box.exec(["sh", "-c", f"{course.build} 2>&1"], course.build_timeout, output)
    if result.verdict == "ok":
        return None
    why = result.message
    if result.verdict == "timed_out":
        why = f"timed out after {course.build_timeout:.1f}s"
    elif VERDICTS[result.verdict].finished:
        why = f"exit code {result.exit_code}"
    return Outcomes.stopped(
        "build_failed", f"build failed ({why}): {tail(output, 2000).strip()}", result
    )
