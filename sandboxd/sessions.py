"""Interactive execs: stdin, terminal resizes and signals streamed while a command runs.

The command itself runs as any exec does (`Executor.run_record`: same limits, deadline,
output cap and verdict); a session only adds a thread that hands the client's inputs to
it as they arrive.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

from sandboxd import processes
from sandboxd.api import (
    CloseStdin,
    ExecInput,
    ExecOutcome,
    ExecStart,
    Output,
    Resize,
    Signal,
    Stdin,
    WindowSize,
)
from sandboxd.errors import FailedPrecondition, InvalidArgument, SandboxError
from sandboxd.execs import Executor, check_exec

log = logging.getLogger(__name__)

#: How long the service waits, after sending the result, for the client to close its side
#: (inputs that arrive in that time after the command ended are reported, not dropped).
CLOSE_WAIT_SECONDS = 5.0
MAX_WINDOW = 10_000


def check_start(start: ExecStart) -> None:
    """Raises: InvalidArgument: a TTY without a usable size, or an attach to a preload."""
    if start.request.attach_preload:
        raise InvalidArgument(
            "start.request.attach_preload: not available in ExecStream; use Exec to attach"
        )
    if start.tty and start.window is None:
        raise InvalidArgument(
            "start.window: a TTY needs the terminal's size (rows and columns)",
            field="start.window",
        )
    if start.window is not None:
        check_window(start.window, "start.window")


def check_window(window: WindowSize, field: str) -> None:
    """Raises: InvalidArgument: rows or columns outside 1..MAX_WINDOW."""
    for value in (window.rows, window.columns):
        if not 1 <= value <= MAX_WINDOW:
            raise InvalidArgument(
                f"{field}: rows and columns must be between 1 and {MAX_WINDOW}, "
                f"got {window.rows} x {window.columns}"
            )


def signal_number(name: str) -> int:
    """The number of a signal named "INT", "SIGINT", "term", ...

    Raises:
        InvalidArgument: not a signal name.
    """
    wanted = name.strip().upper()
    wanted = wanted if wanted.startswith("SIG") else f"SIG{wanted}"
    member = signal.Signals.__members__.get(wanted)
    if member is None or wanted.startswith("SIG_"):
        raise InvalidArgument(
            f"signal: unknown signal name {name!r}; use a name such as INT, TERM, HUP or KILL"
        )
    return int(member)


class Session:
    """One interactive exec's inputs, fed to the running command from their own thread.

    An input that is wrong while the command runs kills it (`stop` is set) and becomes the
    call's error; one that arrives after the command ended is reported after the result.
    """

    def __init__(
        self,
        start: ExecStart,
        inputs: Iterator[ExecInput],
        stop: threading.Event,
    ) -> None:
        self.start = start
        self.inputs = inputs
        self.stop = stop
        self.error: SandboxError | None = None
        self._pump: threading.Thread | None = None
        self._handlers: dict[type, Callable[[processes.Started, object], None]] = {
            Stdin: self._on_stdin,
            Resize: self._on_resize,
            Signal: self._on_signal,
            CloseStdin: self._on_close_stdin,
        }

    def attach(self, run: processes.Started) -> None:
        """Start feeding `run` (the command has just started)."""
        self._pump = threading.Thread(
            target=self._feed, args=(run,), daemon=True, name="exec-input"
        )
        self._pump.start()

    def finish(self, ended: bool) -> None:
        """After the command's stream: raise what went wrong with the inputs, if anything.

        Raises:
            SandboxError: an input was refused.
        """
        if ended and self._pump is not None:
            self._pump.join(CLOSE_WAIT_SECONDS)
        if self.error is not None:
            raise self.error

    def _feed(self, run: processes.Started) -> None:
        try:
            if self.start.request.stdin:
                run.proc.write_stdin(self.start.request.stdin)
            for item in self.inputs:
                if run.ended():
                    raise FailedPrecondition(
                        f"{_field(item)}: the command has already ended; close the input "
                        "stream when the result arrives"
                    )
                self._handlers[type(item)](run, item)
        except SandboxError as exc:
            self.error = exc
            if not run.ended():
                self.stop.set()
        except OSError:
            pass  # the command ended while we wrote to it: its result says how
        except Exception:  # the call ended under us (client gone): nothing to feed
            log.debug("interactive exec input ended", exc_info=True)

    def _on_stdin(self, run: processes.Started, item: object) -> None:
        assert isinstance(item, Stdin)
        run.proc.write_stdin(item.data)

    def _on_resize(self, run: processes.Started, item: object) -> None:
        assert isinstance(item, Resize)
        if not self.start.tty:
            raise InvalidArgument("resize: the command has no TTY to resize")
        check_window(item.window, "resize")
        run.proc.resize(item.window.rows, item.window.columns)

    def _on_signal(self, run: processes.Started, item: object) -> None:
        assert isinstance(item, Signal)
        run.proc.signal(signal_number(item.name))

    def _on_close_stdin(self, run: processes.Started, item: object) -> None:
        run.proc.close_stdin()


def _field(item: ExecInput) -> str:
    return {Stdin: "stdin", Resize: "resize", Signal: "signal"}.get(type(item), "close_stdin")


def run_session(
    executor: Executor,
    start: ExecStart,
    inputs: Iterator[ExecInput],
    owner: str,
    stop: threading.Event,
) -> Iterator[Output | ExecOutcome]:
    """Yield the command's output and then its outcome, as `Executor.run` does, while the
    inputs reach it. Setting `stop` (the client went away) kills the command.

    Raises:
        InvalidArgument, FailedPrecondition, NotFound, PermissionDenied, EngineUnavailable.
    """
    check_start(start)
    record = executor.manager.get(start.sandbox_id, owner)
    timeout, output_limit = check_exec(start.request, record)
    window = (start.window.rows, start.window.columns) if start.window else None
    request = replace(start.request, stdin=b"", stream_stdin=True, tty=start.tty, window=window)
    session = Session(start, inputs, stop)
    ended = False
    for item in executor.run_record(
        record, request, timeout, output_limit, stop, on_start=session.attach
    ):
        ended = ended or isinstance(item, ExecOutcome)
        yield item
    session.finish(ended)
