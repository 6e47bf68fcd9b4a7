"""The client side of the wire: addresses, TLS credentials, retry pacing, and gRPC
status codes (with their google.rpc details) mapped back to the project's error kinds."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tenacity import wait_exponential_jitter

from sandboxd import errors


def backoff() -> wait_exponential_jitter:
    """0.1 s doubling to 2 s; tenacity 9 renamed `initial` (now deprecated) to `multiplier`."""
    params = inspect.signature(wait_exponential_jitter).parameters
    first = "multiplier" if "multiplier" in params else "initial"
    return wait_exponential_jitter(max=2.0, **{first: 0.1})


def channel_target(address: str) -> str:
    """Turn `HOST:PORT` or `unix:PATH` into a gRPC target (gRPC takes both as is)."""
    if address.startswith("/"):
        return f"unix:{address}"
    return address


def from_rpc_error(exc: grpc.RpcError) -> errors.SandboxError:
    """Map a gRPC status back to the project's error kinds."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    if name == "UNAVAILABLE" and not details:
        details = "sandboxd is not reachable"
    if name == "DEADLINE_EXCEEDED" and (not details or "Deadline Exceeded" in details):
        # grpc's own words for the caller's deadline; the service's own say which one.
        details = f"the call's deadline passed before sandboxd finished it ({details or name})"
    kind = errors.BY_CODE.get(name, errors.SandboxError)
    violations, retry_after = _details(exc)
    err = kind(details or name, retry_after=retry_after or _retry_after(exc))
    err.code = name
    if violations:
        err.violations = violations
        if isinstance(err, errors.InvalidArgument):
            err.field = violations[0].field
    return err


def _details(exc: grpc.RpcError) -> tuple[tuple[errors.FieldViolation, ...], float | None]:
    """The field violations and retry delay from the status's google.rpc details."""
    try:
        call = exc if isinstance(exc, grpc.Call) else None
        status = rpc_status.from_call(call) if call is not None else None
    except ValueError:  # details that contradict the status: trust neither
        return (), None
    violations: list[errors.FieldViolation] = []
    retry_after = None
    details: Iterable[Any] = status.details if status is not None else ()
    for detail in details:
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(bad):
            violations.extend(
                errors.FieldViolation(v.field, v.description) for v in bad.field_violations
            )
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    return tuple(violations), retry_after


def _retry_after(exc: grpc.RpcError) -> float | None:
    """The service's "retry-after" trailer (seconds), if it sent one."""
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for item in trailers or ():
        if item.key == "retry-after":
            try:
                return float(item.value)
            except (TypeError, ValueError):
                return None
    return None


#: What `tls_credentials` makes; named here so callers need not import grpc.
TlsCredentials = grpc.ChannelCredentials


def tls_credentials(
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from PEM files; each one not given comes from
    SANDBOXD_TLS_CA / SANDBOXD_TLS_CERT / SANDBOXD_TLS_KEY. None when none is set.

    The CA verifies the server (the system's roots without it); cert and key are this
    client's identity for a server that requires client certificates (mTLS).

    Raises:
        InvalidArgument: only one of cert and key, or a file that cannot be read.
    """
    ca = ca or os.environ.get("SANDBOXD_TLS_CA") or None
    cert = cert or os.environ.get("SANDBOXD_TLS_CERT") or None
    key = key or os.environ.get("SANDBOXD_TLS_KEY") or None
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise errors.InvalidArgument(
            "a TLS client certificate needs its key and the key its certificate "
            "(--tls-cert with --tls-key, or SANDBOXD_TLS_CERT with SANDBOXD_TLS_KEY)"
        )

    def read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise errors.InvalidArgument(f"TLS {what} {path}: {exc.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca, "CA"),
        private_key=read(key, "key"),
        certificate_chain=read(cert, "certificate"),
    )
