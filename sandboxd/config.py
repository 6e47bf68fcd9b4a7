"""Service configuration: defaults, caps, profiles. Loaded from a TOML file and flags."""

from __future__ import annotations

import os
import tomllib
import uuid
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sandboxd.errors import InvalidArgument
from sandboxd.limits import Caps, Limits, parse_size

DEFAULT_BASE_IMAGE = "sandbox-base:bookworm"


@dataclass(frozen=True)
class Profile:
    """A named security profile layered on the secure defaults every sandbox gets."""

    name: str
    #: Preferred runtime; None means the engine's default (runc).
    runtime: str | None = None
    #: What to do when `runtime` is not registered: "refuse" or "fallback".
    missing_runtime: str = "fallback"
    user: str = "1000:1000"
    #: ulimit name -> (soft, hard)
    ulimits: tuple[tuple[str, int, int], ...] = ()
    allow_network: bool = True


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
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    #: Which container engine runs the sandboxes (see sandboxd.engine.ENGINES).
    engine: str = "docker"
    #: The engine's API address; None means the engine's own default (DOCKER_HOST or its socket).
    docker_host: str | None = None
    #: Podman's API address when engine = "podman"; None means /run/podman/podman.sock.
    podman_host: str | None = None
    profiles: tuple[Profile, ...] = (DEFAULT_PROFILE, UNTRUSTED_PROFILE)
    default_profile: str = "default"
    workdir: str = "/sandbox/work"
    #: Where unix sockets and scratch files of the service live.
    state_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("SANDBOXD_STATE_DIR", "/tmp/sandboxd"))
    )
    #: Whether sandboxes of other instances (not just dead ones) are reaped at start.
    reap_foreign: bool = True
    #: Bearer tokens file for TCP listeners ("token client-name" per line).
    tokens_file: Path | None = None
    #: TLS for TCP listeners; with a client CA, clients must present a certificate it signed.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    #: Concurrent sandboxes one authenticated client may hold; 0 leaves only the global cap.
    max_sandboxes_per_client: int = 16

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


_PATHS = ("state_dir", "tokens_file", "tls_cert", "tls_key", "tls_client_ca")


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
    known = {f.name for f in fields(ServerConfig)}
    for key, value in data.items():
        if key not in known:
            raise InvalidArgument(f"config {path}: unknown setting {key!r}")
        if key.endswith("_bytes") and isinstance(value, str):
            value = parse_size(value, field=key)
        kwargs[key] = Path(value) if key in _PATHS else value
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return ServerConfig(**kwargs)
