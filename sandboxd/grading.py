"""Batch grading: a course's pytest suite against every submission, each in a fresh sandbox.

What decides a result, and what the submission can and cannot influence:

- The verdict for limits (timed out, out of memory, process limit, output cap, crash)
  comes from the service, measured outside the sandbox; the code under test cannot
  change it.
- Per-test outcomes come from the JUnit XML pytest writes to a fresh, random path under
  /tmp, fetched afterwards with GetFiles; never from what the run printed. The course's
  tests and pytest itself live in the image, whose root file system is read-only.
- The submission's code runs inside the pytest process, so code that sets out to do so
  can still find that path (it is in the process's argv) or patch pytest in memory. A
  result that contradicts pytest's exit status is marked `inconsistent`, which catches
  a forged file without a matching exit status, not a thorough forgery.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata as metadata
import io
import json
import logging
import math
import secrets
import signal
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from packaging.requirements import Requirement

from sandboxd import errors
from sandboxd.api import ExecResult, Image, SandboxRequest, requested_limits
from sandboxd.client import SandboxClient, SandboxHandle
from sandboxd.submissions import Submission, read_tree
from sandboxd.verdicts import VERDICTS, StoppedVerdict
from sandboxd.verdicts import Verdict as ExecVerdict

log = logging.getLogger(__name__)

GRADER = "/opt/grader"
WORKDIR = "/sandbox/work"
MAX_JUNIT_BYTES = 4 * 1024 * 1024

#: A submission's verdict: what pytest's results say, or the service's verdict when it
#: stopped the run (a limit, or a crash: pytest itself died or the sandbox did).
Verdict = Literal[
    "passed",  # every test passed
    "failed",  # tests ran, some failed
    "error",  # pytest could not run the tests (collection error, no tests, bad usage)
    "inconsistent",  # the JUnit XML contradicts pytest's exit status
    StoppedVerdict,
]
Outcome = Literal["passed", "failed", "error", "skipped"]


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
    jobs: int = 2


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


# -- the image -------------------------------------------------------------------------


def _closure(root: str) -> list[metadata.Distribution]:
    """`root` and the distributions it needs on this interpreter, by name."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        dist = metadata.distribution(name)
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return [seen[k] for k in sorted(seen)]


def pytest_files(prefix: str = "grader/lib") -> dict[str, tuple[bytes, int]]:
    """pytest and its pure-Python dependencies at the host's versions, as context files.

    Raises:
        InvalidArgument: a dependency ships compiled code (it might not run in the image).
    """
    out: dict[str, tuple[bytes, int]] = {}
    for dist in _closure("pytest"):
        for rel in dist.files or []:
            posix = rel.as_posix()
            if posix.startswith("..") or "__pycache__" in posix or posix.endswith(".pyc"):
                continue  # scripts in bin/, bytecode
            if posix.endswith((".so", ".pyd")):
                raise errors.InvalidArgument(
                    f"{dist.metadata['Name']} has compiled code ({posix}); cannot ship it"
                )
            path = Path(str(dist.locate_file(rel)))
            if path.is_file():
                out[f"{prefix}/{posix}"] = (path.read_bytes(), 0o644)
    return out


