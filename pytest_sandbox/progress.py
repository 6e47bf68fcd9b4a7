"""What the terminal shows of image builds: a live line while one runs, and one report
per failed build.

A fragment's apt-get can take a while; without a line the session looks hung after
"collected N items". A failed build is one fact about one spec, so it is told once in
the summary, and each of its tests fails with a short line pointing there.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

# CSI sequences (colours, cursor moves), OSC sequences (titles, links), other two-byte
# escapes, and carriage returns, as a build tool writes them for a terminal.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]|\r")
_STEP = re.compile(r"^\s*step\s+(\d+)\s*/\s*(\d+)\s*:?\s*(.*)$", re.IGNORECASE)
SECTION = "sandbox image build failed"
TAIL_LINES = 20


def plain(text: str) -> str:
    """`text` without terminal escape codes."""
    return _ESCAPES.sub("", text)


def describe(build_key: tuple[str, str]) -> str:
    """A person's name for the image of (base image, fragment)."""
    image, fragment = build_key
    base = image or "the service's base image"
    lines = [line.strip() for line in fragment.splitlines() if line.strip()]
    if not lines:
        return base
    first = lines[0] if len(lines[0]) <= 60 else lines[0][:57] + "..."
    more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
    return f"{base} + {first}{more}"


@dataclass
class BuildFailures:
    """Failed builds by build key, in the order they failed; shared by the pool threads."""

    _by_key: dict[tuple[str, str], str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, build_key: tuple[str, str], message: str) -> None:
        with self._lock:
            self._by_key.setdefault(build_key, plain(message))

    def test_message(self, build_key: tuple[str, str]) -> str:
        """The short line each test of a failed build fails with."""
        return (
            f"sandbox image build failed for {describe(build_key)}; "
            f"its log is in the '{SECTION}' section of the summary"
        )

    def report(self, terminal: pytest.TerminalReporter) -> None:
        with self._lock:
            failures = list(self._by_key.items())
        if failures:
            terminal.section(SECTION, sep="=", red=True, bold=True)
        for key, message in failures:
            terminal.section(describe(key), sep="-", red=True)
            lines = message.splitlines()
            if len(lines) > TAIL_LINES:
                lines = ["...", *lines[-TAIL_LINES:]]
            for line in lines:
                terminal.line(line)


class BuildLine:
    """The live line of the builds under way: on a terminal one line rewritten in place
    (elapsed time ticking), elsewhere a line per build step so a CI log shows progress."""

    def __init__(self, terminal: pytest.TerminalReporter | None) -> None:
        self._terminal = terminal
        self._tty = terminal is not None and terminal.isatty()
        self._lock = threading.Lock()
        self._text = ""
        self._started = 0.0
        self._shown = False
        self._ticker: threading.Thread | None = None
        self._done = threading.Event()

    def watcher(self, build_key: tuple[str, str], image: int, images: int) -> Callable[[str], None]:
        """The on_log callback for one image of a spec's chain."""
        what = f"building sandbox image {image}/{images} for {describe(build_key)}"

        def on_log(line: str) -> None:
            match = _STEP.match(plain(line))
            if match is not None:
                number, total, command = match.groups()
                self._show(what, f"step {number}/{total} {command.strip()[:50]}")

        return on_log

    def _show(self, what: str, step: str) -> None:
        if self._terminal is None:
            return
        with self._lock:
            if not self._text.startswith(what + ":"):
                self._started = time.monotonic()  # elapsed counts per image
            if self._tty and self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, daemon=True)
                self._ticker.start()
            self._text = f"{what}: {step}"
            self._write()

    def _write(self) -> None:
        assert self._terminal is not None
        line = f"{self._text} ({time.monotonic() - self._started:.0f}s)"
        if self._tty:
            width = self._terminal._tw.fullwidth - 1
            self._terminal.rewrite(line[:width], erase=True, yellow=True)
        else:
            if not self._shown:
                self._terminal.line("")
            self._terminal.line(line)
        self._shown = True

    def _tick(self) -> None:
        while not self._done.wait(1.0):
            with self._lock:
                self._write()

    def finish(self) -> None:
        """Clear the line (or end it) before anything else is written."""
        self._done.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if self._terminal is not None and self._shown and self._tty:
                self._terminal.rewrite("", erase=True)
            self._shown = False
            self._text = ""
