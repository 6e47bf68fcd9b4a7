"""What a server offers (caps, defaults, profiles, runtimes, versions), as one record.

Clients ask for it instead of copying the server's numbers: an operator who lowers a cap
changes it in one place, the server's config.
"""

from __future__ import annotations

import importlib.metadata as metadata

from sandboxd.api import ProfileInfo, ServerInfo
from sandboxd.config import ServerConfig
from sandboxd.engine import Engine

API_VERSION = "sandbox.v1"


def server_version() -> str:
    """The installed sandboxd release; "unknown" when run from a tree without metadata."""
    try:
        return metadata.version("sandbox")
    except metadata.PackageNotFoundError:
        return "unknown"


def describe_server(config: ServerConfig, engine: Engine) -> ServerInfo:
    """This server's offer.

    Raises:
        EngineUnavailable: the engine cannot be asked for its version and runtimes.
    """
    return ServerInfo(
        api_version=API_VERSION,
        server_version=server_version(),
        engine=config.engine,
        engine_version=engine.version(),
        defaults=config.defaults,
        caps=config.caps,
        profiles=tuple(
            ProfileInfo(
                p.name, p.runtime or "", p.allow_network, p.allow_port_forward, p.allow_mounts
            )
            for p in config.profiles
        ),
        default_profile=config.default_profile,
        runtimes=tuple(sorted(engine.runtimes())),
        base_image=config.base_image,
        default_ttl_seconds=config.default_ttl_seconds,
        mount_roots=tuple(str(p) for p in config.mount_roots),
        writable_mount_roots=tuple(str(p) for p in config.writable_mount_roots),
    )
