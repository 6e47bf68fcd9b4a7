"""The one error root of the project and its specific kinds.

The core raises these; the gRPC adapter maps each kind to one status code in
one place, and the client maps status codes back to the same kinds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: A message that starts with "name: " names the request field at fault.
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*): ")


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: travels as a google.rpc.BadRequest field violation."""

    field: str
    description: str


class SandboxError(Exception):
    """Root of every error the project raises on purpose."""

    #: gRPC status code name this kind maps to (see sandboxd.service).
    code = "INTERNAL"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        #: The request fields at fault, for clients that point at them without parsing text.
        self.violations: tuple[FieldViolation, ...] = ()


class InvalidArgument(SandboxError):
    """Malformed input or a limit above the server's cap.

    `field` is the request field at fault (dotted, as in `limits.memory_bytes`), sent to
    clients as a structured field violation. When not given it is read from the message's
    "field: ..." prefix, the convention every check here already follows.
    """

    code = "INVALID_ARGUMENT"

    def __init__(
        self, message: str, *, field: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        if field is None:
            match = _FIELD_PREFIX.match(message)
            field = match.group(1) if match else ""
        self.field = field
        if field:
            self.violations = (FieldViolation(field, message),)


def invalid_fields(messages: list[str]) -> InvalidArgument:
    """One InvalidArgument for several bad fields: every message, each a field violation
    (a client fixes them all at once instead of one per round trip)."""
    error = InvalidArgument("; ".join(messages))
    error.violations = tuple(v for m in messages for v in InvalidArgument(m).violations)
    return error


class NotFound(SandboxError):
    """Unknown sandbox, image or path."""

    code = "NOT_FOUND"


class BuildFailed(SandboxError):
    """The engine could not build an image; the message carries the log tail."""

    code = "FAILED_PRECONDITION"


class FailedPrecondition(SandboxError):
    """The object is not in a state that allows the request."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(SandboxError):
    """Too many sandboxes or too large a transfer; retry later or ask for less."""

    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(SandboxError):
    """The caller may not touch this object or use this profile."""

    code = "PERMISSION_DENIED"


class Unauthenticated(SandboxError):
    """Missing or unknown credentials."""

    code = "UNAUTHENTICATED"


class EngineUnavailable(SandboxError):
    """The container engine cannot be reached; safe to retry."""

    code = "UNAVAILABLE"


class NodeLost(SandboxError):
    """The cluster node that ran the sandbox is gone, and the sandbox with it; not retried:
    the work must start over in a new sandbox."""

    code = "ABORTED"


class DeadlineExceeded(SandboxError):
    """The call's deadline passed before the service could answer."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(SandboxError):
    """The caller went away."""

    code = "CANCELLED"


BY_CODE: dict[str, type[SandboxError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        PermissionDenied,
        Unauthenticated,
        EngineUnavailable,
        NodeLost,
        DeadlineExceeded,
        Cancelled,
    )
}
