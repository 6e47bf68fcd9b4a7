"""Running a course's tests inside one submission's sandbox, and reading what they wrote.

Per-test runs: the suite is collected once, then run in one pytest process in which an
in-sandbox plugin gives every test its own CPU and wall limit and logs each result as it
comes. A test that loops or eats memory takes the process down with it; it fails with
its own message, the tests before it keep their results, and a new process (in a fresh
sandbox, since a kill may leave damage behind) runs the tests after it. The
submission-wide CPU and wall budgets stay the outer bound.

Outcomes are read from JUnit XML written to a fresh random path, fetched with GetFiles;
never from what the run printed (see grading.py for what this does and does not stop).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import secrets
import signal
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sandboxd import errors
from sandboxd.api import ExecResult, SandboxRequest
from sandboxd.archives import tar_of
from sandboxd.client import SandboxClient, SandboxHandle
from sandboxd.gradebook import Case
from sandboxd.submissions import Submission
from sandboxd.verdicts import VERDICTS

GRADER = "/opt/grader"
WORKDIR = "/sandbox/work"
MAX_JUNIT_BYTES = 4 * 1024 * 1024
#: Output kept from one exec: room for every test's record of a large suite.
MAX_OUTPUT_BYTES = 16 * 1024 * 1024
#: Characters of a failure's text kept per test.
MAX_OUTPUT = 4000
#: The in-sandbox plugin (grading_plugin.py), as the image ships it.
PLUGIN = "sandboxd_grading_plugin"
#: Seconds a per-test run gets on top of the test's own: starting Python and pytest.
STARTUP_SECONDS = 3.0

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


#: Up to this size a submission rides on the first command's stdin, unpacked by the shell
#: before the command starts: one exec instead of two (a put is an exec of `tar`, which
#: costs most under gVisor). A larger one is put on its own, within gRPC's message size.
MAX_STDIN_SUBMISSION = 1 << 20
_UNPACK = (
    f"mkdir -p {WORKDIR} && tar -x -m --no-same-owner -C {WORKDIR} "
    '|| { echo "sandboxd: unpacking the submission failed" >&2; exit 125; }; exec "$@"'
)


class SubmissionBox:
    """The sandbox a submission runs in, replaceable after a kill that may have damaged it.

    A new sandbox gets the submission's files with its first command (see
    MAX_STDIN_SUBMISSION).
    """

    def __init__(
        self, client: SandboxClient, request: SandboxRequest, sub: Submission, tests_dir: Path
    ) -> None:
        self.client = client
        self.tests_dir = tests_dir
        self.request = request
        self.submission = sub
        self.handle: SandboxHandle | None = None
        self.image_digest = ""
        self.runtime = ""
        self.limits: dict[str, object] = {}
        self.replaced = 0
        self.tar = tar_of(dict(sub.files)) if sub.files else b""
        #: The submission's files are still to be sent with the next command.
        self.unpack = False

    def open(self) -> SandboxHandle:
        """The current sandbox, created (with the submission in it) when there is none."""
        if self.handle is None:
            sandbox = self.client.create_sandbox(self.request)
            self.handle = SandboxHandle(self.client, sandbox)
            self.image_digest = sandbox.image_digest
            self.runtime = sandbox.runtime
            self.limits = asdict(sandbox.limits)
            self.unpack = len(self.tar) <= MAX_STDIN_SUBMISSION and bool(self.tar)
            if self.tar and not self.unpack:
                self.handle.put_files(WORKDIR, self.tar)
        return self.handle

    def owns(self, node_id: str) -> bool:
        """Whether a collected node id is in one of the course's own test files."""
        return (self.tests_dir / node_id.split("::")[0]).is_file()

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

    def exec(
        self,
        argv: list[str],
        timeout: float,
        output: bytearray | None = None,
        env: Mapping[str, str] | None = None,
        stderr: bytearray | None = None,
    ) -> ExecResult:
        """Run one command; its output (capped) into `output`, or when `stderr` is given,
        stdout into `output` and stderr into `stderr`: records framed by line must not be
        cut by the other stream's chunks."""

        def keep(stream: str, data: bytes) -> None:
            into = stderr if stream == "stderr" and stderr is not None else output
            if into is not None and len(into) < MAX_OUTPUT_BYTES:
                into.extend(data)

        handle, stdin = self.open(), b""
        if self.unpack:
            argv, stdin, self.unpack = ["sh", "-c", _UNPACK, "sh", *argv], self.tar, False
        return handle.exec(
            argv,
            env={**ENV, **(env or {})},
            workdir=WORKDIR,
            timeout=timeout,
            on_output=keep,
            stdin=stdin,
        )

    def fetch(self, path: str) -> bytes | None:
        """The file the run wrote at `path`; None when it is missing or too large."""
        try:
            return _untar_one(self.open().get_files(path, max_bytes=MAX_JUNIT_BYTES))
        except (errors.NotFound, errors.ResourceExhausted):
            return None

    def fetch_cases(self, path: str) -> dict[str, Case] | None:
        """What the run wrote to `path` as JUnit XML; None when missing or unusable."""
        raw = self.fetch(path)
        if raw is None:
            return None
        try:
            return parse_cases(raw)
        except errors.InvalidArgument:
            return None


