"""Runs INSIDE the sandbox: pdb on the user's terminal, for `--pdb` and `breakpoint()`.

Stand-alone like the worker (shipped next to it as `pytest_sandbox_debugger.py`). The
worker's stdin and stdout are its channel to the controller, so the debugger needs a
terminal of its own. When pytest starts a debugger (a failure under --pdb, or
breakpoint()), `SandboxPdb` sends a `debug` record; the controller answers by opening an
interactive TTY exec in this sandbox, attached to the user's terminal, whose small shell
writes the path of its terminal into the file the record named and then waits. pdb opens
that terminal and talks to the user on it. The shell ends when the debugging process
says it is done or is gone, and with it the controller's exec.

Registered as a plugin; pytest finds the class through `--pdbcls`.
"""

from __future__ import annotations

import contextlib
import io
import os
import pdb
import sys
import time
from collections.abc import Callable, Generator
from typing import IO, Any

import pytest

#: How long to wait for the controller's terminal (it may be running local tests first).
WAIT_SECONDS = 120.0


class _State:
    """The debugger's link to the worker, and the terminal once one is open."""

    send: Callable[..., None] = staticmethod(lambda kind, **data: None)
    pause_watchdog: Callable[[], None] = staticmethod(lambda: None)
    directory = "/tmp"
    nodeid = ""
    header = ""
    terminal: IO[str] | None = None
    owner = 0  # the pid that opened the terminal (a forked test child, or the worker)


_state = _State()


def configure(worker: Any, directory: str) -> Any:
    """Called by the worker, which registers what this returns (this module) as a plugin:
    its channel reaches the controller, its watchdog is paused while a person debugs (the
    test child's own watchdog, once forked), `directory` is where to meet the terminal."""
    _state.send = lambda kind, **data: worker.channel.send(kind, **data)
    _state.pause_watchdog = lambda: worker.watchdog.disarm()
    _state.directory = directory
    return sys.modules[__name__]


def _rendezvous() -> str:
    return os.path.join(_state.directory, f"debug-{os.getpid()}")


def _acquire() -> IO[str] | None:
    """The user's terminal, asked for once per process and test; None when none came."""
    if _state.terminal is not None and _state.owner == os.getpid():
        return _state.terminal
    path = _rendezvous()
    for stale in (path, f"{path}.done"):  # a process of the same pid before
        with contextlib.suppress(OSError):
            os.unlink(stale)
    _state.pause_watchdog()  # a person at a prompt is not a test running past its timeout
    _state.send("debug", nodeid=_state.nodeid, pid=os.getpid(), file=path)
    deadline = time.monotonic() + WAIT_SECONDS
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            print("pytest-sandbox: no terminal to debug on; going on", file=sys.stderr)
            return None
        time.sleep(0.05)
    with open(path) as f:
        device = f.read().strip()
    if not device.startswith("/dev/"):  # the controller could not open a terminal
        return None
    # Not as a controlling terminal: a forked test child is a session leader.
    raw = open(os.open(device, os.O_RDWR | os.O_NOCTTY), "r+b", buffering=0)  # noqa: SIM115
    _state.terminal = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", write_through=True)
    _state.owner = os.getpid()
    return _state.terminal


def release() -> None:
    """Hand the terminal back: the controller's shell sees the done file and ends."""
    if _state.terminal is None or _state.owner != os.getpid():
        return
    with contextlib.suppress(OSError):
        _state.terminal.close()
    _state.terminal = None
    with contextlib.suppress(OSError), open(f"{_rendezvous()}.done", "w"):
        pass


class SandboxPdb(pdb.Pdb):
    """pdb on the user's terminal (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        terminal = _acquire()
        if terminal is not None:
            kwargs.update(stdin=terminal, stdout=terminal)
            header = _state.header or f"breakpoint in {_state.nodeid}"
            _state.header = ""
            terminal.write(f"\n{header}\n>>> pdb in the sandbox; 'c' continues, 'q' quits\n")
        super().__init__(*args, **kwargs)


@pytest.hookimpl(tryfirst=True)
def pytest_exception_interact(node: Any, call: Any, report: Any) -> None:
    """Shown on the terminal before the post-mortem prompt, as pytest shows it locally."""
    text = getattr(report, "longreprtext", "")
    _state.header = f"{text}\n>>> post-mortem of {node.nodeid}" if text else ""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: Any, nextitem: Any) -> Generator[None, object, object]:
    _state.nodeid = item.nodeid
    try:
        return (yield)
    finally:
        release()
