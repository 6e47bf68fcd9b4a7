"""Batch grading: a course's tests against every submission, each in a fresh sandbox.

A course (gradebook.py) is a pytest suite, or any toolchain through its course.toml: a
build command, then a test command that writes JUnit XML. A pytest course runs each test
under its own limits (grade_runs.py; a default budget unless the course or the command
line sets one, 0 turning it off), so one looping test does not zero a submission; a
command course's runner gets the budget in $GRADER_TEST_SECONDS. The submission-wide
caps stay the outer bound either way.

What decides a result, and what the submission can and cannot influence:

- The verdict for limits (timed out, out of memory, process limit, output cap, crash)
  comes from the service, measured outside the sandbox; the code under test cannot
  change it. Points come from the course's files, read on the host.
- Per-test outcomes come from JUnit XML written to a fresh, random path under /tmp and
  fetched afterwards with GetFiles, or (per-test runs) from records framed by a fresh
  nonce; never from what the run printed. The course's tests and pytest itself live in
  the image, whose root file system is read-only.
- The submission's code runs inside the test process, so code that sets out to do so
  can still find that path or nonce (they are in its argv and environment) or patch
  pytest in memory. A result that contradicts pytest's exit status is marked
  `inconsistent`, which catches a forged file without a matching exit status, not a
  thorough forgery.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from sandboxd import errors
from sandboxd.api import Image, SandboxRequest, requested_limits
from sandboxd.client import SandboxClient
from sandboxd.grade_outcomes import GradeSettings as GradeSettings  # re-exported
from sandboxd.grade_outcomes import Outcomes, Verdict, build, per_test_run, suite_run
from sandboxd.grade_outcomes import collection_verdict as collection_verdict  # re-exported
from sandboxd.grade_outcomes import judge_run as judge_run  # re-exported
from sandboxd.grade_outcomes import parse_junit as parse_junit  # re-exported
from sandboxd.grade_reports import junit_xml
from sandboxd.grade_runs import SubmissionBox
from sandboxd.gradebook import Course, Outcome, load_course, scored
from sandboxd.grading_image import grader_context, image_fragment
from sandboxd.grading_image import pytest_files as pytest_files  # re-exported
from sandboxd.limits import Caps
from sandboxd.submissions import Submission

log = logging.getLogger(__name__)

#: Seconds each test of a pytest course gets when neither the command line nor course.toml
#: says: room for any unit test, and a looping test leaves budget for the others.
DEFAULT_TEST_SECONDS = 5.0


@dataclass
class Grade:
    """One submission's result, as written to results.json."""

    name: str
    verdict: Verdict
    message: str
    score: float
    passed: int
    total: int
    tests: dict[str, Outcome] = field(default_factory=dict)
    exit_code: int = 0
    cpu_seconds: float = 0.0
    peak_memory_bytes: int = 0
    wall_seconds: float = 0.0
    image_digest: str = ""
    junit: str = ""
    points: float = 0.0
    max_points: float = 0.0
    #: Per test: `gradebook.TestResult` as a dict (points, message, output, hidden).
    results: list[dict[str, Any]] = field(default_factory=list)
    #: What the submission ran under, so a result says how it was made.
    runtime: str = ""
    limits: dict[str, Any] = field(default_factory=dict)


def per_test_seconds(course: Course, settings: GradeSettings, run_cap: float) -> float:
    """Each test's budget: the command line's or course.toml's (0: off), else the default,
    at most half the submission's CPU budget (one loop must leave room for the other
    tests) and the server's cap on a run (`run_cap`, from its server info)."""
    if course.test_timeout is not None:
        return course.test_timeout
    return min(DEFAULT_TEST_SECONDS, settings.cpu_seconds / 2, run_cap)


