"""The local end of `sandboxd port-forward`: a listener on the loopback interface that opens
one forwarded stream per accepted connection, as `kubectl port-forward` does.

It knows nothing of gRPC: it is given the call that opens a stream (the client's
`port_forward`, bound to a sandbox and port).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator

from sandboxd.errors import InvalidArgument, SandboxError

log = logging.getLogger(__name__)

#: Opens one forwarded connection: bytes to send in, bytes that come back out.
OpenStream = Callable[[Iterable[bytes]], Iterator[bytes]]
CHUNK = 64 * 1024


def parse_ports(spec: str) -> tuple[int, int]:
    """`LOCAL:SANDBOX` (or one port for both) as numbers; LOCAL may be 0 (any free port).

    Raises:
        InvalidArgument: not one or two port numbers in range.
    """
    local, _, remote = spec.partition(":")
    try:
        ports = int(local), int(remote or local)
    except ValueError:
        raise InvalidArgument(
            f"ports: {spec!r} is not LOCAL_PORT:SANDBOX_PORT, e.g. 8080:80"
        ) from None
    if not 0 <= ports[0] <= 65535 or not 1 <= ports[1] <= 65535:
        raise InvalidArgument(f"ports: {spec!r} is out of range (ports are 1 to 65535)")
    return ports


class Tunnel:
    """Listens on 127.0.0.1:PORT; every accepted connection gets its own stream."""

    def __init__(self, open_stream: OpenStream, local_port: int = 0) -> None:
        """Raises: InvalidArgument: the local port cannot be bound."""
        self.open_stream = open_stream
        try:
            self._sock = socket.create_server(("127.0.0.1", local_port))
        except OSError as exc:
            raise InvalidArgument(
                f"cannot listen on 127.0.0.1:{local_port}: {exc.strerror}"
            ) from None
        self.port: int = self._sock.getsockname()[1]
        self._closed = threading.Event()

    def serve_forever(self, on_error: Callable[[str], None] = log.warning) -> None:
        """Accept until `close`; a connection's failure goes to `on_error`, not further."""
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(
                target=self._relay, args=(conn, on_error), daemon=True, name="tunnel"
            ).start()

    def start(self, on_error: Callable[[str], None] = log.warning) -> threading.Thread:
        """Serve in a background thread."""
        thread = threading.Thread(
            target=self.serve_forever, args=(on_error,), daemon=True, name="tunnel-accept"
        )
        thread.start()
        return thread

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _relay(self, conn: socket.socket, on_error: Callable[[str], None]) -> None:
        try:
            for data in self.open_stream(_received(conn)):
                conn.sendall(data)
        except SandboxError as exc:
            on_error(exc.message)
        except OSError:
            pass  # the local side went away first
        finally:
            # shutdown, not just close: the thread reading this socket for the stream
            # would keep it open, and the local side would never see the end.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


def _received(conn: socket.socket) -> Iterator[bytes]:
    """What the local side sends, until it closes (or the connection is torn down)."""
    while True:
        try:
            data = conn.recv(CHUNK)
        except OSError:
            return
        if not data:
            return
        yield data
