"""The API's records as a client sees them: frozen dataclasses, no generated types.

`SandboxClient` (client.py) turns the wire messages into these and back, so the CLI,
the grader and the pytest plugin speak the same types whichever side of the wire they
are on. Where the core has the record already (`SandboxRequest`, `Limits`, an image's
`ImageRecord`), the client uses it; the server fills in `owner`, never the client.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from sandboxd.images import ImageRecord as Image
from sandboxd.limits import Limits
from sandboxd.models import SandboxRequest
from sandboxd.mounts import Mount
from sandboxd.verdicts import VERDICTS, Verdict, VerdictInfo

Stream = Literal["stdout", "stderr"]
SandboxState = Literal["unspecified", "running", "exited", "destroyed"]

__all__ = [
    "BuildResult",
    "ExecResult",
    "FilesPut",
    "Image",
    "Mount",
    "OutputChunk",
    "Sandbox",
    "SandboxRequest",
    "SandboxState",
    "Stream",
    "requested_limits",
]


def requested_limits(**given: Any) -> Limits:
    """Limits for a request: the fields given, every other one zero ("server default").

    `Limits()` carries the built-in defaults; a request that names only memory should
    leave the rest to the server's configured defaults, which an operator may change.
    """
    zero = {f.name: False if f.type == "bool" else 0 for f in fields(Limits)}
    return Limits(**{**zero, **given})


@dataclass(frozen=True)
class BuildResult:
    image: Image
    cache_hit: bool
    build_seconds: float


@dataclass(frozen=True)
class Sandbox:
    id: str
    #: What was asked for (zero limits: server defaults).
    request: SandboxRequest
    #: The resolved limits actually applied.
    limits: Limits
    image_digest: str
    container_id: str
    state: SandboxState
    created_unix: float
    expires_unix: float
    runtime: str
    create_seconds: float
    from_pool: bool
    #: The preload command is running and waiting to be attached to.
    preloaded: bool


@dataclass(frozen=True)
class OutputChunk:
    stream: Stream
    data: bytes


@dataclass(frozen=True)
class ExecResult:
    verdict: Verdict
    exit_code: int = 0
    #: Signal that ended the command, 0 if it exited normally.
    signal: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_memory_bytes: int = 0
    output_truncated: bool = False
    #: A sentence for a person: "timed out after 2.0s", "out of memory (limit 64 MiB)".
    message: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0

    @property
    def info(self) -> VerdictInfo:
        return VERDICTS[self.verdict]


@dataclass(frozen=True)
class FilesPut:
    files: int
    bytes: int