def _write_junit(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def grade_one(
    client: SandboxClient,
    submission: Submission,
    image: Image,
    settings: GradeSettings,
    junit_dir: Path,
    course: Course | None = None,
) -> Grade:
    """Run the course's tests against one submission; every sandbox is destroyed after."""
    course = course or Course(tests_dir=Path("."))
    request = SandboxRequest(
        image=image.key,
        limits=requested_limits(
            cpus=settings.cpus,
            memory_bytes=settings.memory_bytes,
            pids=settings.pids,
            timeout_seconds=settings.timeout_seconds,
        ),
        profile=settings.profile,
        runtime=settings.runtime,
        labels={"grading": "1"},
    )
    box = SubmissionBox(client, request, submission, course.tests_dir)
    try:
        outcomes = build(box, course) if course.build else None
        if outcomes is None:
            per_test = course.runner == "pytest" and (course.test_timeout or 0.0) > 0
            outcomes = (per_test_run if per_test else suite_run)(box, course, settings)
    finally:
        box.close()
    limits = {**box.limits, **_budgets(course, settings)}
    return _grade(submission.name, outcomes, course, box, junit_dir, limits)


def _budgets(course: Course, settings: GradeSettings) -> dict[str, Any]:
    """The grader's own limits, recorded with the sandbox's."""
    return {"test_seconds": course.test_timeout or 0.0, "cpu_seconds": settings.cpu_seconds}


def _grade(
    name: str,
    o: Outcomes,
    course: Course,
    box: SubmissionBox,
    junit_dir: Path,
    limits: dict[str, Any],
) -> Grade:
    """The submission's grade: points from the course, and its JUnit XML written."""
    results = scored(course.weights, o.cases)
    junit_file = junit_dir / f"{name}.xml"
    _write_junit(junit_file, junit_xml(name, o.verdict, o.message, results))
    passed = sum(1 for r in results if r.outcome == "passed")
    points = float(sum(r.score for r in results))
    max_points = float(sum(r.max_score for r in results))
    return Grade(
        name=name,
        verdict=o.verdict,
        message=o.message,
        score=round(points / max_points, 4) if max_points else 0.0,
        passed=passed,
        total=len(results),
        tests={r.test_id: cast(Outcome, r.outcome) for r in results},
        exit_code=o.exit_code,
        cpu_seconds=round(o.cpu_seconds, 3),
        peak_memory_bytes=o.peak_memory_bytes,
        wall_seconds=round(o.wall_seconds, 3),
        image_digest=box.image_digest,
        junit=str(junit_file),
        runtime=box.runtime,
        limits=limits,
        points=points,
        max_points=max_points,
        results=[asdict(r) for r in results],
    )


def jobs(settings: GradeSettings, slots: int) -> int:
    """Submissions at once: `settings.jobs`, or when 0, two per core of this machine (a
    submission waits on its container about as long as it computes); never more than the
    server's sandbox slots, since the rest would only queue for admission until it
    refuses them."""
    wanted = settings.jobs or 2 * (os.cpu_count() or 1)
    return max(1, min(wanted, slots or wanted))


def resolved(course: Course, settings: GradeSettings, caps: Caps) -> tuple[Course, GradeSettings]:
    """The course's per-test budget and the batch's parallelism, made explicit from the
    server's caps, so the results document says what was used."""
    course = dataclasses.replace(
        course, test_timeout=per_test_seconds(course, settings, caps.timeout_seconds)
    )
    return course, dataclasses.replace(settings, jobs=jobs(settings, caps.sandboxes))


# -- the batch -------------------------------------------------------------------------


def grade_all(
    client: SandboxClient,
    tests_dir: Path,
    submissions: list[Submission],
    settings: GradeSettings,
    junit_dir: Path,
    progress: Callable[[str], None] = lambda line: None,
    course: Course | None = None,
) -> dict[str, Any]:
    """Grade every submission, `settings.jobs` at a time; the results document.

    Raises:
        InvalidArgument: a bad tests folder or course.toml, or no submissions.
        BuildFailed: the course's Dockerfile fragment does not build.
    """
    course = course or load_course(tests_dir)
    if not submissions:
        raise errors.InvalidArgument("no submissions to grade (an empty submissions folder?)")
    built = client.build_image(
        image_fragment(course), context_files=grader_context(tests_dir), label="grading"
    )
    image = built.image
    course, settings = resolved(course, settings, client.server_info().caps)
    progress(f"image {image.digest[:19]} ({'cached' if built.cache_hit else 'built'})")
    grades: dict[str, Grade] = {}
    lock = threading.Lock()
    started = time.monotonic()

    def one(sub: Submission) -> Grade:
        try:
            grade = grade_one(client, sub, image, settings, junit_dir, course)
        except errors.SandboxError as exc:
            log.warning("grading %s: %s", sub.name, exc.message)
            grade = Grade(sub.name, "error", f"service error: {exc.message}", 0.0, 0, 0)
            grade.image_digest, grade.runtime = image.digest, settings.runtime
            grade.limits = {"memory_bytes": settings.memory_bytes, **_budgets(course, settings)}
            junit = junit_dir / f"{sub.name}.xml"
            _write_junit(junit, junit_xml(sub.name, "error", grade.message, []))
            grade.junit = str(junit)
        with lock:
            grades[sub.name] = grade
            progress(
                f"[{len(grades)}/{len(submissions)}] {sub.name}: {grade.verdict} "
                f"{grade.passed}/{grade.total} ({grade.wall_seconds:.1f}s) "
                f"{time.monotonic() - started:.0f}s elapsed"
            )
        return grade

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, settings.jobs)) as pool:
        list(pool.map(one, submissions))
    return {
        "tests": str(tests_dir),
        "image": {"key": image.key, "digest": image.digest},
        "settings": asdict(settings),
        "course": {
            "runner": course.runner,
            "test_timeout": course.test_timeout,
            "build": course.build,
            "test": course.test,
        },
        "submissions": [asdict(grades[s.name]) for s in submissions],
    }


def write_results(document: Mapping[str, Any], out: Path | None) -> None:
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def per_test_results(document: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(name, verdict, tests) per submission: the part of a result that must repeat."""
    for sub in document["submissions"]:
        yield sub["name"], sub["verdict"], sub["tests"]


def junit_dir_for(out: Path | None) -> Path:
    """Where the JUnit files go: `junit/` next to results.json, else in the current dir."""
    return (out.parent if out is not None else Path(".")) / "junit"