@dataclass(frozen=True)
class TestRun:
    """One test's result, and the service's verdict name when a limit or a crash ended it."""

    test_id: str
    case: Case
    stopped: str = ""


def _killed_case(result: ExecResult, seconds: float) -> tuple[str, Case]:
    """The verdict and result of the test that was running when its process ended."""
    timed_out = f"timed out after {seconds:.1f}s"
    if result.signal in (signal.SIGALRM, signal.SIGXCPU) or result.verdict == "timed_out":
        return "timed_out", Case("failed", timed_out)
    if not VERDICTS[result.verdict].finished:
        return result.verdict, Case("failed", result.message)
    if result.signal:
        return "crashed", Case("failed", f"crashed: {result.message}")
    return "crashed", Case("error", f"the test ended the test process ({result.message})")


_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


@dataclass
class RunLog:
    """What the in-sandbox plugin reported: results by node id (the worst phase counts),
    the tests started and ended (with what each cost: CPU seconds, peak bytes), and the
    collected node ids (None: never got that far)."""

    cases: dict[str, Case] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)
    ended: dict[str, tuple[float, int]] = field(default_factory=dict)
    collected: list[str] | None = None

    def add(self, record: dict[str, Any]) -> None:
        if "start" in record:
            self.started.add(str(record["start"]))
        if "end" in record:
            cpu, peak = record.get("cpu", 0.0), record.get("peak", 0)
            ok = isinstance(cpu, (int, float)) and isinstance(peak, int)
            self.ended[str(record["end"])] = (float(cpu), peak) if ok else (0.0, 0)
        if isinstance(record.get("collected"), list):
            self.collected = [str(n) for n in record["collected"]]
        if "result" in record and record.get("outcome") in _RANK:
            node = str(record["result"])
            message, output = str(record.get("message", "")), str(record.get("output", ""))
            case = Case(record["outcome"], message, output)
            if node not in self.cases or _RANK[case.outcome] > _RANK[self.cases[node].outcome]:
                self.cases[node] = case

    def finished(self, node: str) -> Case:
        """The result of a test that ran to its end, with what it cost."""
        cpu, peak = self.ended[node]
        return dataclasses.replace(self.cases[node], cpu_seconds=cpu, peak_memory_bytes=peak)


def read_log(raw: bytes, nonce: str) -> RunLog:
    """The plugin's records: the lines of `raw` behind `nonce`, others ignored."""
    log = RunLog()
    prefix = f"{nonce} ".encode()
    for line in raw.splitlines():
        if not line.startswith(prefix):
            continue
        try:
            record = json.loads(line[len(prefix) :])
        except ValueError:
            continue
        if isinstance(record, dict):
            log.add(record)
    return log


@dataclass(frozen=True)
class Batch:
    """One run of some of the tests: their results, the tests it did not reach, its cost;
    for the first run also the collected tests and pytest's output."""

    runs: list[TestRun]
    left: list[str]
    killed: bool
    result: ExecResult
    collected: list[str] | None = None
    output: str = ""


