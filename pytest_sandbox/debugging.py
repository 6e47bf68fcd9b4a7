"""The controller's side of debugging in a sandbox: pdb there, on the user's terminal here.

`--pdb` and `breakpoint()` in a routed test open pdb inside the sandbox (debugger.py). When
it asks for a terminal, the main thread opens an interactive TTY exec in that sandbox,
attached to this terminal, that lends its terminal to pdb until the debugging ends. Only
when this process has a terminal on stdin: without one (CI) nothing is set up, and a
failing test fails as it does without --pdb.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from pytest_sandbox.models import DebugRequest
from sandboxd import errors

if TYPE_CHECKING:
    # The client and the terminal relay (grpc, the service's records) are for a debugging
    # session only; the check at configure time must not pay for importing them.
    from sandboxd.client import SandboxClient

#: pytest inside the sandbox builds its debugger from this class (debugger.py).
PDB_CLASS = "pytest_sandbox_debugger:SandboxPdb"
#: Written where the debugger waits for a terminal's path when none can be had.
NO_TERMINAL = "none"


def terminal_available(config: pytest.Config) -> bool:
    """Whether stdin and stdout are a terminal (pytest's capturing hides them: look past it)."""
    with _uncaptured(config):
        return _is_terminal(0) and _is_terminal(1)


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def worker_args(config: pytest.Config) -> list[str]:
    """The worker's debugging options: pytest's own --pdb, with our debugger class."""
    return [f"--pdbcls={PDB_CLASS}", *(["--pdb"] if config.getoption("usepdb") else [])]


def relay_script(request: DebugRequest) -> str:
    """The shell that lends its terminal: writes the device's path where the debugger
    waits for it, then waits while the debugging process lives and is not done. Ctrl-C
    and Ctrl-Z stay with pdb's terminal instead of ending the shell."""
    path = shlex.quote(request.file)
    return (
        "trap '' INT QUIT TSTP; "
        f"tty > {path}.tmp && mv {path}.tmp {path}; "
        f"while kill -0 {request.pid} 2>/dev/null && [ ! -e {path}.done ]; do sleep 0.2; done; "
        f"rm -f {path} {path}.done"
    )


def attach(config: pytest.Config, client: SandboxClient, request: DebugRequest) -> None:
    """Lend this terminal to the sandbox's debugger until it is done (main thread)."""
    from sandboxd import terminal

    reporter = config.pluginmanager.getplugin("terminalreporter")
    with _uncaptured(config):
        tw = reporter._tw if reporter is not None else None
        if tw is not None:
            tw.line()
            tw.sep(">", f"pdb in sandbox {request.sandbox_id}: {request.nodeid}")
        try:
            session = client.exec_session(
                request.sandbox_id,
                ["sh", "-c", relay_script(request)],
                tty=True,
                window=terminal.window(0),
            )
            terminal.attach(session, tty_mode=True)
        except errors.SandboxError as exc:
            if tw is not None:
                tw.line(f"pytest-sandbox: no terminal for the debugger: {exc.message}", red=True)
            _refuse(client, request)
        if tw is not None:
            tw.sep("<", "end of pdb in the sandbox")


def _refuse(client: SandboxClient, request: DebugRequest) -> None:
    """Tell the waiting debugger there is no terminal, so its test goes on at once."""
    path = shlex.quote(request.file)
    with contextlib.suppress(errors.SandboxError):
        client.exec(request.sandbox_id, ["sh", "-c", f"echo {NO_TERMINAL} > {path}"])


@contextlib.contextmanager
def _uncaptured(config: pytest.Config) -> Iterator[None]:
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        yield
        return
    with capman.global_and_fixture_disabled():
        # stdin too, as pytest's own pdb does (the next resume captures it again).
        capman.suspend_global_capture(in_=True)
        yield
