"""pytest --sandbox --cov: routed tests are measured inside and count on the host."""

from __future__ import annotations

import re

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CALC = """
def sign(x):
    if x > 0:
        return 1
    if x < 0:
        return -1
    return 0


def never_called():
    return "unmeasured"
"""

TESTS = """
from calc import sign

def test_positive():
    assert sign(3) == 1

def test_negative():
    assert sign(-2) == -1
"""


def total_percent(lines: list[str]) -> str:
    for line in lines:
        match = re.match(r"^TOTAL\s+.*\s(\d+(?:\.\d+)?%)$", line.strip())
        if match:
            return match.group(1)
    raise AssertionError("no TOTAL line in:\n" + "\n".join(lines))


def test_routed_coverage_matches_the_local_run(
    pytester: pytest.Pytester, no_leftovers: None
) -> None:
    pytester.makepyfile(calc=CALC, test_calc=TESTS)
    pytester.makeini("[pytest]\npythonpath = .\n")
    common = ("-p", "no:cacheprovider", "--cov=calc", "--cov-report=term")
    local = pytester.runpytest_subprocess(*common)
    local.assert_outcomes(passed=2)
    routed = pytester.runpytest_subprocess("--sandbox=all", "-rA", *common)
    routed.assert_outcomes(passed=2)
    local_total = total_percent(local.outlines)
    assert local_total not in ("0%", "100%")  # the module is measured, and partly
    assert total_percent(routed.outlines) == local_total
    # The sandbox's data was combined away: no parallel file is left beside .coverage.
    assert not list(pytester.path.glob(".coverage.*"))
