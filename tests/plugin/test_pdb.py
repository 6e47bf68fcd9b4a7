"""Debugging and inspecting routed tests from the user's terminal.

`--pdb` and `breakpoint()` open pdb inside the sandbox on the terminal pytest runs on;
the terminal here is a pseudo-terminal the test drives. Without a terminal nothing
waits for input.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import pytest

from sandboxd.client import SandboxClient
from sandboxd.server import Service
from tests.terminal_driver import Terminal


def pytest_on_terminal(pytester: pytest.Pytester, args: Sequence[str]) -> Terminal:
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    return Terminal(argv, rows=30, columns=120, cwd=str(pytester.path))


@pytest.mark.parametrize("isolation", ["fork", "container"])
def test_pdb_stops_at_a_failing_routed_test_inside_the_sandbox(
    pytester: pytest.Pytester, service: Service, isolation: str
) -> None:
    pytester.makepyfile(
        test_debugged=f"""
        import socket
        import pytest

        @pytest.mark.sandbox(isolation={isolation!r})
        def test_fails():
            answer = 6 * 7
            host = socket.gethostname()
            assert answer == 41

        @pytest.mark.sandbox(isolation={isolation!r})
        def test_after():
            pass
        """
    )
    args = ["--sandbox", "--sandbox-address", service.address, "--pdb", "test_debugged.py"]
    with pytest_on_terminal(pytester, args) as term:
        term.expect(rb"assert 42 == 41", timeout=300)  # the failure, shown before the prompt
        term.expect(rb"\(Pdb\) ")
        term.send(b"p answer, host\r")
        term.expect(rb"\(42, 'sandbox'\)")  # the sandbox's hostname: pdb runs in there
        term.send(b"c\r")
        assert term.wait(180) == 1
    text = bytes(term.output).decode("utf-8", "replace")
    assert "1 failed, 1 passed" in text, text


def test_breakpoint_in_a_routed_test_opens_pdb(pytester: pytest.Pytester, service: Service) -> None:
    pytester.makepyfile(
        test_paused="""
        import pytest

        @pytest.mark.sandbox
        def test_pauses():
            word = "inside"
            breakpoint()
            assert word == "inside"
        """
    )
    args = ["--sandbox", "--sandbox-address", service.address, "test_paused.py"]
    with pytest_on_terminal(pytester, args) as term:
        term.expect(rb"\(Pdb\) ", timeout=300)
        term.send(b"p word * 2\r")
        term.expect(rb"'insideinside'")
        term.send(b"c\r")
        assert term.wait(180) == 0
    assert "1 passed" in bytes(term.output).decode("utf-8", "replace")


def test_without_a_terminal_nothing_waits(pytester: pytest.Pytester, service: Service) -> None:
    pytester.makepyfile(
        test_ci="""
        import pytest

        @pytest.mark.sandbox
        def test_fails():
            assert 1 == 2

        @pytest.mark.sandbox
        def test_pauses():
            breakpoint()

        @pytest.mark.sandbox
        def test_passes():
            pass
        """
    )
    # As without a sandbox when stdin is no terminal: pdb reads end of input and quits.
    result = pytester.runpytest_subprocess(
        "--sandbox",
        "--sandbox-address",
        service.address,
        "--pdb",
        "-p",
        "no:cacheprovider",
        timeout=300,
    )
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(["*test_pauses - bdb.BdbQuit*"])
    assert "pdb in sandbox" not in result.stdout.str()


def test_keep_failed_prints_a_shell_line_that_works(
    pytester: pytest.Pytester, service: Service
) -> None:
    pytester.makepyfile(
        test_kept="""
        import pytest

        @pytest.mark.sandbox
        def test_fails():
            open("/sandbox/work/evidence", "w").write("left for inspection")
            assert False
        """
    )
    result = pytester.runpytest_subprocess(
        "--sandbox",
        "--sandbox-address",
        service.address,
        "--sandbox-keep-failed",
        "-p",
        "no:cacheprovider",
        timeout=300,
    )
    result.assert_outcomes(failed=1)
    lines = [line.strip() for line in result.stdout.lines if "sandboxd shell" in line]
    assert len(lines) == 1, result.stdout.str()
    argv = lines[0].split()
    assert argv[:3] == ["sandboxd", "shell", "--address"] and argv[3] == service.address
    sandbox_id = argv[4]
    try:
        shell = subprocess.run(
            [sys.executable, "-m", "sandboxd.cli", *argv[1:]],
            input=b"cat /sandbox/work/evidence\n",
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert shell.stdout == b"left for inspection", shell.stderr
    finally:
        with SandboxClient(service.address) as client:
            client.destroy_sandbox(sandbox_id)
