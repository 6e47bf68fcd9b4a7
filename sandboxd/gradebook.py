"""The course: how its tests run, what each test is worth, and which tests students see.

A course is a tests folder. Without a `course.toml` in it, the folder is a pytest suite
run by the built-in runner. With one, it may name any toolchain: a Dockerfile fragment
that installs it, a build command, and a test command that writes JUnit XML.

Points and visibility come from files the course wrote, read on the host without running
anything: `course.toml`'s `[tests]` table and, for pytest, `@pytest.mark.points(N)` and
`@pytest.mark.hidden` found in the test files' syntax trees. Nothing a submission does
inside its sandbox can change what a test is worth.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sandboxd import errors

COURSE_FILE = "course.toml"

#: pytest: the built-in runner, one exec per test; command: the course's own commands.
Runner = Literal["pytest", "command"]


@dataclass(frozen=True)
class Weights:
    """What each test is worth and who sees it."""

    default_points: float = 1.0
    #: Test-name patterns (fnmatch, on the JUnit id or the function name) -> points.
    points: Mapping[str, float] = field(default_factory=dict)
    #: Test-name patterns whose output students do not see.
    hidden: tuple[str, ...] = ()

    def points_of(self, test_id: str) -> float:
        """The points of a test: the first matching pattern, else the default."""
        for pattern, value in self.points.items():
            if _matches(pattern, test_id):
                return value
        return self.default_points

    def is_hidden(self, test_id: str) -> bool:
        return any(_matches(p, test_id) for p in self.hidden)


def _matches(pattern: str, test_id: str) -> bool:
    """Against the whole id ("test_calc::test_add[1]") and its function name ("test_add")."""
    name = test_id.rsplit("::", 1)[-1].split("[", 1)[0]
    return fnmatch.fnmatchcase(test_id, pattern) or fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class Course:
    """One course's grading setup, read from its tests folder."""

    tests_dir: Path
    runner: Runner = "pytest"
    #: Dockerfile lines for the toolchain, applied before the course's files are copied.
    dockerfile: str = ""
    #: Shell command run in the submission's folder before the tests; empty: none.
    build: str = ""
    #: command runner: the shell command; `{junit}` is where it must write JUnit XML.
    test: str = ""
    #: Seconds of CPU and wall time each test gets (0: one run for the whole suite;
    #: None: not set, the grader's default applies).
    test_timeout: float | None = None
    #: Wall seconds the build command gets.
    build_timeout: float = 120.0
    weights: Weights = field(default_factory=Weights)


def _table(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise errors.InvalidArgument(f"{where}: [{key}] must be a table")
    return value


def _weights(tests: Mapping[str, Any], where: str) -> Weights:
    try:
        points = {str(k): float(v) for k, v in dict(tests.get("points", {})).items()}
        hidden = tuple(str(p) for p in tests.get("hidden", []))
        default = float(tests.get("default_points", 1.0))
    except (TypeError, ValueError) as exc:
        raise errors.InvalidArgument(f"{where}: [tests]: {exc}") from None
    if default < 0 or any(v < 0 for v in points.values()):
        raise errors.InvalidArgument(f"{where}: points cannot be negative")
    return Weights(default, points, hidden)


def load_course(tests_dir: Path, *, test_timeout: float | None = None) -> Course:
    """The course in `tests_dir`: its course.toml if any, else a plain pytest suite.

    `test_timeout` (from the command line) overrides the file's; when neither sets it,
    it stays None and the grader's default applies.

    Raises:
        InvalidArgument: no such folder, an unreadable course.toml, or a command course
            without a test command.
    """
    if not tests_dir.is_dir():
        raise errors.InvalidArgument(f"--tests {tests_dir}: not a directory")
    path = tests_dir / COURSE_FILE
    data: Mapping[str, Any] = {}
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise errors.InvalidArgument(f"{path}: {exc}") from None
    course = _table(data, "course", str(path))
    test = str(course.get("test", ""))
    runner: Runner = "command" if test else "pytest"
    if "build" in course and not test:
        raise errors.InvalidArgument(
            f"{path}: [course] has a build command but no test command "
            '(test = "..." that writes JUnit XML to {junit})'
        )
    if test and "{junit}" not in test:
        raise errors.InvalidArgument(f"{path}: the test command must write JUnit XML to {{junit}}")
    timeout = test_timeout
    if timeout is None and "test_timeout" in course:
        try:
            timeout = float(course["test_timeout"])
        except (TypeError, ValueError):
            raise errors.InvalidArgument(f"{path}: test_timeout must be a number") from None
    if timeout is not None and timeout < 0:
        raise errors.InvalidArgument(f"test timeout {timeout} cannot be negative")
    return Course(
        tests_dir=tests_dir,
        runner=runner,
        dockerfile=str(course.get("dockerfile", "")),
        build=str(course.get("build", "")),
        test=test,
        test_timeout=timeout,
        build_timeout=float(course.get("build_timeout", 120.0)),
        weights=_merge_markers(_weights(_table(data, "tests", str(path)), str(path)), tests_dir),
    )


# -- pytest markers, read from the syntax tree -------------------------------------------


def _mark(node: ast.expr) -> tuple[str, float | None] | None:
    """("points", 3) for `@pytest.mark.points(3)`, ("hidden", None) for `@pytest.mark.hidden`."""
    call = node if isinstance(node, ast.Call) else None
    target = call.func if call is not None else node
    if not (isinstance(target, ast.Attribute) and target.attr in ("points", "hidden")):
        return None
    base = target.value
    if not (isinstance(base, ast.Attribute) and base.attr == "mark"):
        return None
    if target.attr == "points" and call is not None and call.args:
        arg = call.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, (int, float)):
            return "points", float(arg.value)
    return (target.attr, None) if target.attr == "hidden" else None