def grader_context(tests_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Build context: pytest's libraries and the course's tests, under grader/."""
    if not tests_dir.is_dir():
        raise errors.InvalidArgument(f"--tests {tests_dir}: not a directory")
    files = pytest_files()
    for name, data in read_tree(tests_dir).items():
        files[f"grader/tests/{name}"] = (data, 0o644)
    return files


# Bytecode compiled at build time: the root is read-only at run time, and compiling
# pytest from source on every run would cost each submission seconds.
FRAGMENT = f"COPY grader/ {GRADER}/\nRUN python3 -m compileall -q {GRADER}/lib\n"


# -- one run ---------------------------------------------------------------------------


def parse_junit(data: bytes) -> dict[str, Outcome]:
    """Test id -> outcome from pytest's JUnit XML.

    Raises:
        InvalidArgument: not JUnit XML.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise errors.InvalidArgument(f"JUnit XML does not parse: {exc}") from None
    tests: dict[str, Outcome] = {}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome: Outcome = "passed"
        for child in case:
            if child.tag in ("failure",):
                outcome = "failed"
            elif child.tag == "error":
                outcome = "error"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        # A test that errors in teardown after passing appears twice; the worse one counts.
        if tests.get(test_id) in ("failed", "error"):
            continue
        tests[test_id] = outcome
    return dict(sorted(tests.items()))


def _untar_one(data: bytes) -> bytes | None:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if member.isfile():
                handle = tar.extractfile(member)
                return handle.read() if handle is not None else None
    return None


def _stopped(verdict: ExecVerdict) -> StoppedVerdict | None:
    """The service's verdict when it, not pytest, ended the run."""
    return None if VERDICTS[verdict].finished else cast(StoppedVerdict, verdict)


def judge_run(
    result: ExecResult, tests: dict[str, Outcome] | None, cpu_limit: int = 0
) -> tuple[Verdict, str]:
    """The submission's verdict from the service's result and the parsed JUnit XML."""
    stopped = _stopped(result.verdict)
    if stopped is not None:
        return stopped, result.message
    code = result.exit_code
    # The kernel ends a process at its CPU limit with SIGXCPU (SIGKILL past the hard limit).
    if result.signal == signal.SIGXCPU or (
        cpu_limit and result.signal == signal.SIGKILL and result.cpu_seconds >= cpu_limit
    ):
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


def _write_junit(path: Path, name: str, data: bytes | None, verdict: str, message: str) -> None:
    """The fetched JUnit XML, or one error case naming the verdict when there is none."""
    if data is None:
        suite = ET.Element("testsuite", name=name, tests="1", errors="1", failures="0")
        case = ET.SubElement(suite, "testcase", classname=name, name="grading")
        ET.SubElement(case, "error", message=f"{verdict}: {message}")
        root = ET.Element("testsuites")
        root.append(suite)
        data = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _fetch_junit(box: SandboxHandle, path: str) -> tuple[bytes | None, dict[str, Outcome] | None]:
    """The JUnit XML pytest wrote and its parse; (None, None) when missing or unusable."""
    try:
        raw = _untar_one(box.get_files(path, max_bytes=MAX_JUNIT_BYTES))
    except (errors.NotFound, errors.ResourceExhausted):
        return None, None
    if raw is None:
        return None, None
    try:
        return raw, parse_junit(raw)
    except errors.InvalidArgument:
        return None, None


def _pytest_argv(settings: GradeSettings, junit_path: str) -> tuple[list[str], int]:
    """The command that runs the course's tests under a CPU-time limit, and that limit."""
    pytest = (
        f"python3 -m pytest {GRADER}/tests -q -p no:cacheprovider --junitxml={junit_path} "
        f"-o junit_family=xunit2 --rootdir={GRADER}/tests"
    )
    cpu_limit = max(1, math.ceil(settings.cpu_seconds))
    # Soft limit: SIGXCPU; one second later the hard limit's SIGKILL, should it be ignored.
    limit = f"ulimit -St {cpu_limit} && ulimit -Ht {cpu_limit + 1}"
    return ["sh", "-c", f"{limit} && exec {pytest}"], cpu_limit


def grade_one(
    client: SandboxClient,
    submission: Submission,
    image: Image,
    settings: GradeSettings,
    junit_dir: Path,
) -> Grade:
    """Run the suite against one submission in a fresh sandbox, destroyed afterwards."""
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
    # A fresh name per run: the submission does not know it before it runs.
    junit_path = f"/tmp/{secrets.token_hex(12)}/junit.xml"
    argv, cpu_limit = _pytest_argv(settings, junit_path)
    env = {
        "PYTHONPATH": f"{GRADER}/lib:{WORKDIR}",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    raw: bytes | None = None
    tests: dict[str, Outcome] | None = None
    with client.sandbox(request) as box:
        if submission.files:
            box.put_files(WORKDIR, dict(submission.files))
        result = box.exec(argv, env=env, timeout=settings.timeout_seconds)
        if _stopped(result.verdict) is None:
            raw, tests = _fetch_junit(box, junit_path)
    verdict, message = judge_run(result, tests, cpu_limit)
    tests = tests or {}
    passed = sum(1 for o in tests.values() if o == "passed")
    total = len(tests)
    junit_file = junit_dir / f"{submission.name}.xml"
    _write_junit(junit_file, submission.name, raw, verdict, message)
    scored = verdict in ("passed", "failed")
    return Grade(
        name=submission.name,
        verdict=verdict,
        message=message,
        score=round(passed / total, 4) if scored and total else 0.0,
        passed=passed if scored else 0,
        total=total,
        tests=tests if scored else {},
        exit_code=result.exit_code,
        cpu_seconds=round(result.cpu_seconds, 3),
        peak_memory_bytes=result.peak_memory_bytes,
        wall_seconds=round(result.wall_seconds, 3),
        image_digest=box.sandbox.image_digest,
        junit=str(junit_file),
    )


# -- the batch -------------------------------------------------------------------------


def grade_all(
    client: SandboxClient,
    tests_dir: Path,
    submissions: list[Submission],
    settings: GradeSettings,
    junit_dir: Path,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Grade every submission, `settings.jobs` at a time; the results document."""
    built = client.build_image(FRAGMENT, context_files=grader_context(tests_dir), label="grading")
    image = built.image
    progress(f"image {image.digest[:19]} ({'cached' if built.cache_hit else 'built'})")
    grades: dict[str, Grade] = {}
    lock = threading.Lock()
    started = time.monotonic()

    def one(sub: Submission) -> Grade:
        try:
            grade = grade_one(client, sub, image, settings, junit_dir)
        except errors.SandboxError as exc:
            log.warning("grading %s: %s", sub.name, exc.message)
            grade = Grade(sub.name, "error", f"service error: {exc.message}", 0.0, 0, 0)
            _write_junit(junit_dir / f"{sub.name}.xml", sub.name, None, "error", grade.message)
            grade.junit = str(junit_dir / f"{sub.name}.xml")
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
        "submissions": [asdict(grades[s.name]) for s in submissions],
    }


def write_results(document: Mapping[str, Any], out: Path | None) -> None:
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)


def per_test_results(document: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(name, verdict, tests) per submission: the part of a result that must repeat."""
    for sub in document["submissions"]:
        yield sub["name"], sub["verdict"], sub["tests"]


def junit_dir_for(out: Path | None) -> Path:
    """Where the JUnit files go: `junit/` next to results.json, else in the current dir."""
    return (out.parent if out is not None else Path(".")) / "junit"
