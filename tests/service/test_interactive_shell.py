"""`sandboxd shell` and `sandboxd exec -it` on a pseudo-terminal, against a running serve."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sandboxd.api import Sandbox, SandboxRequest
from sandboxd.client import SandboxClient
from sandboxd.server import Service, create_server
from tests.conftest import make_config, small_limits
from tests.terminal_driver import Terminal


@pytest.fixture(scope="module")
def tcp_service(base_image: str) -> Iterator[str]:
    """A second sandboxd, on loopback TCP: the CLI reaches it as a remote one."""
    svc, bound = create_server(make_config(), "127.0.0.1:0")
    try:
        yield bound
    finally:
        svc.stop(grace=2.0)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sandboxd.cli", *args]


def test_shell_over_tcp_sees_its_size_follows_resizes_and_exits_with_the_code(
    tcp_service: str,
) -> None:
    with (
        SandboxClient(tcp_service) as client,
        client.sandbox(SandboxRequest(limits=small_limits())) as box,
        Terminal(cli("shell", "--address", tcp_service, box.id), rows=24, columns=80) as term,
    ):
        before = term.attributes()
        term.expect(rb"\$ ")
        term.send(b"stty size; tty\r")
        term.expect(rb"24 80\r\n/dev/pts/")
        term.resize(30, 100)  # SIGWINCH for the CLI, which passes the size on
        term.send(b"stty size\r")
        term.expect(rb"30 100\r\n\$ ")
        # The child says so once it runs as the terminal's foreground job.
        term.send(b"sh -c 'echo sleeping; exec sleep 30'\r")
        term.expect(rb"sleeping\r\n")
        term.send(b"\x03")  # Ctrl-C reaches the sandbox's foreground job, not the CLI
        term.expect(rb"(?s)sleeping\r\n.*\^C.*\$ ")
        term.send(b"echo still-$((40+2)); exit 5\r")
        term.expect(rb"still-42")
        assert term.wait() == 5
        assert term.attributes() == before  # raw mode was undone


def test_exec_it_on_the_local_socket(service: Service, sandbox: Sandbox) -> None:
    argv = cli("exec", "-it", "--address", service.address, sandbox.id, "sh", "-c")
    script = "printf 'name? '; read name; echo hello-$name; exit 3"
    with Terminal([*argv, script]) as term:
        term.expect(rb"name\? ")
        term.send(b"box\r")
        term.expect(rb"hello-box")
        assert term.wait() == 3


def test_exec_i_without_a_terminal_streams_stdin(service: Service, sandbox: Sandbox) -> None:
    done = subprocess.run(
        cli("exec", "-i", "--address", service.address, sandbox.id, "sh", "-c", "tr a-z A-Z"),
        input=b"piped text\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, b"PIPED TEXT\n"), done.stderr


def test_exec_t_without_a_terminal_is_refused(service: Service, sandbox: Sandbox) -> None:
    done = subprocess.run(
        cli("exec", "-t", "--address", service.address, sandbox.id, "sh"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
        env={**os.environ},
    )
    assert done.returncode == 2
    assert b"-t: stdin is not a terminal" in done.stderr


def test_shell_into_an_unknown_sandbox_says_so(service: Service) -> None:
    done = subprocess.run(
        cli("shell", "--address", service.address, "sbx-none"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert b"sandboxd: error:" in done.stderr and b"Traceback" not in done.stderr
