"""Who is calling: bearer tokens and optional mTLS for TCP listeners.

The interceptor decides the caller's client name once per call and hands it to
the servicers as the `x-sandbox-client` invocation metadata (see
`sandboxd.service.owner_of`); whatever a client sent under that key itself is
dropped, so nobody can claim another client's name. Calls over a unix socket
come from a local user the socket's 0600 mode already let in: they act as the
operator (no owner) unless they present a token too.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from sandboxd.errors import InvalidArgument
from sandboxd.service import OWNER_KEY

log = logging.getLogger(__name__)

#: Methods anyone may call: load balancers and `grpc_health_probe` carry no token.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_TOKEN = 16
_STRIPPED = (OWNER_KEY, "authorization")


@dataclass(frozen=True)
class TokenTable:
    """Known tokens, kept only as SHA-256 digests, each naming one client."""

    entries: tuple[tuple[bytes, str], ...]

    def lookup(self, token: str) -> str | None:
        """The client a token names, or None. Compares against every entry in constant time."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for known, client in self.entries:
            # No early exit: the time taken does not depend on which entry matched.
            if hmac.compare_digest(digest, known):
                found = client
        return found

    @property
    def clients(self) -> set[str]:
        return {client for _, client in self.entries}


def parse_tokens(text: str, *, source: str = "tokens") -> TokenTable:
    """Parse `TOKEN CLIENT_NAME` lines; `#` starts a comment.

    Raises:
        InvalidArgument: a malformed line, a short or repeated token, a bad client name.
    """
    entries: list[tuple[bytes, str]] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{source}:{number}"
        # Messages never echo the token itself: they end up in logs.
        if len(parts) != 2:
            raise InvalidArgument(f"{where}: expected 'TOKEN CLIENT_NAME'")
        token, client = parts
        if len(token) < MIN_TOKEN:
            raise InvalidArgument(f"{where}: token is shorter than {MIN_TOKEN} characters")
        if not CLIENT_NAME.match(client):
            raise InvalidArgument(f"{where}: {client[:40]!r} is not a usable client name")
        digest = hashlib.sha256(token.encode()).digest()
        if digest in seen:
            raise InvalidArgument(f"{where}: the same token appears twice")
        seen.add(digest)
        entries.append((digest, client))
    return TokenTable(tuple(entries))


def load_tokens(path: Path) -> TokenTable:
    """Read a tokens file, warning when others may read it.

    Raises:
        InvalidArgument: unreadable or malformed file, or no tokens in it.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise InvalidArgument(f"tokens file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("tokens file %s is readable by others (mode %o); chmod 600 it", path, mode)
    table = parse_tokens(text, source=str(path))
    if not table.entries:
        raise InvalidArgument(f"tokens file {path}: no tokens in it")
    return table


def bearer_token(metadata: Sequence[tuple[str, Any]]) -> str | None:
    """The token of an `authorization: Bearer ...` header, None when there is none."""
    for key, value in metadata:
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""  # present but unusable: refused like an unknown token
    return None


class _CallerContext:
    """A servicer context whose metadata names the authenticated client, and nothing else."""

    def __init__(self, context: grpc.ServicerContext, owner: str) -> None:
        self._context = context
        self._metadata = tuple(
            (k, v) for k, v in (context.invocation_metadata() or ()) if k not in _STRIPPED
        ) + (((OWNER_KEY, owner),) if owner else ())

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


Behavior = Callable[[Any, grpc.ServicerContext], Any]
if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]  # generic only in the type stubs
else:
    _Interceptor = grpc.ServerInterceptor


class AuthInterceptor(_Interceptor):
    """Authenticates TCP callers and tells the servicers who they are.

    `tokens` None means no bearer tokens are configured: a TCP caller is then
    named by its TLS client certificate (when `tls_names`), or left anonymous.
    """

    def __init__(self, tokens: TokenTable | None = None, *, tls_names: bool = False) -> None:
        self.tokens = tokens
        self.tls_names = tls_names

    def caller(self, context: grpc.ServicerContext) -> str:
        """The client name for this call ("" for the operator); aborts UNAUTHENTICATED."""
        metadata = tuple(context.invocation_metadata() or ())
        token = bearer_token(metadata)
        local = context.peer().startswith("unix:")
        if self.tokens is not None and (token is not None or not local):
            client = self.tokens.lookup(token) if token else None
            if client is None:
                log.info(
                    "refused %s: %s bearer token", context.peer(), "unknown" if token else "no"
                )
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or unknown bearer token (send 'authorization: Bearer TOKEN')",
                )
            return str(client)
        if self.tls_names and not local:
            # grpc gives a list of values per key (its type stub says bytes).
            names: Any = context.auth_context().get("x509_common_name")
            if not names:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate name")
            return bytes(names[0]).decode("utf-8", "replace")
        return ""

    def _wrap(self, behavior: Behavior) -> Behavior:
        # wraps: keeps the attributes of the inner behavior (the pool it runs on, lanes.py).
        @functools.wraps(behavior)
        def authenticated(request: Any, context: grpc.ServicerContext) -> Any:
            owner = self.caller(context)
            return behavior(request, _CallerContext(context, owner))  # type: ignore[arg-type]

        return authenticated

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        return rewrapped(handler, lambda _, behavior: self._wrap(behavior))


def rewrapped(
    handler: grpc.RpcMethodHandler[Any, Any], wrap: Callable[[str, Behavior], Behavior]
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with its behavior replaced by `wrap(kind, behavior)`; the kind is e.g.
    "stream_unary" (requests streamed, one response)."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attr, make in kinds:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return make(
                wrap(attr, behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS credentials for a TCP listener; with `client_ca`, clients must present a cert it signed.

    Raises:
        InvalidArgument: a file cannot be read.
    """

    def read(path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"{what} {path}: {exc.strerror}") from None

    return grpc.ssl_server_credentials(
        [(read(key, "--tls-key"), read(cert, "--tls-cert"))],
        root_certificates=read(client_ca, "--tls-client-ca") if client_ca else None,
        require_client_auth=client_ca is not None,
    )