def run_batch(
    box: SubmissionBox, node_ids: list[str] | None, seconds: float, wall: float, cpu: float
) -> Batch:
    """`node_ids` (None: the whole suite, collecting it) in one pytest process, each test
    under its own limits (the in-sandbox plugin), until one of them takes it down."""
    nonce = secrets.token_hex(12)
    command, _ = cpu_limited('exec "$@"', cpu)
    tests = [f"{GRADER}/tests/{n}" for n in node_ids or [""]]
    argv = ["sh", "-c", command, "sh", *PYTEST, "-p", PLUGIN, *tests]
    env = {"GRADER_TEST_SECONDS": str(seconds), "GRADER_NONCE": nonce}
    if node_ids is not None:
        wall = min(wall, len(node_ids) * (seconds + 1.0) + STARTUP_SECONDS)
    stdout, stderr = bytearray(), bytearray()
    result = box.exec(argv, max(0.5, wall), stdout, env=env, stderr=stderr)
    log = read_log(bytes(stderr), nonce)
    ids = node_ids if node_ids is not None else [n for n in log.collected or [] if box.owns(n)]
    runs = [TestRun(junit_id(n), log.finished(n)) for n in ids if n in log.cases and n in log.ended]
    killed = [n for n in ids if n in log.started and n not in log.ended]
    left = [n for n in ids if n not in log.ended and n not in killed]
    if killed:
        verdict, case = _killed_case(result, seconds)
        # The process's cost less the finished tests' (so pytest's start counts here).
        cpu = max(0.0, result.cpu_seconds - sum(r.case.cpu_seconds for r in runs))
        case = dataclasses.replace(
            case, cpu_seconds=cpu, peak_memory_bytes=result.peak_memory_bytes
        )
        runs.append(TestRun(junit_id(killed[0]), case, verdict))
        left = [n for n in ids[ids.index(killed[0]) + 1 :] if n not in log.ended]
    elif left and not runs:
        # Nothing started: the process failed before the first test; do not retry forever.
        why = f"not run: the test process ended before it ({result.message})"
        runs += [TestRun(junit_id(n), Case("error", why)) for n in left]
        left = []
    stopped = bool(killed) or result.signal != 0 or not VERDICTS[result.verdict].finished
    text = stdout.decode("utf-8", "replace")
    return Batch(runs, left, stopped, result, log.collected, text)


@dataclass(frozen=True)
class SuiteRun:
    """Every test's run, what they cost, and why collection failed ("" when it did not)."""

    runs: list[TestRun]
    cpu_seconds: float
    peak_memory_bytes: int
    first: ExecResult
    collection_error: str = ""


def _collection_error(batch: Batch) -> str:
    """Why the first run collected nothing to run, "" when it did."""
    if batch.collected and batch.runs:
        return ""
    if batch.collected == [] and batch.result.exit_code == 5:
        return "no tests were collected"
    lines = [line[1:].strip() for line in batch.output.splitlines() if line.startswith("E ")]
    why = "; ".join(lines)[:600] if lines else batch.result.message
    return f"collection failed: {why}"


def run_tests(box: SubmissionBox, seconds: float, wall: float, cpu: float) -> SuiteRun:
    """Every test, in as few processes as the kills allow (the first one collects), until
    the submission's wall or CPU budget is spent (the tests left then are reported as not
    run). A sandbox a kill may have damaged is replaced."""
    started = time.monotonic()
    first = run_batch(box, None, seconds, wall, cpu)
    error = _collection_error(first)
    if error:
        box.discard()
        return SuiteRun(
            [], first.result.cpu_seconds, first.result.peak_memory_bytes, first.result, error
        )
    runs, left = list(first.runs), first.left
    cpu_used, peak = first.result.cpu_seconds, first.result.peak_memory_bytes
    killed = first.killed
    while left:
        if killed:
            box.discard()
        wall_left = wall - (time.monotonic() - started)
        if wall_left <= 0 or cpu_used >= cpu:
            spent = f"wall {wall:.0f}s" if wall_left <= 0 else f"CPU {cpu:.0f}s"
            message = f"not run: the submission's time budget ({spent}) was spent"
            runs += [TestRun(junit_id(n), Case("error", message), "timed_out") for n in left]
            break
        batch = run_batch(box, left, seconds, wall_left, cpu - cpu_used)
        runs += batch.runs
        cpu_used += batch.result.cpu_seconds
        peak = max(peak, batch.result.peak_memory_bytes)
        killed, left = batch.killed, batch.left
    return SuiteRun(runs, cpu_used, peak, first.result)


def tail(data: bytes | bytearray, limit: int = MAX_OUTPUT) -> str:
    """The end of a command's output: where a compiler's error usually is."""
    text = bytes(data).decode("utf-8", "replace")
    return text if len(text) <= limit else "...\n" + text[-limit:]
