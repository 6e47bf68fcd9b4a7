"""Port forwarding: one TCP connection to a port inside a sandbox, relayed through an exec.

The sandbox gets no network for it. A small relay runs inside the sandbox with the image's
`python3` (the worker's interpreter), connects to the port on the loopback interface, and
its stdin and stdout are the connection's two directions. Entering the container's network
namespace from the host instead would need root on the engine's host and would find
nothing under gVisor, whose network stack lives inside its sandbox; an exec works under
runc and runsc alike, and against a remote engine.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from sandboxd.engine.base import ExecProcess
from sandboxd.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SandboxError,
)
from sandboxd.models import SandboxRecord
from sandboxd.sandboxes import SandboxManager

log = logging.getLogger(__name__)

#: The relay's exit code when nothing accepts the connection inside.
CONNECT_FAILED = 3
#: Bytes of the relay's own complaints kept for the message.
MAX_ERROR_TEXT = 2048
RELAY = r"""
import os, socket, sys, threading
port = int(sys.argv[1])
conn = None
for host in ("127.0.0.1", "::1"):
    try:
        conn = socket.create_connection((host, port))
        break
    except OSError as exc:
        error = exc.strerror or str(exc)
if conn is None:
    sys.stderr.write(error)
    sys.exit(3)
def upstream():
    try:
        while True:
            data = os.read(0, 65536)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=upstream, daemon=True).start()
out = sys.stdout.buffer
while True:
    data = conn.recv(65536)
    if not data:
        break
    out.write(data)
    out.flush()
"""


def check_port(port: int) -> int:
    """Raises: InvalidArgument: not a TCP port number."""
    if not 1 <= port <= 65535:
        raise InvalidArgument(
            f"header.port: {port} is not a TCP port (1 to 65535)", field="header.port"
        )
    return port


class Connection:
    """One forwarded connection: bytes in through `feed`, bytes out from `received`."""

    def __init__(
        self,
        record: SandboxRecord,
        port: int,
        proc: ExecProcess,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self.record = record
        self.port = port
        self.proc = proc
        self._on_close = on_close
        self._closed = False
        self._lock = threading.Lock()
        self._ended = False
        self._failure: SandboxError | None = None

    def feed(self, chunks: Iterator[bytes]) -> threading.Thread:
        """Send `chunks` in the background; their end half-closes the connection.

        A SandboxError from `chunks` (a bad frame) ends the connection and is raised by
        `received`; any other error there means the client went away.
        """
        thread = threading.Thread(target=self._send, args=(chunks,), daemon=True, name="forward-up")
        thread.start()
        return thread

    def _send(self, chunks: Iterator[bytes]) -> None:
        try:
            for data in chunks:
                if data:
                    self.proc.write_stdin(data)
            self.proc.close_stdin()
        except SandboxError as exc:
            self._failure = exc
            self.close()
        except Exception:  # the client's stream broke off, or the relay is gone
            log.debug("port-forward input ended", exc_info=True)
            self.close()

    def received(self) -> Iterator[bytes]:
        """The bytes the sandbox's side sends, until it closes the connection.

        Raises:
            FailedPrecondition: nothing accepts connections on the port, or the image has
                no python3 for the relay.
            InvalidArgument: a bad frame from the client (raised by the feeding side).
        """
        complaint = bytearray()
        for stream, data in self.proc.output():
            if stream == 1:
                yield data
            elif len(complaint) < MAX_ERROR_TEXT:
                complaint += data
        with self._lock:
            ended_here, self._ended = not self._ended, True
        if self._failure is not None:
            raise self._failure
        if ended_here:
            self._explain(complaint.decode("utf-8", "replace").strip())

    def _explain(self, complaint: str) -> None:
        """Raises: FailedPrecondition: the relay could not connect, or not start."""
        start_failure = self.proc.start_failure()
        if start_failure is not None:
            raise FailedPrecondition(
                f"port-forward needs python3 in the sandbox's image ({start_failure})"
            )
        if self.proc.exit_code() == CONNECT_FAILED:
            raise FailedPrecondition(
                f"nothing accepts connections on port {self.port} in sandbox "
                f"{self.record.id} ({complaint or 'connection refused'})"
            )

    def close(self) -> None:
        """End the connection now (the client went away); safe to call more than once."""
        with self._lock:
            running, self._ended = not self._ended, True
            first, self._closed = not self._closed, True
        if running:
            self.proc.kill()
        with contextlib.suppress(OSError):
            self.proc.close()
        if first:
            self._on_close()


class Forwarder:
    """Opens forwarded connections into the manager's sandboxes, as policy allows."""

    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self.limit = manager.config.max_port_forwards
        self._lock = threading.Lock()
        self._open = 0

    def open(self, sandbox_id: str, port: int, owner: str = "") -> Connection:
        """Connect to `port` inside the sandbox (the relay starts; the connection is made
        by it, and a refusal is reported by `Connection.received`).

        Raises:
            InvalidArgument: the port is out of range.
            NotFound: unknown sandbox.
            PermissionDenied: another client's sandbox, or a profile without port-forward.
            FailedPrecondition: the sandbox is no longer running.
            ResourceExhausted: the server's forwarded connections are all in use.
        """
        check_port(port)
        record = self.manager.get(sandbox_id, owner)
        profile = record.profile
        if not profile.allow_port_forward:
            raise PermissionDenied(
                f"profile {profile.name!r} does not allow port-forward (the server's config can "
                "allow it: allow_port_forward in its [[profiles]] table)"
            )
        self._take()
        try:
            proc = self.manager.engine.exec(
                record.container_id,
                # -I -S: no site packages or user environment to import; it starts sooner.
                ["python3", "-I", "-S", "-c", RELAY, str(port)],
                env={},
                workdir=record.workdir,
                user=record.user,
                stdin=True,
            )
        except BaseException as exc:
            self._release()
            if isinstance(exc, NotFound):  # (a stopped container: the engine's 409)
                raise FailedPrecondition(f"sandbox {record.id} is no longer running") from None
            raise
        log.info("port-forward to %s:%d", record.id, port)
        return Connection(record, port, proc, on_close=self._release)

    def _take(self) -> None:
        """Raises: ResourceExhausted: `limit` connections are open."""
        with self._lock:
            if self._open >= self.limit:
                raise ResourceExhausted(
                    f"this server forwards at most {self.limit} connections at once; close one "
                    "(the server's config sets max_port_forwards)",
                    retry_after=1.0,
                )
            self._open += 1

    def _release(self) -> None:
        with self._lock:
            self._open -= 1
