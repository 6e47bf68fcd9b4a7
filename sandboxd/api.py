"""The API's records as a client sees them: frozen dataclasses, no generated types.

`SandboxClient` (client.py) turns the wire messages into these and back, so the CLI,
the grader and the pytest plugin speak the same types whichever side of the wire they
are on. Requests reuse the core's own records (`SandboxRequest`, `Limits`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from sandboxd.limits import Limits
from sandboxd.sandboxes import SandboxRequest
from sandboxd.verdicts import VERDICTS, Verdict, VerdictInfo

Stream = Literal["stdout", "stderr"]
SandboxState = Literal["unspecified", "running", "exited", "destroyed"]

__all__ = [
    "BuildResult",
    "ExecResult",
    "FilesPut",
    "Image",
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
class Image:
    #: Content key: sha256 over base digest, fragment and context files.
    key: str
    #: Engine image id (sha256:...).
    digest: str
    tag: str
    base: str
    size_bytes: int = 0
    created_unix: float = 0.0
    label: str = ""


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
    exit_code: int
    #: Signal that ended the command, 0 if it exited normally.
    signal: int
    verdict: Verdict
    wall_seconds: float
    cpu_seconds: float
    peak_memory_bytes: int
    output_truncated: bool
    #: A sentence for a person: "timed out after 2.0s", "out of memory (limit 64 MiB)".
    message: str
    stdout_bytes: int = 0
    stderr_bytes: int = 0

    @property
    def info(self) -> VerdictInfo:
        return VERDICTS[self.verdict]


@dataclass(frozen=True)
class FilesPut:
    files: int
    bytes: int
