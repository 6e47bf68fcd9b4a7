"""Service configuration: defaults, caps, profiles. Loaded from a TOML file and flags."""

from __future__ import annotations

import os
import tempfile
import tomllib
import uuid
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from sandboxd.errors import InvalidArgument
from sandboxd.limits import Caps, Limits, parse_size

DEFAULT_BASE_IMAGE = "sandbox-base:bookworm"
#: What a profile does when its runtime is not registered with the engine.
MissingRuntime = Literal["refuse", "fallback"]
#: What a build step may reach: nothing, only the caching package proxy, or the network.
BuildNetwork = Literal["none", "proxy", "open"]
#: Resource limits a container engine accepts as ulimits (setrlimit's names).
ULIMITS = frozenset(
    {
        "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
        "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Profile:
    """A named security profile layered on the secure defaults every sandbox gets."""

    name: str
    #: Preferred runtime; None means the engine's default (runc).
    runtime: str | None = None
    #: What to do when `runtime` is not registered with the engine.
    missing_runtime: MissingRuntime = "fallback"
    user: str = "1000:1000"
    #: ulimit name -> (soft, hard)
    ulimits: tuple[tuple[str, int, int], ...] = ()
    allow_network: bool = True
    #: The network policy of builds under this profile; None: `none` on a server that
    #: authenticates clients or for a profile without network, else `open`.
    build_network: BuildNetwork | None = None
    #: May clients reach ports inside its sandboxes through the API (PortForward)?
    allow_port_forward: bool = True
    #: May its sandboxes mount host directories (below the server's mount roots)?
    allow_mounts: bool = True


DEFAULT_PROFILE = Profile(
    name="default",
    ulimits=(("core", 0, 0),),
)
UNTRUSTED_PROFILE = Profile(
    name="untrusted",
    runtime="runsc",
    missing_runtime="refuse",
    user="65534:65534",
    ulimits=(("nofile", 256, 256), ("fsize", 64 << 20, 64 << 20), ("core", 0, 0)),
    allow_network=False,
    build_network="none",
    allow_port_forward=False,
    allow_mounts=False,
)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the service needs to know at start; frozen once built."""

    base_image: str = DEFAULT_BASE_IMAGE
    defaults: Limits = field(default_factory=Limits)
    caps: Caps = field(default_factory=Caps)
    default_ttl_seconds: float = 3600.0
    #: How often the reaper looks for expired and orphaned sandboxes.
    reap_interval_seconds: float = 30.0
    #: How long a create waits for a free slot (or memory) before RESOURCE_EXHAUSTED.
    admission_timeout_seconds: float = 30.0
    #: Upper bound on the sum of live sandboxes' memory limits; 0 means the host's memory.
    memory_budget_bytes: int = 0
    #: Warm containers kept per distinct request (0 turns the pool off).
    pool_max_per_key: int = max(2, (os.cpu_count() or 2) * 2)
    #: Upper bound on the memory limits of all warm containers; 0 means a quarter of the budget.
    pool_memory_budget_bytes: int = 0
    #: A pool nobody asked from for this long is emptied.
    pool_idle_seconds: float = 30.0
    #: Containers created in parallel to fill pools.
    pool_workers: int = max(2, os.cpu_count() or 2)
    #: Identifies this service's containers; a restart gets a new one.
    instance_id: str = field(default_factory=lambda: new_instance_id())
    #: Which container engine runs the sandboxes (see sandboxd.engine.ENGINES).
    engine: str = "docker"
    #: The engine's API address; None means the engine's own default (DOCKER_HOST or its socket).
    docker_host: str | None = None
    #: Podman's API address when engine = "podman"; None means /run/podman/podman.sock.
    podman_host: str | None = None
    #: Ray address of the cluster's head when engine = "cluster" ("auto": RAY_ADDRESS or the
    #: Ray node on this host).
    cluster_address: str = "auto"
    #: Bound on one call from the gateway to a node's agent; a dead node ends calls sooner.
    cluster_call_timeout_seconds: float = 20.0
    profiles: tuple[Profile, ...] = (DEFAULT_PROFILE, UNTRUSTED_PROFILE)
    default_profile: str = "default"
    workdir: str = "/sandbox/work"
    #: Where the service's private files live: the socket of an embedded service.
    state_dir: Path = field(default_factory=lambda: default_state_dir())
    #: Also reap, at start, the sandboxes of other instances that are still alive; only for
    #: a host where this service is the only one (dead instances' leftovers always go).
    reap_foreign: bool = False
    #: Bearer tokens file for TCP listeners ("token client-name" per line).
    tokens_file: Path | None = None
    #: TLS for TCP listeners; with a client CA, clients must present a certificate it signed.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    #: The local daemon (`sandboxd daemon`) exits after this long without clients.
    daemon_idle_seconds: float = 900.0
    #: The daemon's warm pool empties after this long without demand (instead of
    #: `pool_idle_seconds`): long enough to stay warm between a developer's runs.
    daemon_pool_idle_seconds: float = 600.0
    #: Concurrent sandboxes one authenticated client may hold; 0 leaves only the global cap.
    max_sandboxes_per_client: int = 16
    #: Further base images (references) authenticated clients may build on, besides
    #: `base_image`; they may also build on the images this server built for them. The engine
    #: contacts a registry only for a reference listed here.
    base_images: tuple[str, ...] = ()
    #: Images the operator built or imported (reference, tag or key) that every client may
    #: see and run; the base images always are, anything else of the operator's is private.
    public_images: tuple[str, ...] = ()
    #: Calls one authenticated client may have open at once; past it, RESOURCE_EXHAUSTED.
    max_calls_per_client: int = 32
    #: How long a client-streaming call (PutFiles, UploadBlobs) may take to send its first
    #: message; past it the call is cancelled. 0 turns the deadline off.
    first_message_seconds: float = 15.0
    #: The profile image builds run under (runtime, user, ulimits, build network); empty
    #: means the default profile for the operator and `untrusted` for authenticated clients.
    build_profile: str = ""
    #: A build ends, nothing kept, when it runs longer than this.
    build_timeout_seconds: float = 900.0
    #: What one build may write in all its steps.
    build_disk_bytes: int = 4 * 1024**3
    #: host:port of the caching package proxy that `proxy` builds reach (apt's http_proxy).
    build_proxy: str = "sandbox-aptproxy:3142"
    #: The internal engine network whose only other member is the proxy.
    build_proxy_network: str = "sandbox-build"

    @property
    def authenticated(self) -> bool:
        """Whether TCP clients must prove who they are (tokens or client certificates)."""
        return self.tokens_file is not None or self.tls_client_ca is not None

    #: Forwarded connections open at once on the server: each holds a server thread.
    max_port_forwards: int = 16
    #: Host directories below which sandboxes may mount read-only (none: no host mounts).
    mount_roots: tuple[Path, ...] = ()
    #: Host directories below which sandboxes may also mount read-write.
    writable_mount_roots: tuple[Path, ...] = ()

    def profile(self, name: str) -> Profile:
        """The named profile.

        Raises:
            InvalidArgument: unknown profile name.
        """
        name = name or self.default_profile
        for p in self.profiles:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.profiles)
        raise InvalidArgument(f"spec.profile: unknown profile {name!r} (known: {known})")


def new_instance_id() -> str:
    """A fresh instance id, after `SANDBOXD_INSTANCE_PREFIX` when set.

    The prefix lets a test session recognise the services it started in child processes
    (and their containers and images) among those of other sessions on the same engine.
    """
    return os.environ.get("SANDBOXD_INSTANCE_PREFIX", "") + uuid.uuid4().hex[:12]


def default_state_dir() -> Path:
    """`SANDBOXD_STATE_DIR`, else a directory of this user's under the temp dir."""
    named = os.environ.get("SANDBOXD_STATE_DIR")
    return Path(named) if named else Path(tempfile.gettempdir()) / f"sandboxd-{os.getuid()}"


_PATHS = ("state_dir", "tokens_file", "tls_cert", "tls_key", "tls_client_ca")
_LISTS = ("base_images", "public_images")
_PATH_LISTS = ("mount_roots", "writable_mount_roots")


def _limits_from(table: dict[str, Any], cls: type[Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise InvalidArgument(
                f"{where}.{key}: unknown setting (known: {', '.join(sorted(known))})"
            )
        if key.endswith("_bytes") and isinstance(value, str):
            value = parse_size(value, field=f"{where}.{key}")
        values[key] = value
    return replace(cls(), **values)


def load_config(path: Path | None = None, **overrides: Any) -> ServerConfig:
    """Build the config from an optional TOML file plus keyword overrides.

    Raises:
        InvalidArgument: unreadable file or unknown/invalid settings.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"config {path}: {exc}") from None
    kwargs: dict[str, Any] = {}
    if "defaults" in data:
        kwargs["defaults"] = _limits_from(data.pop("defaults"), Limits, "defaults")
    if "caps" in data:
        kwargs["caps"] = _limits_from(data.pop("caps"), Caps, "caps")
    if "profiles" in data:
        kwargs["profiles"] = _profiles_from(data.pop("profiles"))
    known = {f.name for f in fields(ServerConfig)}
    for key, value in data.items():
        if key not in known:
            raise InvalidArgument(f"config {path}: unknown setting {key!r}")
        if key.endswith("_bytes") and isinstance(value, str):
            value = parse_size(value, field=key)
        if key in _LISTS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidArgument(f"config {path}: {key} must be a list of image references")
            value = tuple(value)
        if key in _PATH_LISTS:
            value = _paths_from(value, key)
        kwargs[key] = Path(value) if key in _PATHS else value
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    config = ServerConfig(**kwargs)
    config.profile(config.default_profile)  # an unknown default fails at start, not per call
    return config


def _paths_from(value: Any, key: str) -> tuple[Path, ...]:
    """Absolute directories from a list of strings.

    Raises:
        InvalidArgument: not a list of absolute paths.
    """
    if not isinstance(value, list) or not all(
        isinstance(v, str) and v.startswith("/") for v in value
    ):
        raise InvalidArgument(f'{key}: give a list of absolute paths, e.g. ["/srv/datasets"]')
    return tuple(Path(v) for v in value)


def _profiles_from(tables: Any) -> tuple[Profile, ...]:
    """The built-in profiles plus the file's `[[profiles]]`; one of the same name replaces.

    Raises:
        InvalidArgument: not a list of tables, a missing name, or a bad or unknown key.
    """
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise InvalidArgument("profiles: write each profile as a [[profiles]] table")
    profiles = {p.name: p for p in ServerConfig().profiles}
    for index, table in enumerate(tables):
        profile = _profile_from(table, f"profiles[{index}]")
        profiles[profile.name] = profile
    return tuple(profiles.values())


def _profile_from(table: dict[str, Any], where: str) -> Profile:
    known = {f.name for f in fields(Profile)}
    for key in table:
        if key not in known:
            raise InvalidArgument(
                f"{where}.{key}: unknown profile setting (known: {', '.join(sorted(known))})"
            )
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{where}.name: every profile needs a name")
    where = f"profiles.{name}"
    _expect(table, "runtime", str, where)
    _expect(table, "user", str, where)
    _expect(table, "allow_network", bool, where)
    if table.get("build_network", "none") not in get_args(BuildNetwork):
        choices = ", ".join(repr(c) for c in get_args(BuildNetwork))
        raise InvalidArgument(f"{where}.build_network: must be one of {choices}")
    _expect(table, "allow_port_forward", bool, where)
    _expect(table, "allow_mounts", bool, where)
    missing = table.get("missing_runtime", "fallback")
    if missing not in get_args(MissingRuntime):
        choices = " or ".join(repr(c) for c in get_args(MissingRuntime))
        raise InvalidArgument(f"{where}.missing_runtime: must be {choices}, got {missing!r}")
    values = dict(table)
    if "ulimits" in table:
        values["ulimits"] = _ulimits_from(table["ulimits"], f"{where}.ulimits")
    return Profile(**values)


def _expect(table: dict[str, Any], key: str, kind: type, where: str) -> None:
    if key in table and not isinstance(table[key], kind):
        raise InvalidArgument(f"{where}.{key}: must be a {kind.__name__}, got {table[key]!r}")


def _ulimits_from(value: Any, where: str) -> tuple[tuple[str, int, int], ...]:
    """`{ nofile = [256, 256], core = 0 }`: a limit, or its soft and hard values."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: write it as a table, e.g. {{ nofile = [256, 256] }}")
    out: list[tuple[str, int, int]] = []
    for name, limit in value.items():
        if name not in ULIMITS:
            raise InvalidArgument(f"{where}.{name}: unknown (known: {', '.join(sorted(ULIMITS))})")
        pair = limit if isinstance(limit, list) else [limit, limit]
        if len(pair) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair
        ):
            raise InvalidArgument(
                f"{where}.{name}: give a number or [soft, hard] of numbers, got {limit!r}"
            )
        if pair[0] > pair[1]:
            raise InvalidArgument(f"{where}.{name}: the soft limit is above the hard one")
        out.append((name, pair[0], pair[1]))
    return tuple(out)
