"""Drive a program on a pseudo-terminal from a test, as a person at a terminal would.

The program gets the pty as its controlling terminal (so resizing the pty sends it
SIGWINCH); the test writes keys, waits for text and reads the exit code.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Mapping, Sequence

#: Runs in the child: make the pty (its stdin) the controlling terminal, then exec.
_TAKE_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


class Terminal:
    """A program running on a new pseudo-terminal of `rows` x `columns`."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        rows: int = 24,
        columns: int = 80,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.master, slave = os.openpty()
        self.resize(rows, columns)
        self.output = bytearray()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _TAKE_TERMINAL, *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        os.close(slave)

    def resize(self, rows: int, columns: int) -> None:
        """Change the terminal's size; the kernel sends its program SIGWINCH."""
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the program closed the terminal
            return False
        if not data:
            return False
        self.output.extend(data)
        return True

    def expect(self, pattern: bytes, timeout: float = 30.0) -> re.Match[bytes]:
        """Wait for `pattern` (a regex) in the output since the start; return its match."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output)
            if match is not None:
                return match
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(min(left, 0.2)) and self.proc.poll() is not None):
                raise AssertionError(
                    f"{pattern!r} did not appear; output so far:\n"
                    f"{bytes(self.output).decode('utf-8', 'replace')}"
                )

    def wait(self, timeout: float = 60.0) -> int:
        """The program's exit code, reading its output until it ends."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0.05) and select.select([self.master], [], [], 0)[0]:
            pass
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def attributes(self) -> list[object]:
        return termios.tcgetattr(self.master)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        os.close(self.master)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
