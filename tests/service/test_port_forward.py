"""PortForward through a real server and engine: TCP connections to a server inside a sandbox
that has no network, one gRPC stream each, as `sandboxd port-forward` opens them."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.api import Sandbox, SandboxRequest
from sandboxd.client import SandboxClient
from sandboxd.config import UNTRUSTED_PROFILE, Profile, ServerConfig
from sandboxd.limits import Limits
from sandboxd.server import create_server
from sandboxd.tunnels import Tunnel

PORT = 8000
PAGE = b"<h1>served from inside the sandbox</h1>\n"
OTHER = b"another file\n"
HTTP_SERVER = ("python3", "-m", "http.server", str(PORT), "--bind", "127.0.0.1")


def http_box(client: SandboxClient, limits: Limits, **spec: object) -> Iterator[Sandbox]:
    """A sandbox without network whose preloaded command is an HTTP server on PORT."""
    box = client.create_sandbox(
        SandboxRequest(limits=limits, preload_argv=HTTP_SERVER, **spec)  # type: ignore[arg-type]
    )
    try:
        assert not box.limits.network
        client.put_files(box.id, "", {"index.html": PAGE, "other.txt": OTHER})
        wait_until_listening(client, box.id)
        yield box
    finally:
        client.destroy_sandbox(box.id)


def wait_until_listening(client: SandboxClient, sandbox_id: str, timeout: float = 30.0) -> None:
    """The server may still be starting: a refused connection is asked again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            list(client.port_forward(sandbox_id, PORT, []))
            return
        except errors.FailedPrecondition:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def get(port: int, path: str = "/index.html") -> bytes:
    """An HTTP/1.0 GET over a plain socket to 127.0.0.1:port; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(65536):
        out += data
    return bytes(out)


@pytest.fixture
def box(client: SandboxClient, limits_factory: Callable[..., Limits]) -> Iterator[Sandbox]:
    yield from http_box(client, limits_factory(pids=32))


@pytest.fixture
def tunnel(client: SandboxClient, box: Sandbox) -> Iterator[Tunnel]:
    t = Tunnel(lambda upstream: client.port_forward(box.id, PORT, upstream))
    t.start()
    try:
        yield t
    finally:
        t.close()


def test_an_http_get_through_the_local_port_gets_the_page(
    client: SandboxClient, box: Sandbox, tunnel: Tunnel
) -> None:
    answer = get(tunnel.port)
    assert answer.startswith(b"HTTP/1.0 200"), answer[:200]
    assert answer.endswith(PAGE)


def test_the_sandbox_has_no_interface_but_loopback(client: SandboxClient, box: Sandbox) -> None:
    out = bytearray()
    client.exec(box.id, ["ls", "/sys/class/net"], on_output=lambda _, d: out.extend(d))
    assert out.split() == [b"lo"]


def test_two_connections_at_once_each_get_their_own_answer(tunnel: Tunnel) -> None:
    first = socket.create_connection(("127.0.0.1", tunnel.port), timeout=30)
    try:
        first.sendall(b"GET /index.html HTTP/1.0\r\n")  # not finished: the server waits
        second = get(tunnel.port, "/other.txt")  # while the first is open
        assert second.startswith(b"HTTP/1.0 200") and second.endswith(OTHER)
        first.sendall(b"\r\n")
        answer = read_all(first)
    finally:
        first.close()
    assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(PAGE)


def test_bytes_go_both_ways_unchanged(client: SandboxClient, box: Sandbox) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, every byte value
    client.put_files(box.id, "", {"blob.bin": body})
    request = [b"GET /blob.bin HTTP/1.0\r\n", b"\r\n"]
    answer = b"".join(client.port_forward(box.id, PORT, request))
    assert answer.endswith(body)


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_a_port_out_of_range_is_invalid(client: SandboxClient, box: Sandbox, port: int) -> None:
    with pytest.raises(errors.InvalidArgument, match=rf"header.port: {port} is not a TCP port"):
        list(client.port_forward(box.id, port, []))


def test_a_port_nothing_listens_on_is_a_clear_failure(client: SandboxClient, box: Sandbox) -> None:
    with pytest.raises(errors.FailedPrecondition, match="nothing accepts connections on port 9"):
        list(client.port_forward(box.id, 9, [b"hello"]))


def test_an_unknown_sandbox_is_not_found(client: SandboxClient) -> None:
    with pytest.raises(errors.NotFound):
        list(client.port_forward("no-such-sandbox", PORT, []))


def test_refused_for_the_untrusted_profile(
    client: SandboxClient, limits_factory: Callable[..., Limits]
) -> None:
    box = client.create_sandbox(SandboxRequest(profile="untrusted", limits=limits_factory()))
    try:
        with pytest.raises(
            errors.PermissionDenied, match="'untrusted' does not allow port-forward"
        ):
            list(client.port_forward(box.id, PORT, []))
    finally:
        client.destroy_sandbox(box.id)


OwnService = Callable[..., contextlib.AbstractContextManager[tuple[SandboxClient, Sandbox]]]


@pytest.fixture
def own_service(
    config_factory: Callable[..., ServerConfig],
    limits_factory: Callable[..., Limits],
    short_tmp: Path,
) -> OwnService:
    """`own_service(NAME, **config)`: a service of its own and an HTTP box on it."""

    @contextlib.contextmanager
    def start(name: str, **config: object) -> Iterator[tuple[SandboxClient, Sandbox]]:
        service, address = create_server(config_factory(**config), f"unix:{short_tmp}/{name}")
        try:
            with SandboxClient(address, retry_seconds=2.0) as client:
                for box in http_box(client, limits_factory(pids=32)):
                    yield client, box
        finally:
            service.stop(grace=1.0)

    return start


def the_page(client: SandboxClient, sandbox_id: str) -> bytes:
    request = [b"GET /index.html HTTP/1.0\r\n\r\n"]
    answer = b"".join(client.port_forward(sandbox_id, PORT, request))
    assert answer.startswith(b"HTTP/1.0 200"), answer[:100]
    return answer[-len(PAGE) :]


def test_allowed_for_untrusted_when_the_config_says_so_under_gvisor(
    own_service: OwnService,
) -> None:
    allowing = Profile(**{**UNTRUSTED_PROFILE.__dict__, "allow_port_forward": True})
    config = {"profiles": (allowing,), "default_profile": "untrusted"}
    with own_service("forward.sock", **config) as (client, box):
        assert box.runtime == "runsc"
        assert the_page(client, box.id) == PAGE


def test_the_cli_forwards_a_local_port(client: SandboxClient, box: Sandbox) -> None:
    command = [sys.executable, "-m", "sandboxd.cli", "port-forward", box.id, f"0:{PORT}"]
    proc = subprocess.Popen(
        [*command, "--address", client.address], stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.match(rf"Forwarding from 127.0.0.1:(\d+) -> {box.id}:{PORT}", line)
        assert match, line
        answer = get(int(match.group(1)))
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(PAGE)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_cli_refuses_bad_ports_before_connecting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sandboxd.cli", "port-forward", "x", "80:99999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "out of range" in result.stderr


def test_on_podman_too(own_service: OwnService) -> None:
    with own_service("forward-podman.sock", engine="podman") as (client, box):
        assert the_page(client, box.id) == PAGE


def test_frames_out_of_order_are_invalid(client: SandboxClient, box: Sandbox) -> None:
    header = pb.PortForwardFrame(header=pb.PortForwardHeader(sandbox_id=box.id, port=PORT))
    data = pb.PortForwardFrame(data=b"GET / HTTP/1.0\r\n")
    for frames, why in [
        ([data], "the first message must be the header"),
        ([header, data, header], "only the first message may be a header"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            list(client.sandboxes.PortForward(iter(frames), timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert why in str(info.value.details())


BANNER_SERVER = (
    "import socket; s = socket.create_server(('127.0.0.1', 9000)); c, _ = s.accept(); "
    "c.sendall(b'hello'); c.recv(1)"
)


def test_the_server_caps_connections_open_at_once(own_service: OwnService) -> None:
    release = threading.Event()

    def held() -> Iterator[bytes]:
        release.wait(60)
        yield b"x"  # the banner server's cue to close

    try:
        with own_service("forward-cap.sock", max_port_forwards=1) as (client, box):
            started = client.exec(
                box.id, ["sh", "-c", f'python3 -c "{BANNER_SERVER}" >/dev/null 2>&1 &']
            )
            assert started.verdict == "ok"
            first = client.port_forward(box.id, 9000, held())
            # The banner arrived: the first connection is open and holds the one slot.
            assert next(first) == b"hello"
            with pytest.raises(errors.ResourceExhausted, match="at most 1 connections"):
                list(client.port_forward(box.id, PORT, []))
            release.set()
            assert list(first) == []  # it ends, and gives its slot back
            assert the_page(client, box.id) == PAGE
    finally:
        release.set()
