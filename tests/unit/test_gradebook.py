"""The course model: course.toml, points and hidden tests from markers read without running."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd import errors
from sandboxd.gradebook import Case, Weights, load_course, scored

MARKED = """
import pytest

@pytest.mark.points(3)
def test_big():
    pass

def test_plain():
    pass

@pytest.mark.hidden
@pytest.mark.parametrize("x", [1, 2])
def test_secret(x):
    pass

@pytest.mark.points(2.5)
class TestGroup:
    def test_one(self):
        pass

    @pytest.mark.points(4)
    def test_two(self):
        pass
"""


def test_a_folder_without_course_toml_is_a_pytest_course(tmp_path: Path) -> None:
    course = load_course(tmp_path)
    assert course.runner == "pytest" and course.test_timeout is None and not course.build


def test_markers_give_points_and_visibility(tmp_path: Path) -> None:
    sub = tmp_path / "part"
    sub.mkdir()
    (sub / "test_m.py").write_text(MARKED)
    weights = load_course(tmp_path).weights
    assert weights.points_of("part.test_m::test_big") == 3.0
    assert weights.points_of("part.test_m::test_plain") == 1.0
    assert weights.points_of("part.test_m.TestGroup::test_one") == 2.5
    assert weights.points_of("part.test_m.TestGroup::test_two") == 4.0
    assert weights.is_hidden("part.test_m::test_secret[1]")
    assert not weights.is_hidden("part.test_m::test_plain")
    # Same function name in another module: not the marked one.
    assert weights.points_of("other::test_big") == 1.0


def test_course_toml_sets_commands_defaults_and_patterns(tmp_path: Path) -> None:
    (tmp_path / "course.toml").write_text(
        '[course]\ndockerfile = "RUN true"\nbuild = "make"\ntest = "./t {junit}"\n'
        "test_timeout = 2\n"
        '[tests]\ndefault_points = 2\npoints = { "fib_*" = 5 }\nhidden = ["secret*"]\n'
    )
    course = load_course(tmp_path)
    assert (course.runner, course.build, course.test, course.test_timeout) == (
        "command", "make", "./t {junit}", 2.0,
    )  # fmt: skip
    assert course.dockerfile == "RUN true"
    assert course.weights.points_of("fib::fib_large") == 5.0
    assert course.weights.points_of("fib::other") == 2.0
    assert course.weights.is_hidden("suite::secret_one")
    assert load_course(tmp_path, test_timeout=7.0).test_timeout == 7.0


def test_a_missing_tests_folder(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="not a directory"):
        load_course(tmp_path / "nope")


def test_scores_count_points_of_passed_tests() -> None:
    weights = Weights(1.0, {"big": 3.0}, ("hid*",))
    results = scored(
        weights,
        {
            "m::big": Case("passed"),
            "m::small": Case("failed", "assert 1 == 2", "trace"),
            "m::hidden_one": Case("passed"),
        },
    )
    assert [(r.test_id, r.score, r.max_score, r.hidden) for r in results] == [
        ("m::big", 3.0, 3.0, False),
        ("m::hidden_one", 1.0, 1.0, True),
        ("m::small", 0.0, 1.0, False),
    ]
