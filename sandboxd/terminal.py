"""The user's side of an interactive exec: raw terminal mode, its size, SIGWINCH, stdin.

`sandboxd shell`, `sandboxd exec -it` and the pytest plugin's debugger sessions attach an
`ExecSession` to this process's terminal with `attach`.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from typing import BinaryIO, Protocol

from sandboxd.api import ExecResult, OutputChunk
from sandboxd.errors import SandboxError


class Session(Protocol):
    """What `attach` needs of an interactive exec (sandboxd.client.ExecSession)."""

    def write(self, data: bytes) -> None: ...

    def resize(self, rows: int, columns: int) -> None: ...

    def close_stdin(self) -> None: ...

    def events(self) -> Iterator[OutputChunk | ExecResult]: ...


def is_terminal(fd: int = 0) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def window(fd: int = 0) -> tuple[int, int]:
    """(rows, columns) of the terminal on `fd`; 24 x 80 when it does not say."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return (size.lines or 24, size.columns or 80)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Keys go to the sandbox as typed (Ctrl-C included); the mode is restored after."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _WindowSync:
    """Sends the terminal's size whenever it differs from the last one sent.

    SIGWINCH only runs its handler when the main thread next gets to run Python code, so
    keys typed right after a resize could overtake it. The stdin pump therefore syncs the
    size before every write as well: a resize always reaches the sandbox before the keys
    typed after it.
    """

    def __init__(self, session: Session, fd: int) -> None:
        self._session = session
        self._fd = fd
        self._lock = threading.RLock()  # the handler may run while the main thread holds it
        self._sent = window(fd)

    def sync(self) -> None:
        with self._lock:
            size = window(self._fd)
            if size != self._sent:
                self._sent = size
                self._session.resize(*size)


@contextlib.contextmanager
def _forward_resizes(sizes: _WindowSync) -> Iterator[None]:
    """Pass the terminal's new size on at every SIGWINCH (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGWINCH, lambda *_: sizes.sync())
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


def _pump_stdin(
    session: Session, fd: int, done: threading.Event, sizes: _WindowSync | None
) -> None:
    """Copy our stdin to the session until it ends (then the command reads EOF) or the
    session does: a process that attaches again later must get the keys typed then."""
    while not done.is_set():
        try:
            ready, _, _ = select.select([fd], [], [], 0.1)
            data = os.read(fd, 4096) if ready else None
        except OSError:
            data = b""
        if data is None or done.is_set():
            continue
        if not data:
            session.close_stdin()
            return
        if sizes is not None:
            sizes.sync()
        session.write(data)


def attach(
    session: Session,
    *,
    tty_mode: bool,
    forward_stdin: bool = True,
    stdin_fd: int = 0,
    out: BinaryIO | None = None,
    err: BinaryIO | None = None,
) -> ExecResult:
    """Run the session on this terminal until the command ends; return its result.

    With `tty_mode` the terminal on `stdin_fd` is put in raw mode and its size changes are
    forwarded; without `forward_stdin` the command's stdin is closed at once.

    Raises:
        SandboxError: the call failed; the terminal is restored first.
    """
    stdout = out if out is not None else sys.stdout.buffer
    stderr = err if err is not None else sys.stderr.buffer
    done = threading.Event()
    sizes = _WindowSync(session, stdin_fd) if tty_mode else None
    if forward_stdin:
        threading.Thread(
            target=_pump_stdin,
            args=(session, stdin_fd, done, sizes),
            daemon=True,
            name="terminal-stdin",
        ).start()
    else:
        session.close_stdin()
    with contextlib.ExitStack() as stack:
        stack.callback(done.set)
        if sizes is not None:
            stack.enter_context(raw_mode(stdin_fd))
            stack.enter_context(_forward_resizes(sizes))
        for event in session.events():
            if isinstance(event, ExecResult):
                return event
            sink = stdout if event.stream == "stdout" else stderr
            sink.write(event.data)
            sink.flush()
    raise SandboxError("the exec stream ended without a result")
