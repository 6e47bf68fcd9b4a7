"""pytest --sandbox end to end: limits, isolation, scopes, kills, junitxml, -x, src layout."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

CGROUP_MEMORY = """
def memory_limit():
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                return int(f.read())
        except OSError:
            pass
    raise AssertionError("no memory cgroup visible")
"""


def test_routed_tests_run_limited_and_report_natively(
    pytester: pytest.Pytester, no_leftovers: None
) -> None:
    pytester.makepyfile(
        **{
            "src/mypkg/__init__.py": "def answer():\n    return 42\n",
            "conftest.py": """
                import pytest

                @pytest.fixture
                def greeting():
                    return "from conftest"
            """,
            "test_limits.py": CGROUP_MEMORY
            + """
import os, socket, subprocess, time
import pytest

@pytest.mark.sandbox(memory="96m")
def test_sees_its_limits(greeting, record_property):
    record_property("mine", "kept")
    assert greeting == "from conftest"
    assert memory_limit() == 96 * 1024 * 1024
    assert socket.gethostname() == "sandbox"
    assert os.listdir("/sys/class/net") == ["lo"]
    assert os.environ["PYTHONHASHSEED"] == "0"

@pytest.mark.sandbox
def test_src_layout_without_install():
    import mypkg
    assert mypkg.answer() == 42

@pytest.mark.sandbox
def test_isolated_a():
    home = os.environ["HOME"]
    open(os.path.join(home, "a"), "w").close()
    assert not os.path.exists(os.path.join(home, "b"))

@pytest.mark.sandbox
def test_isolated_b():
    home = os.environ["HOME"]
    open(os.path.join(home, "b"), "w").close()
    assert not os.path.exists(os.path.join(home, "a"))

def test_unmarked_runs_on_host():
    assert socket.gethostname() != "sandbox"
    # the session froze the heap it was configured with; what a test makes is collected
    import gc, weakref
    assert gc.get_freeze_count() > 10000

    class Cycle:
        pass

    made = Cycle()
    made.me = made
    gone = weakref.ref(made)
    del made
    gc.collect()
    assert gone() is None

@pytest.mark.sandbox(memory="64m")
def test_oom():
    print("before the allocation")
    blob = bytearray(256 * 1024 * 1024)

@pytest.mark.sandbox(timeout=2)
def test_timeout():
    print("about to hang")
    time.sleep(60)

@pytest.mark.sandbox(pids=32)
def test_pids():
    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(64)]

@pytest.mark.sandbox
def test_skipped():
    pytest.skip("not today")
""",
            "test_module_scope.py": """
import os
import pytest

pytestmark = pytest.mark.sandbox(scope="module")

def test_first():
    open("/tmp/left-by-first", "w").close()

def test_second_sees_the_same_container():
    assert os.path.exists("/tmp/left-by-first")

def test_third_fails():
    assert 1 + 1 == 3
""",
        }
    )
    result = pytester.runpytest_subprocess("--sandbox", "-rA", "--junitxml=out.xml", "-v")
    result.stdout.fnmatch_lines_random(
        [
            "PASSED test_limits.py::test_sees_its_limits",
            "PASSED test_limits.py::test_src_layout_without_install",
            "PASSED test_limits.py::test_isolated_a",
            "PASSED test_limits.py::test_isolated_b",
            "PASSED test_limits.py::test_unmarked_runs_on_host",
            "FAILED test_limits.py::test_oom - out of memory (limit 64 MiB)",
            "FAILED test_limits.py::test_timeout - timed out after 2.0s",
            "FAILED test_limits.py::test_pids - process limit (32) reached*",
            "SKIPPED [[]1[]] test_limits.py:*: not today",
            "PASSED test_module_scope.py::test_first",
            "PASSED test_module_scope.py::test_second_sees_the_same_container",
            "FAILED test_module_scope.py::test_third_fails - assert (1 + 1) == 3",
        ]
    )
    # what a killed test printed before the kill is in its report
    result.stdout.fnmatch_lines(["*Captured stdout call*", "before the allocation"])
    result.stdout.fnmatch_lines(["*Captured stdout call*", "about to hang"])
    result.assert_outcomes(passed=7, failed=4, skipped=1)

    suite = ET.parse(pytester.path / "out.xml").getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert len(cases) == 12
    for name, case in cases.items():
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if name == "test_unmarked_runs_on_host":
            assert "sandbox_image" not in props
            continue
        assert props["sandbox_image"].startswith("sha256:"), (name, props)
        assert {"sandbox_memory", "sandbox_cpus", "sandbox_pids", "sandbox_timeout"} <= set(props)
    assert {p.get("name"): p.get("value") for p in cases["test_sees_its_limits"].iter("property")}[
        "sandbox_memory"
    ] == "96 MiB"
    assert "out of memory" in cases["test_oom"].find("failure").get("message")


def test_exitfirst_stops_at_the_first_routed_failure(
    pytester: pytest.Pytester, no_leftovers: None
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox
        def test_1_fails():
            assert False

        @pytest.mark.sandbox
        def test_2():
            pass

        @pytest.mark.sandbox
        def test_3():
            pass
        """
    )
    result = pytester.runpytest_subprocess("--sandbox", "--sandbox-jobs=1", "-x")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*stopping after 1 failures*"])


