"""ExecStream, the interactive exec: stdin while the command runs, a TTY, resizes, signals."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.api import ExecResult, Sandbox, SandboxRequest
from sandboxd.client import ExecSession, SandboxClient
from sandboxd.server import create_server
from tests.conftest import make_config, small_limits, wait_for


class Reader:
    """Reads a session's events on a thread, so a test can write while output arrives."""

    def __init__(self, session: ExecSession) -> None:
        self.session = session
        self.output = bytearray()
        self.result: ExecResult | None = None
        self.error: errors.SandboxError | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self.session.events():
                if isinstance(event, ExecResult):
                    self.result = event
                else:
                    self.output.extend(event.data)
        except errors.SandboxError as exc:
            self.error = exc

    def expect(self, text: bytes, timeout: float = 15.0) -> None:
        assert wait_for(lambda: text in self.output, timeout), (
            f"{text!r} never came; output so far: {bytes(self.output)!r}"
        )

    def finish(self, timeout: float = 30.0) -> ExecResult:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"no result; output: {bytes(self.output)!r}"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def test_stdin_streams_while_the_command_runs(client: SandboxClient, sandbox: Sandbox) -> None:
    session = client.exec_session(sandbox.id, ["sh", "-c", "while read l; do echo got:$l; done"])
    reader = Reader(session)
    session.write(b"one\n")
    reader.expect(b"got:one")  # answered before the next line is even sent
    session.write(b"two\n")
    reader.expect(b"got:two")
    session.close_stdin()
    result = reader.finish()
    assert (result.exit_code, result.verdict) == (0, "ok")
    assert bytes(reader.output) == b"got:one\ngot:two\n"


def test_tty_echoes_sees_its_size_and_resizes(client: SandboxClient, sandbox: Sandbox) -> None:
    session = client.exec_session(sandbox.id, ["/bin/sh"], tty=True, window=(24, 80))
    reader = Reader(session)
    session.write(b"tty; stty size\n")
    reader.expect(b"24 80")
    assert b"/dev/pts/" in reader.output  # the shell's stdin is a terminal
    session.resize(40, 120)
    session.write(b"stty size\n")
    reader.expect(b"40 120")
    session.write(b"echo ok-$((6*7)); exit 3\n")
    result = reader.finish()
    assert b"ok-42" in reader.output
    assert (result.exit_code, result.verdict) == (3, "nonzero_exit")


def test_ctrl_c_interrupts_the_foreground_command(client: SandboxClient, sandbox: Sandbox) -> None:
    session = client.exec_session(
        sandbox.id, ["sh", "-c", "echo ready; sleep 30"], tty=True, window=(24, 80)
    )
    reader = Reader(session)
    reader.expect(b"ready")
    session.write(b"\x03")
    result = reader.finish()
    assert result.exit_code == 130, result  # 128 + SIGINT: the terminal sent it
    assert result.wall_seconds < 30


def test_a_signal_reaches_the_command(client: SandboxClient, sandbox: Sandbox) -> None:
    script = "trap 'echo caught TERM; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
    session = client.exec_session(sandbox.id, ["sh", "-c", script])
    reader = Reader(session)
    reader.expect(b"ready")
    session.signal("TERM")
    result = reader.finish()
    assert b"caught TERM" in reader.output
    assert result.exit_code == 7


def test_the_deadline_still_applies(client: SandboxClient, sandbox: Sandbox) -> None:
    session = client.exec_session(sandbox.id, ["sleep", "30"], tty=True, window=(24, 80), timeout=1)
    result = Reader(session).finish()
    assert result.verdict == "timed_out"


def test_a_tty_without_a_size_is_refused(client: SandboxClient, sandbox: Sandbox) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"start\.window: a TTY needs"):
        list(client.exec_session(sandbox.id, ["sh"], tty=True).events())


def test_a_resize_without_a_tty_is_refused(client: SandboxClient, sandbox: Sandbox) -> None:
    session = client.exec_session(sandbox.id, ["sleep", "30"])
    session.resize(30, 100)
    with pytest.raises(errors.InvalidArgument, match="resize: the command has no TTY"):
        list(session.events())


def test_an_unknown_signal_is_refused(client: SandboxClient, sandbox: Sandbox) -> None:
    session = client.exec_session(sandbox.id, ["sleep", "30"])
    session.signal("NOPE")
    with pytest.raises(errors.InvalidArgument, match="signal: unknown signal name 'NOPE'"):
        list(session.events())


def test_stdin_after_the_command_ended_is_refused(client: SandboxClient, sandbox: Sandbox) -> None:
    """A client that keeps writing after the result gets FAILED_PRECONDITION, not silence."""
    got_result = threading.Event()

    def requests() -> Iterator[pb.ExecInput]:
        yield pb.ExecInput(
            start=pb.ExecStart(request=pb.ExecRequest(sandbox_id=sandbox.id, argv=["true"]))
        )
        got_result.wait(30)
        yield pb.ExecInput(stdin=b"too late\n")

    events = []
    with pytest.raises(grpc.RpcError) as info:
        for event in client.sandboxes.ExecStream(requests(), timeout=60):
            events.append(event)
            if event.HasField("result"):
                got_result.set()
    assert [e.result.exit_code for e in events if e.HasField("result")] == [0]
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stdin: the command has already ended" in (info.value.details() or "")


def test_the_first_message_must_start_the_command(client: SandboxClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(client.sandboxes.ExecStream(iter([pb.ExecInput(stdin=b"x")]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start: the first message must start the command" in (info.value.details() or "")


@pytest.fixture(scope="module")
def podman_client(base_image: str, short_tmp: Path) -> Iterator[SandboxClient]:
    """A client of a service whose sandboxes run under Podman (its Docker-compatible API)."""
    svc, bound = create_server(make_config(engine="podman"), f"unix:{short_tmp}/podman-tty.sock")
    client = SandboxClient(bound, retry_seconds=5.0)
    try:
        client.wait_ready(timeout=20.0)
        yield client
    finally:
        client.close()
        svc.stop(grace=2.0)


def test_podman_tty_size_stdin_and_signals(podman_client: SandboxClient) -> None:
    with podman_client.sandbox(SandboxRequest(limits=small_limits())) as box:
        session = podman_client.exec_session(box.id, ["/bin/sh"], tty=True, window=(33, 91))
        reader = Reader(session)
        session.write(b"stty size\n")
        reader.expect(b"33 91")
        session.resize(20, 70)
        session.write(b"stty size; exit 4\n")
        reader.expect(b"20 70")
        assert reader.finish().exit_code == 4
        script = "trap 'echo caught HUP; exit 9' HUP; echo ready; while :; do sleep 0.1; done"
        session = podman_client.exec_session(box.id, ["sh", "-c", script])
        reader = Reader(session)
        reader.expect(b"ready")
        session.signal("SIGHUP")
        assert reader.finish().exit_code == 9
        assert b"caught HUP" in reader.output
