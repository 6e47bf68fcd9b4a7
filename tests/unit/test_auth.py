"""The auth interceptor against a real gRPC server on 127.0.0.1:0 and on a unix socket."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sandboxd.auth import AuthInterceptor, TokenTable, bearer_token, load_tokens, parse_tokens
from sandboxd.config import ServerConfig
from sandboxd.errors import InvalidArgument
from sandboxd.server import Service
from sandboxd.service import OWNER_KEY, owner_of

ALICE = "a" * 32
BOB = "b" * 32
WHO = "/test.Echo/Who"
WHO_STREAM = "/test.Echo/WhoStream"


def _who(request: bytes, context: grpc.ServicerContext) -> bytes:
    seen = [k for k, _ in context.invocation_metadata()]
    return f"{owner_of(context)}|{','.join(sorted(seen))}".encode()


def _who_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield owner_of(context).encode()


def _echo_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Who": grpc.unary_unary_rpc_method_handler(_who),
            "WhoStream": grpc.unary_stream_rpc_method_handler(_who_stream),
        },
    )


@pytest.fixture
def tokens() -> TokenTable:
    return parse_tokens(f"# clients\n{ALICE} alice\n\n{BOB}   bob  # the second one\n")


def _serve(
    interceptor: AuthInterceptor, address: str, creds: Any = None
) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[interceptor])
    server.add_generic_rpc_handlers((_echo_handler(),))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if creds is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, creds)
    server.start()
    return server, address if address.startswith("unix:") else f"127.0.0.1:{port}"


@pytest.fixture
def tcp(tokens: TokenTable) -> Iterator[str]:
    server, address = _serve(AuthInterceptor(tokens), "127.0.0.1:0")
    yield address
    server.stop(None)


def _call(address: str, metadata: tuple[tuple[str, str], ...] = (), **kw: Any) -> str:
    with grpc.insecure_channel(address, **kw) as channel:
        who = channel.unary_unary(WHO)
        return bytes(who(b"", metadata=metadata, timeout=5)).decode()


def _code(fn: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()  # type: ignore[no-any-return]


# -- the tokens file ----------------------------------------------------------------


def test_tokens_file_names_clients(tokens: TokenTable) -> None:
    assert tokens.clients == {"alice", "bob"}
    assert tokens.lookup(ALICE) == "alice"
    assert tokens.lookup(BOB) == "bob"
    assert tokens.lookup(ALICE[:-1]) is None
    assert tokens.lookup("") is None


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (f"{ALICE}\n", "expected 'TOKEN CLIENT_NAME'"),
        (f"{ALICE} alice extra\n", "expected 'TOKEN CLIENT_NAME'"),
        ("short alice\n", "shorter than 16"),
        (f"{ALICE} alice\n{ALICE} bob\n", "appears twice"),
        (f"{ALICE} ../etc\n", "not a usable client name"),
    ],
)
def test_malformed_tokens_are_refused_without_echoing_them(text: str, complaint: str) -> None:
    with pytest.raises(InvalidArgument, match=complaint) as info:
        parse_tokens(text, source="t")
    assert ALICE not in info.value.message


def test_load_tokens_reads_a_file_and_refuses_an_empty_one(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE} alice\n")
    path.chmod(0o600)
    assert load_tokens(path).lookup(ALICE) == "alice"
    path.write_text("# nobody yet\n")
    with pytest.raises(InvalidArgument, match="no tokens"):
        load_tokens(path)
    with pytest.raises(InvalidArgument, match="tokens file"):
        load_tokens(tmp_path / "missing")


def test_bearer_token_parsing() -> None:
    assert bearer_token((("authorization", f"Bearer {ALICE}"),)) == ALICE
    assert bearer_token((("authorization", f"bearer  {ALICE} "),)) == ALICE
    assert bearer_token((("authorization", f"Basic {ALICE}"),)) == ""
    assert bearer_token((("other", "x"),)) is None


# -- over TCP -----------------------------------------------------------------------


def test_tcp_call_without_token_is_unauthenticated(tcp: str) -> None:
    assert _code(lambda: _call(tcp)) == grpc.StatusCode.UNAUTHENTICATED


def test_tcp_call_with_unknown_token_is_unauthenticated(tcp: str) -> None:
    bad = (("authorization", f"Bearer {'c' * 32}"),)
    assert _code(lambda: _call(tcp, bad)) == grpc.StatusCode.UNAUTHENTICATED
    basic = (("authorization", f"Basic {ALICE}"),)
    assert _code(lambda: _call(tcp, basic)) == grpc.StatusCode.UNAUTHENTICATED


def test_tcp_streaming_call_without_token_is_unauthenticated(tcp: str) -> None:
    def stream() -> None:
        with grpc.insecure_channel(tcp) as channel:
            list(channel.unary_stream(WHO_STREAM)(b"", timeout=5))

    assert _code(stream) == grpc.StatusCode.UNAUTHENTICATED


def test_token_names_the_owner_and_servicers_never_see_the_token(tcp: str) -> None:
    owner, keys = _call(tcp, (("authorization", f"Bearer {ALICE}"),)).split("|")
    assert owner == "alice"
    assert "authorization" not in keys.split(",")
    with grpc.insecure_channel(tcp) as channel:
        got = list(
            channel.unary_stream(WHO_STREAM)(
                b"", metadata=(("authorization", f"Bearer {BOB}"),), timeout=5
            )
        )
    assert got == [b"bob"]


def test_a_client_cannot_claim_another_name(tcp: str) -> None:
    metadata = (("authorization", f"Bearer {ALICE}"), (OWNER_KEY, "bob"))
    assert _call(tcp, metadata).split("|")[0] == "alice"


def test_without_tokens_a_sent_owner_header_is_dropped() -> None:
    server, address = _serve(AuthInterceptor(None), "127.0.0.1:0")
    try:
        owner, keys = _call(address, ((OWNER_KEY, "bob"),)).split("|")
        assert owner == ""
        assert OWNER_KEY not in keys.split(",")
    finally:
        server.stop(None)


def test_health_checks_stay_open(tcp: str) -> None:
    with grpc.insecure_channel(tcp) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


# -- over a unix socket -------------------------------------------------------------


def test_unix_callers_are_the_operator_unless_they_send_a_token(
    tokens: TokenTable, tmp_path: Path
) -> None:
    server, address = _serve(AuthInterceptor(tokens), f"unix:{tmp_path}/s.sock")
    try:
        assert _call(address).split("|")[0] == ""
        assert _call(address, ((OWNER_KEY, "bob"),)).split("|")[0] == ""
        assert _call(address, (("authorization", f"Bearer {BOB}"),)).split("|")[0] == "bob"
        bad = (("authorization", f"Bearer {'c' * 32}"),)
        assert _code(lambda: _call(address, bad)) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None)


class _NoEngine:
    """Service construction and listening never reach the engine."""


def test_service_unix_socket_is_owner_only(tmp_path: Path) -> None:
    service = Service(ServerConfig(state_dir=tmp_path), engine=_NoEngine())  # type: ignore[arg-type]
    try:
        address = service.listen(f"unix:{tmp_path}/run/sandboxd.sock")
        mode = stat.S_IMODE(os.stat(address.removeprefix("unix:")).st_mode)
        assert mode & 0o077 == 0, oct(mode)
    finally:
        service.server.stop(None)


def test_service_refuses_unauthenticated_non_loopback_tcp(tmp_path: Path) -> None:
    service = Service(ServerConfig(state_dir=tmp_path), engine=_NoEngine())  # type: ignore[arg-type]
    try:
        with pytest.raises(InvalidArgument, match="without authentication"):
            service.listen("0.0.0.0:0")
        assert service.listen("127.0.0.1:0").startswith("127.0.0.1:")
    finally:
        service.server.stop(None)


# -- mTLS ---------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    for name in ("localhost", "carol", "mallory"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / "ext").write_text("subjectAltName=DNS:localhost\n")
        signer = ("-CA", "ca.pem", "-CAkey", "ca.key") if name != "mallory" else (
            "-signkey", "mallory.key")  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", *signer, "-CAcreateserial", "-days", "2",
                 "-extfile", "ext", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return d


def test_mtls_names_the_client_by_its_certificate(pki: Path) -> None:
    from sandboxd.auth import server_credentials

    creds = server_credentials(pki / "localhost.pem", pki / "localhost.key", pki / "ca.pem")
    server, address = _serve(AuthInterceptor(None, tls_names=True), "127.0.0.1:0", creds)
    options = (("grpc.ssl_target_name_override", "localhost"),)

    def call(name: str | None) -> str:
        kw: dict[str, bytes] = {"root_certificates": (pki / "ca.pem").read_bytes()}
        if name:
            kw["private_key"] = (pki / f"{name}.key").read_bytes()
            kw["certificate_chain"] = (pki / f"{name}.pem").read_bytes()
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(**kw), options)
        with channel:
            return bytes(channel.unary_unary(WHO)(b"", timeout=5)).decode().split("|")[0]

    try:
        assert call("carol") == "carol"
        assert _code(lambda: call(None)) == grpc.StatusCode.UNAVAILABLE
        assert _code(lambda: call("mallory")) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)