SUBTESTS = """
import pytest

def test_with_subtests(subtests):
    for i in range(3):
        with subtests.test(msg="case", i=i):
            assert i != 1

def test_xfails():
    pytest.xfail("known")

@pytest.mark.xfail(strict=True)
def test_xpass_strict():
    pass

def test_plain():
    pass
"""


@pytest.mark.skipif(
    not hasattr(pytest, "Subtests"), reason="pytest has no built-in subtests before 9.0"
)
def test_subtests_and_xfail_replay_like_a_local_run(
    pytester: pytest.Pytester, no_leftovers: None
) -> None:
    pytester.makepyfile(test_sub=SUBTESTS)
    local = pytester.runpytest_subprocess("-rA", "-p", "no:cacheprovider")
    routed = pytester.runpytest_subprocess(
        "-rA", "-p", "no:cacheprovider", "--sandbox=all", "--sandbox-scope=module"
    )

    def summary(result: pytest.RunResult) -> list[str]:
        lines = result.stdout.lines
        start = next(i for i, line in enumerate(lines) if "short test summary info" in line)
        return sorted(line for line in lines[start + 1 :] if not line.startswith("="))

    assert summary(routed) == summary(local)
    assert routed.ret == local.ret
    routed.stdout.fnmatch_lines(["*SUBFAILED*(i=1) test_sub.py::test_with_subtests*"])
    routed.stdout.fnmatch_lines(["*FAILED test_sub.py::test_with_subtests - contains 1 failed*"])


def test_ctrl_c_leaves_no_sandbox_behind(
    pytester: pytest.Pytester, no_leftovers: None, containers: Any
) -> None:
    pytester.makepyfile(
        """
        import time, pytest

        @pytest.mark.sandbox(scope="session")
        def test_hangs():
            time.sleep(120)
        """
    )
    proc = pytester.popen(
        [sys.executable, "-m", "pytest", "--sandbox", "-p", "no:cacheprovider"],
        stdin=None,
    )
    deadline = time.monotonic() + 120
    while not containers.new():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no sandbox appeared"
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert b"KeyboardInterrupt" in out + err
    assert b"INTERNALERROR" not in out + err


def test_keep_failed_keeps_only_the_failed_tests_sandbox(
    pytester: pytest.Pytester, no_leftovers: None, containers: Any
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox
        def test_fails():
            open("/sandbox/work/evidence", "w").write("left for inspection")
            assert False

        @pytest.mark.sandbox
        def test_passes():
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "--sandbox", "--sandbox-keep-failed", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*kept the sandbox of*test_fails*", "*docker exec -it * bash*"])
    kept = containers.left()
    try:
        assert len(kept) == 1, kept
        inside = subprocess.run(
            ["docker", "exec", kept[0], "cat", "/sandbox/work/evidence"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert inside.stdout == "left for inspection", inside.stderr
    finally:
        subprocess.run(["docker", "rm", "-f", *kept], capture_output=True, check=False)


def test_last_failed_reruns_only_the_routed_failure(
    pytester: pytest.Pytester, no_leftovers: None
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox
        def test_ok():
            pass

        @pytest.mark.sandbox
        def test_broken():
            assert 1 == 2
        """
    )
    first = pytester.runpytest_subprocess("--sandbox")
    first.assert_outcomes(passed=1, failed=1)
    again = pytester.runpytest_subprocess("--sandbox", "--lf", "-v")
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*test_broken FAILED*"])
    again.stdout.no_fnmatch_line("*test_ok PASSED*")


def test_sandbox_required_refuses_to_run_marked_tests_locally(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nsandbox_required = true\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox
        def test_marked():
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*sandbox_required is set but --sandbox was not given*"])


def test_a_path_after_the_flag_is_a_path_to_test(
    pytester: pytest.Pytester, no_leftovers: None
) -> None:
    routed = """
        import os
        import pytest

        @pytest.mark.sandbox
        def test_marked():
            assert os.path.isdir("/sandbox")

        def test_unmarked():
            assert not os.path.isdir("/sandbox")
    """
    pytester.makepyfile(**{"sub/test_sub.py": routed, "test_elsewhere.py": "def test_x(): pass"})
    result = pytester.runpytest_subprocess("--sandbox", "sub/", "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["sandbox: tests marked sandbox via*", "*test_marked PASSED*"])
    result.stdout.no_fnmatch_line("*test_elsewhere*")
    every = pytester.runpytest_subprocess("--sandbox=all", "sub/", "-p", "no:cacheprovider")
    every.assert_outcomes(passed=1, failed=1)
    every.stdout.fnmatch_lines(
        ["sandbox: every test via*", "*FAILED sub/test_sub.py::test_unmarked*"]
    )
