"""The API's records, as both sides of the wire hold them: frozen dataclasses, no
generated types, nothing below them but limits, verdicts and errors.

`SandboxClient` (client.py) and the servicer (service.py) turn the wire messages into
these and back (wire.py), so the CLI, the grader, the pytest plugin and the service
core speak the same types; a client imports none of the service's machinery. The
server fills in `owner`, never the client.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from sandboxd.limits import Caps, Limits
from sandboxd.verdicts import VERDICTS, Judgement, Verdict, VerdictInfo

Stream = Literal["stdout", "stderr"]
SandboxState = Literal["unspecified", "running", "exited", "destroyed"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


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


@dataclass(frozen=True)
class ImageRecord:
    key: str
    digest: str
    tag: str
    base: str
    size_bytes: int = 0
    created_unix: float = 0.0
    label: str = ""
    owner: str = ""


@dataclass(frozen=True)
class ContextFile:
    path: str
    content: bytes
    mode: int = 0o644
    #: Hex SHA-256 of the content; given alone (content empty), it keys a cache lookup.
    sha256: str = ""

    def digest(self) -> str:
        return (
            self.sha256
            if self.sha256 and not self.content
            else hashlib.sha256(self.content).hexdigest()
        )

    @property
    def digest_only(self) -> bool:
        # An empty file sent with its content is indistinguishable from "digest only" but
        # for its digest, which is that of no bytes.
        return bool(self.sha256) and not self.content and self.sha256 != EMPTY_SHA256


@dataclass(frozen=True)
class ExecRequest:
    argv: list[str]
    stdin: bytes = b""
    timeout_seconds: float = 0.0
    output_limit_bytes: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = ""
    attach_preload: bool = False
    #: Stdin stays open for more input over the call (an interactive exec).
    stream_stdin: bool = False
    tty: bool = False
    #: The terminal's (rows, columns), with `tty`.
    window: tuple[int, int] | None = None


@dataclass(frozen=True)
class Output:
    stream: int  # 1 stdout, 2 stderr
    data: bytes


@dataclass(frozen=True)
class ExecOutcome:
    judgement: Judgement
    wall_seconds: float
    cpu_seconds: float
    peak_memory_bytes: int
    output_truncated: bool
    stdout_bytes: int
    stderr_bytes: int


@dataclass(frozen=True)
class ProfileInfo:
    name: str
    #: The runtime the profile asks for; "" means the engine's default.
    runtime: str
    allow_network: bool
    allow_port_forward: bool = False
    allow_mounts: bool = False


@dataclass(frozen=True)
class ServerInfo:
    api_version: str
    server_version: str
    engine: str
    engine_version: str
    defaults: Limits
    caps: Caps
    profiles: tuple[ProfileInfo, ...]
    default_profile: str
    runtimes: tuple[str, ...]
    base_image: str
    default_ttl_seconds: float
    #: Host directories below which sandboxes may mount (read-only; read-write).
    mount_roots: tuple[str, ...] = ()
    writable_mount_roots: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mount:
    """A host directory a request asks to see inside its sandbox."""

    #: Absolute path on the server's host.
    source: str
    #: Absolute path inside the sandbox; empty means the same as `source`.
    target: str = ""
    #: Read-write instead of read-only; only below a writable root.
    writable: bool = False


@dataclass(frozen=True)
class SandboxRequest:
    """What a client asks for; zero limits mean the server defaults."""

    image: str = ""
    limits: Limits | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = ""
    runtime: str = ""
    ttl_seconds: float = 0.0
    profile: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    owner: str = ""
    preload_argv: tuple[str, ...] = ()
    mounts: tuple[Mount, ...] = ()


@dataclass(frozen=True)
class WindowSize:
    rows: int
    columns: int


@dataclass(frozen=True)
class ExecStart:
    """The first message: which sandbox, the command (its `stdin` written first), the TTY."""

    sandbox_id: str
    request: ExecRequest
    tty: bool = False
    window: WindowSize | None = None


@dataclass(frozen=True)
class Stdin:
    data: bytes


@dataclass(frozen=True)
class Resize:
    window: WindowSize


@dataclass(frozen=True)
class Signal:
    name: str


@dataclass(frozen=True)
class CloseStdin:
    pass


ExecInput = Stdin | Resize | Signal | CloseStdin

#: What a client calls an image.
Image = ImageRecord