def _marked_functions(tree: ast.Module) -> dict[str, dict[str, float | None]]:
    """Test function name -> its points/hidden marks, class marks applied to methods."""
    found: dict[str, dict[str, float | None]] = {}

    def visit(body: list[ast.stmt], inherited: dict[str, float | None]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                marks = dict(inherited)
                marks.update(m for d in node.decorator_list if (m := _mark(d)) is not None)
                if isinstance(node, ast.ClassDef):
                    visit(node.body, marks)
                elif node.name.startswith("test") and marks:
                    found[node.name] = marks

    visit(tree.body, {})
    return found


def _merge_markers(weights: Weights, tests_dir: Path) -> Weights:
    """The course.toml weights plus the pytest markers; markers win, being closest to the
    test."""
    points: dict[str, float] = {}
    hidden: list[str] = []
    for path in sorted(tests_dir.rglob("test*.py")):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue  # pytest reports it when it collects
        module = path.relative_to(tests_dir).with_suffix("").as_posix().replace("/", ".")
        for name, marks in _marked_functions(tree).items():
            # The JUnit id: "module::name", "module.Class::name", each maybe "[params]".
            patterns = [f"{m}::{name}{p}" for m in (module, f"{module}.*") for p in ("", "[[]*")]
            if marks.get("points") is not None:
                points.update(dict.fromkeys(patterns, float(marks["points"] or 0.0)))
            if "hidden" in marks:
                hidden += patterns
    return Weights(
        weights.default_points,
        {**points, **weights.points},
        (*hidden, *weights.hidden),
    )


# -- results ----------------------------------------------------------------------------

Outcome = Literal["passed", "failed", "error", "skipped"]


@dataclass(frozen=True)
class Case:
    """One test's result before points: its outcome, the line that says why, the longer
    text, and what the test cost (0 where the runner does not measure it)."""

    outcome: Outcome
    message: str = ""
    output: str = ""
    cpu_seconds: float = 0.0
    peak_memory_bytes: int = 0


@dataclass(frozen=True)
class TestResult:
    """One test of one submission, as the reports show it."""

    test_id: str
    #: passed | failed | error | skipped
    outcome: str
    #: Why it failed, one line: "timed out after 2.0s", the assertion, "build failed".
    message: str
    #: The longer text (traceback, compiler output); students do not see a hidden test's.
    output: str
    score: float
    max_score: float
    hidden: bool
    #: CPU seconds and peak resident bytes of the test alone (0: not measured).
    cpu_seconds: float = 0.0
    peak_memory_bytes: int = 0


def scored(weights: Weights, cases: Mapping[str, Case]) -> list[TestResult]:
    """Per-test results with points, sorted by test id."""
    return [
        TestResult(
            test_id,
            case.outcome,
            case.message,
            case.output,
            weights.points_of(test_id) if case.outcome == "passed" else 0.0,
            weights.points_of(test_id),
            weights.is_hidden(test_id),
            round(case.cpu_seconds, 3),
            case.peak_memory_bytes,
        )
        for test_id, case in sorted(cases.items())
    ]
