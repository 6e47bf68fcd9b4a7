"""A test killed by its memory limit FAILS and says why.

The hog runs in a nested session (pytester) so that this demo's own run stays
green while the message is shown; the run below is the same as running
`pytest --sandbox` on a project holding just the hog.
"""

HOG = """
import pytest

@pytest.mark.sandbox(memory="64m")
def test_memory_hog():
    print("allocating 512 MiB under a 64 MiB limit")
    blob = bytearray(512 * 1024 * 1024)
"""


def test_memory_kill_is_reported_as_failed(pytester):
    pytester.makepyfile(test_hog=HOG)
    result = pytester.runpytest_subprocess("--sandbox", "-rA")
    print(result.stdout.str())
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["FAILED test_hog.py::test_memory_hog - out of memory (limit 64 MiB)"]
    )
    result.stdout.fnmatch_lines(["allocating 512 MiB under a 64 MiB limit"])
