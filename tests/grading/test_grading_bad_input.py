"""Bad input gets a clear message and no traceback: archives that climb out, courses
without a test command, a build that never ends, nothing to grade."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from courses import write_tree

from sandboxd import cli

CALC = {"calc/calc.py": "def add(a, b):\n    return a + b\n"}
PYTEST_COURSE = {
    "test_calc.py": "from calc import add\n\ndef test_add():\n    assert add(1, 2) == 3\n"
}


def _grade(
    capsys: pytest.CaptureFixture[str], tests: Path, subs: Path, *extra: str
) -> tuple[int, str]:
    code = cli.main(["grade", "--tests", str(tests), "--submissions", str(subs), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_an_archive_with_a_path_outside_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tests = write_tree(tmp_path / "tests", PYTEST_COURSE)
    subs = tmp_path / "subs"
    subs.mkdir()
    with zipfile.ZipFile(subs / "evil.zip", "w") as zf:
        zf.writestr("../../etc/cron.d/x", "* * * * * root true\n")
    code, err = _grade(capsys, tests, subs)
    assert code == 2
    assert "evil.zip" in err and "climbs out of its root" in err, err


def test_an_empty_submissions_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tests = write_tree(tmp_path / "tests", PYTEST_COURSE)
    (tmp_path / "subs").mkdir()
    code, err = _grade(capsys, tests, tmp_path / "subs")
    assert code == 2
    assert "no sub-folders or .zip files to grade" in err, err


@pytest.mark.parametrize(
    ("course", "expected"),
    [
        ('[course]\nbuild = "make"\n', "has a build command but no test command"),
        ('[course]\ntest = "./run"\n', "must write JUnit XML to {junit}"),
        ("[course\n", "course.toml"),
        ('[tests]\npoints = { "x" = -1 }\n', "points cannot be negative"),
    ],
)
def test_a_course_toml_that_cannot_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], course: str, expected: str
) -> None:
    tests = write_tree(tmp_path / "tests", {**PYTEST_COURSE, "course.toml": course})
    subs = write_tree(tmp_path / "subs", CALC)
    code, err = _grade(capsys, tests, subs)
    assert code == 2
    assert expected in err, err


def _grade_course(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str, course: str
) -> dict[str, Any]:
    """The one submission's result under a command course with this course.toml."""
    tests = write_tree(tmp_path / "tests", {"course.toml": course})
    subs = write_tree(tmp_path / "subs", CALC)
    out = tmp_path / "results.json"
    code, _ = _grade(capsys, tests, subs, "--out", str(out), "--address", address)
    assert code == 0
    (grade,) = json.loads(out.read_text())["submissions"]
    return grade  # type: ignore[no-any-return]


@pytest.mark.docker
def test_a_build_that_never_ends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str
) -> None:
    course = '[course]\nbuild = "sleep 600"\nbuild_timeout = 2\ntest = "true {junit}"\n'
    grade = _grade_course(tmp_path, capsys, address, course)
    assert grade["verdict"] == "build_failed"
    assert grade["message"].startswith("build failed (timed out after 2.0s)"), grade["message"]


@pytest.mark.docker
def test_a_test_command_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str
) -> None:
    grade = _grade_course(tmp_path, capsys, address, '[course]\ntest = "./run_tests {junit}"\n')
    assert grade["verdict"] == "error"
    message = grade["message"]
    assert message.startswith(
        "the test command wrote no JUnit XML to {junit} (exit code 127: command not found)"
    ), message
    assert "run_tests: not found" in message, message
