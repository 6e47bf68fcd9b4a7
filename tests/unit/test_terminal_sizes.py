"""The size of the user's terminal reaches the sandbox before the keys typed after a resize."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import termios
import threading
import time
from collections.abc import Iterator

from sandboxd.api import ExecResult, OutputChunk
from sandboxd.terminal import _pump_stdin, _WindowSync


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def resize(self, rows: int, columns: int) -> None:
        self.calls.append(("resize", (rows, columns)))

    def close_stdin(self) -> None:
        self.calls.append(("close", None))

    def events(self) -> Iterator[OutputChunk | ExecResult]:
        return iter(())


def set_size(fd: int, rows: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def test_keys_typed_after_a_resize_follow_it_even_without_sigwinch() -> None:
    master, slave = pty.openpty()
    try:
        set_size(slave, 24, 80)
        session = Recorder()
        sizes = _WindowSync(session, slave)
        done = threading.Event()
        pump = threading.Thread(target=_pump_stdin, args=(session, slave, done, sizes))
        pump.start()
        set_size(slave, 30, 100)  # no SIGWINCH handler here: only the pump can notice
        os.write(master, b"stty size\n")
        deadline = time.monotonic() + 10
        while not any(kind == "write" for kind, _ in session.calls):
            assert time.monotonic() < deadline, session.calls
            time.sleep(0.01)
        done.set()
        pump.join(timeout=10)
        kinds = [kind for kind, _ in session.calls]
        assert session.calls[0] == ("resize", (30, 100))
        assert kinds.index("resize") < kinds.index("write")
        assert kinds.count("resize") == 1  # an unchanged size is not sent again
    finally:
        os.close(master)
        os.close(slave)


def test_an_unchanged_size_sends_nothing() -> None:
    master, slave = pty.openpty()
    try:
        set_size(slave, 40, 120)
        session = Recorder()
        sizes = _WindowSync(session, slave)
        sizes.sync()
        assert session.calls == []
        set_size(slave, 41, 120)
        sizes.sync()
        sizes.sync()
        assert session.calls == [("resize", (41, 120))]
    finally:
        os.close(master)
        os.close(slave)
