"""What the core needs from a container engine, as a Protocol and plain data."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, runtime_checkable

#: Label on everything the service makes; the value is the owning instance id.
LABEL_MANAGED = "sandbox.managed"
LABEL_INSTANCE = "sandbox.instance"
LABEL_SANDBOX = "sandbox.id"
LABEL_KEY = "sandbox.image-key"
LABEL_EXPIRES = "sandbox.expires"
LABEL_OWNER = "sandbox.owner"


@dataclass(frozen=True)
class BindMount:
    """A host directory mounted into a container (nosuid, nodev), already allowed by policy."""

    #: Resolved absolute path on the engine's host.
    source: str
    #: Absolute path inside the container.
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to create one locked-down container."""

    image: str
    name: str
    labels: Mapping[str, str]
    command: tuple[str, ...] = ("sleep", "infinity")
    env: Mapping[str, str] = field(default_factory=dict)
    user: str = "1000:1000"
    workdir: str = "/sandbox/work"
    hostname: str = "sandbox"
    nano_cpus: int = 1_000_000_000
    memory_bytes: int = 512 * 1024 * 1024
    pids: int = 256
    #: tmpfs mounts: path -> size in bytes.
    scratch: Mapping[str, int] = field(default_factory=dict)
    network: bool = False
    runtime: str | None = None
    read_only: bool = True
    #: ulimit name -> (soft, hard)
    ulimits: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    seccomp_default: bool = True
    #: Replaces the image's entrypoint when given (a build step's keep-alive process).
    entrypoint: tuple[str, ...] | None = None
    #: Capabilities given back after all are dropped (a build step's package installs).
    cap_add: tuple[str, ...] = ()
    #: A named engine network to join instead of the default bridge (needs `network`).
    network_name: str = ""
    #: False: created but never started (files are copied in, then it is committed).
    start: bool = True
    binds: tuple[BindMount, ...] = ()


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    labels: Mapping[str, str]
    status: str
    created_unix: float = 0.0


@dataclass(frozen=True)
class CgroupSample:
    """Counters read from the container's cgroup; None where unknown."""

    cpu_ns: int | None = None
    memory_peak_bytes: int | None = None
    oom_kills: int | None = None
    pids_max_events: int | None = None


class ExecProcess(Protocol):
    """A command started in a container, output flowing back as it is produced."""

    def write_stdin(self, data: bytes) -> None: ...

    def close_stdin(self) -> None: ...

    def output(self) -> Iterator[tuple[int, bytes]]:
        """Yield (stream, data) with stream 1 = stdout, 2 = stderr, until the command ends."""
        ...

    def exit_code(self) -> int | None:
        """The exit code once ended, None while running."""
        ...

    def start_failure(self) -> str | None:
        """Why the engine could not start the command at all (once its output has ended);
        None when it started."""
        ...

    def kill(self) -> None:
        """Kill the command and everything it started."""
        ...

    def resize(self, rows: int, columns: int) -> None:
        """Set the size of the command's terminal (a TTY exec only)."""
        ...

    def signal(self, signum: int) -> None:
        """Send `signum` to the command's main process."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ImageFacts:
    id: str
    labels: Mapping[str, str]
    #: In bytes as the engine reports it; 0 when it does not say.
    size: int


class Engine(Protocol):
    """The container engine. Raises EngineUnavailable when it cannot be reached."""

    def ping(self) -> None: ...

    def image_id(self, ref: str) -> str | None: ...

    def image_labels(self, ref: str) -> Mapping[str, str]: ...

    def image_facts(self, ref: str) -> ImageFacts | None:
        """The image's id, labels and size from one look; None when there is no such image."""
        ...

    def import_image(
        self, fileobj: IO[bytes], tag: str, labels: Mapping[str, str], changes: list[str]
    ) -> str: ...

    def remove_image(self, ref: str) -> None: ...

    def list_images(self, label: str) -> list[tuple[str, list[str], Mapping[str, str], int]]:
        """(id, tags, labels, size) of images carrying `label`."""
        ...

    def runtimes(self) -> set[str]: ...

    def version(self) -> str:
        """The engine's own version string, as it reports it."""
        ...

    def create_container(self, spec: ContainerSpec) -> str:
        """Create and start; return the container id."""
        ...

    def remove_container(self, container_id: str) -> None: ...

    def rename_container(self, container_id: str, name: str) -> None:
        """Give the container a new name (the one thing about it that can change; labels
        are fixed at create time)."""
        ...

    def kill_container(self, container_id: str) -> None: ...

    def container_running(self, container_id: str) -> bool: ...

    def list_containers(self, label: str) -> list[ContainerInfo]: ...

    def exec(
        self,
        container_id: str,
        argv: list[str],
        *,
        env: Mapping[str, str],
        workdir: str,
        user: str,
        stdin: bool,
        tty: bool = False,
        window: tuple[int, int] | None = None,
    ) -> ExecProcess:
        """Start `argv`; with `tty`, on a pseudo-terminal of `window` (rows, columns) whose
        output arrives as stream 1."""
        ...

    def sample(self, container_id: str) -> CgroupSample: ...

    def reset_peak(self, container_id: str) -> None: ...


@runtime_checkable
class RoomMaking(Protocol):
    """An engine whose containers reserve room on nodes of limited size (the cluster's).

    When a new container finds no room at first, the engine calls `make_room`, which the
    wiring points at the warm pool: warm containers give way to live ones, as admission
    makes them do on one machine. It says whether anything went.
    """

    make_room: Callable[[], bool]


@runtime_checkable
class OwnBuildEngine(Engine, Protocol):
    """An engine that can only build with a builder of its own (a test fake): root, the
    engine's network and no limits, so sandboxd.builder uses it only for such engines."""

    def build_image(
        self,
        dockerfile: str,
        context: Mapping[str, tuple[bytes, int]],
        tag: str,
        labels: Mapping[str, str],
    ) -> Iterator[str]:
        """Build and tag; yields log lines. Raises BuildFailed with the log tail."""
        ...


@runtime_checkable
class LayerEngine(Engine, Protocol):
    """An engine that builds images layer by layer in containers the service makes (the
    sandboxed build of sandboxd.builder): copy files in, commit, tag, measure."""

    def image_config(self, ref: str) -> Mapping[str, Any]:
        """The image's run configuration (Env, Cmd, Entrypoint, User, WorkingDir, Labels...)."""
        ...

    def put_archive(self, container_id: str, path: str, data: bytes) -> None:
        """Unpack a tar archive into the container's file system at `path`."""
        ...

    def is_directory(self, container_id: str, path: str) -> bool:
        """Whether `path` is a directory in the container (False when it does not exist)."""
        ...

    def commit(self, container_id: str, config: Mapping[str, Any]) -> str:
        """Make an image of the container's file system with exactly this run
        configuration; returns its id. Untagged: the caller tags or removes it."""
        ...

    def tag_image(self, image_id: str, tag: str) -> None: ...

    def dangling_images(self, label: str) -> list[tuple[str, Mapping[str, str]]]:
        """(id, labels) of untagged images carrying `label` that no other image builds on."""
        ...

    def disk_usage(self, container_id: str) -> int:
        """Bytes the container has written to its own layer."""
        ...
