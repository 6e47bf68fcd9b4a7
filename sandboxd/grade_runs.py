"""Running a course's tests inside one submission's sandbox, and reading what they wrote.

Per-test runs: the suite is collected once, then every test runs in its own exec under
its own CPU and wall limits, so a test that loops or eats memory fails with its own
message and the others keep their results. A kill that may have left damage behind
(memory, processes, a crash) costs the sandbox: the next test gets a fresh one with the
submission put in again. The submission-wide CPU and wall budgets stay the outer bound.

Outcomes are read from JUnit XML written to a fresh random path, fetched with GetFiles;
never from what the run printed (see grading.py for what this does and does not stop).
"""

from __future__ import annotations

import io
import math
import secrets
import signal
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from sandboxd import errors
from sandboxd.api import ExecResult, SandboxRequest
from sandboxd.client import SandboxClient, SandboxHandle
from sandboxd.submissions import Submission
from sandboxd.verdicts import VERDICTS

GRADER = "/opt/grader"
WORKDIR = "/sandbox/work"
MAX_JUNIT_BYTES = 4 * 1024 * 1024
#: Characters of a failure's text kept per test.
MAX_OUTPUT = 4000
#: Seconds a per-test run gets on top of the test's own: starting Python and pytest.
STARTUP_SECONDS = 3.0

Outcome = Literal["passed", "failed", "error", "skipped"]

PYTEST = (
    "python3",
    "-m",
    "pytest",
    "-q",
    "-p",
    "no:cacheprovider",
    "-o",
    "junit_family=xunit2",
    f"--rootdir={GRADER}/tests",
    # points and hidden are the grader's markers; the course need not register them.
    "-W",
    "ignore::pytest.PytestUnknownMarkWarning",
)
ENV = {
    "PYTHONPATH": f"{GRADER}/lib:{WORKDIR}",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "COURSE_DIR": f"{GRADER}/tests",
}


@dataclass(frozen=True)
class Case:
    """One test's result: its outcome, the line that says why, and the longer text."""

    outcome: Outcome
    message: str = ""
    output: str = ""


def parse_cases(data: bytes) -> dict[str, Case]:
    """Test id ("classname::name") -> its result, from JUnit XML, sorted by id.

    Raises:
        InvalidArgument: not JUnit XML.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise errors.InvalidArgument(f"JUnit XML does not parse: {exc}") from None
    cases: dict[str, Case] = {}
    for element in root.iter("testcase"):
        test_id = f"{element.get('classname', '')}::{element.get('name', '')}"
        case = Case("passed")
        for child in element:
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(child.tag)
            if outcome is None or (outcome == "skipped" and case.outcome != "passed"):
                continue
            message = child.get("message", "") or ""
            case = Case(outcome, message[:MAX_OUTPUT], (child.text or "")[:MAX_OUTPUT])  # type: ignore[arg-type]
        # A test that errors in teardown after passing appears twice; the worse one counts.
        if cases.get(test_id, Case("passed")).outcome in ("failed", "error"):
            continue
        cases[test_id] = case
    return dict(sorted(cases.items()))


def junit_id(node_id: str) -> str:
    """pytest's node id ("sub/test_a.py::TestX::test_y[1]") as its JUnit id
    ("sub.test_a.TestX::test_y[1]"), so a test killed before writing anything has the
    id it would have had."""
    path, *rest = node_id.split("::")
    module = path.removesuffix(".py").replace("/", ".")
    if not rest:
        return module
    return f"{'.'.join([module, *rest[:-1]])}::{rest[-1]}"


def _untar_one(data: bytes) -> bytes | None:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if member.isfile():
                handle = tar.extractfile(member)
                return handle.read() if handle is not None else None
    return None


def fresh_junit_path() -> str:
    """A path the submission does not know before it runs."""
    return f"/tmp/{secrets.token_hex(12)}/junit.xml"


def cpu_limited(command: str, cpu_seconds: float) -> tuple[str, int]:
    """`command` under a CPU-time limit, and that limit in whole seconds.

    Soft limit: SIGXCPU; one second later the hard limit's SIGKILL, should it be ignored.
    """
    limit = max(1, math.ceil(cpu_seconds))
    return f"ulimit -St {limit} && ulimit -Ht {limit + 1} && {command}", limit


def cpu_killed(result: ExecResult, cpu_limit: int) -> bool:
    """The kernel ended the command at its CPU limit (SIGXCPU, or SIGKILL past the hard one)."""
    return result.signal == signal.SIGXCPU or (
        cpu_limit > 0 and result.signal == signal.SIGKILL and result.cpu_seconds >= cpu_limit
    )


class SubmissionBox:
    """The sandbox a submission runs in, replaceable after a kill that may have damaged it."""

    def __init__(self, client: SandboxClient, request: SandboxRequest, sub: Submission) -> None:
        self.client = client
        self.request = request
        self.submission = sub
        self.handle: SandboxHandle | None = None
        self.image_digest = ""
        self.runtime = ""
        self.limits: dict[str, object] = {}
        self.replaced = 0

    def open(self) -> SandboxHandle:
        """The current sandbox, created (with the submission in it) when there is none."""
        if self.handle is None:
            sandbox = self.client.create_sandbox(self.request)
            self.handle = SandboxHandle(self.client, sandbox)
            self.image_digest = sandbox.image_digest
            self.runtime = sandbox.runtime
            self.limits = asdict(sandbox.limits)
            if self.submission.files:
                self.handle.put_files(WORKDIR, dict(self.submission.files))
        return self.handle

    def discard(self) -> None:
        """Destroy the current sandbox; the next `open` makes a fresh one."""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self.replaced += 1
            handle.destroy(quiet=True)

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            handle.destroy(quiet=True)

    def exec(self, argv: list[str], timeout: float, output: bytearray | None = None) -> ExecResult:
        """Run one command; its output (capped) into `output` when given."""

        def keep(_stream: str, data: bytes) -> None:
            if output is not None and len(output) < 1 << 20:
                output.extend(data)

        return self.open().exec(argv, env=ENV, workdir=WORKDIR, timeout=timeout, on_output=keep)

    def fetch_cases(self, path: str) -> dict[str, Case] | None:
        """What the run wrote to `path` as JUnit XML; None when missing or unusable."""
        try:
            raw = _untar_one(self.open().get_files(path, max_bytes=MAX_JUNIT_BYTES))
        except (errors.NotFound, errors.ResourceExhausted):
            return None
        if raw is None:
            return None
        try:
            return parse_cases(raw)
        except errors.InvalidArgument:
            return None


@dataclass(frozen=True)
class TestRun:
    """One test's run: its result and what it cost."""

    test_id: str
    case: Case
    #: The service's verdict name when a limit or a crash ended the test, else "".
    stopped: str
    cpu_seconds: float
    peak_memory_bytes: int
    wall_seconds: float


def collect(box: SubmissionBox, timeout: float) -> tuple[list[str], ExecResult, str]:
    """pytest node ids of the course's suite with this submission in place; the collection
    run's result and its output (the error to show when collection fails)."""
    output = bytearray()
    argv = [*PYTEST, "--collect-only", f"{GRADER}/tests"]
    result = box.exec(argv, timeout, output)
    text = output.decode("utf-8", "replace")
    ids = [
        line.strip()
        for line in text.splitlines()
        if "::" in line and not line.startswith((" ", "ERROR", "FAILED"))
    ]
    return ids, result, text


def _stopped_case(result: ExecResult, cpu_limit: int, seconds: float) -> tuple[str, Case] | None:
    """The test's verdict and result when the service or the kernel ended its run."""
    timed_out = f"timed out after {seconds:.1f}s"
    if cpu_killed(result, cpu_limit):
        return "timed_out", Case("failed", timed_out)
    if not VERDICTS[result.verdict].finished:
        message = timed_out if result.verdict == "timed_out" else result.message
        return result.verdict, Case("failed", message)
    if result.signal:
        return "crashed", Case("failed", f"crashed: {result.message}")
    return None


def run_test(box: SubmissionBox, node_id: str, seconds: float, budget: float) -> TestRun:
    """One test in its own exec with `seconds` of CPU and wall time (wall capped by what is
    left of the submission's `budget`); the sandbox is replaced after a kill."""
    path = fresh_junit_path()
    command, cpu_limit = cpu_limited('exec "$@"', seconds + 1.0)
    argv = ["sh", "-c", command, "sh", *PYTEST, f"--junitxml={path}", f"{GRADER}/tests/{node_id}"]
    result = box.exec(argv, max(0.5, min(seconds + STARTUP_SECONDS, budget)))
    test_id = junit_id(node_id)
    stopped = _stopped_case(result, cpu_limit, seconds)
    if stopped is not None:
        box.discard()
        verdict, case = stopped
    else:
        verdict, cases = "", box.fetch_cases(path)
        if cases and len(cases) == 1:
            case = next(iter(cases.values()))
        else:
            case = Case("error", f"the test wrote no result (exit code {result.exit_code})")
    return TestRun(
        test_id,
        case,
        verdict,
        result.cpu_seconds,
        result.peak_memory_bytes,
        result.wall_seconds,
    )


def run_tests(
    box: SubmissionBox, node_ids: list[str], seconds: float, wall: float, cpu: float
) -> Iterator[TestRun]:
    """Each test in turn until the submission's wall or CPU budget is spent; the tests left
    after that are reported as not run."""
    started = time.monotonic()
    cpu_used = 0.0
    for node_id in node_ids:
        left = wall - (time.monotonic() - started)
        if left <= 0 or cpu_used >= cpu:
            spent = f"wall {wall:.0f}s" if left <= 0 else f"CPU {cpu:.0f}s"
            message = f"not run: the submission's time budget ({spent}) was spent"
            yield TestRun(junit_id(node_id), Case("error", message), "timed_out", 0.0, 0, 0.0)
            continue
        run = run_test(box, node_id, seconds, left)
        cpu_used += run.cpu_seconds
        yield run


def tail(data: bytes | bytearray, limit: int = MAX_OUTPUT) -> str:
    """The end of a command's output: where a compiler's error usually is."""
    text = bytes(data).decode("utf-8", "replace")
    return text if len(text) <= limit else "...\n" + text[-limit:]
