"""The container engine behind one Protocol (`Engine`), and the factory that picks one.

`docker.py` is the Docker Engine adapter and the only module that imports docker-py;
`podman.py` adapts it to Podman's Docker-compatible API; `cluster.py` spreads containers
over a Ray cluster of nodes, each with its own Docker engine (Ray is imported only then).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandboxd.engine.base import (
    CgroupSample,
    ContainerInfo,
    ContainerSpec,
    Engine,
    ExecProcess,
)
from sandboxd.errors import InvalidArgument

if TYPE_CHECKING:
    from sandboxd.config import ServerConfig

#: Engines that run containers on this host's own daemon; the engine-neutral contract
#: tests run over these (the cluster engine needs a Ray cluster and has its own tests).
LOCAL_ENGINES = ("docker", "podman")

#: Engine names a config may choose.
ENGINES = (*LOCAL_ENGINES, "cluster")


def make_engine(config: ServerConfig) -> Engine:
    """The engine the config names, connected lazily (no call is made here).

    Raises:
        InvalidArgument: unknown engine name.
    """
    if config.engine == "docker":
        from sandboxd.engine.docker import DockerEngine

        return DockerEngine(config.docker_host)
    if config.engine == "podman":
        from sandboxd.engine.podman import PodmanEngine

        return PodmanEngine(config.podman_host)
    if config.engine == "cluster":
        try:
            from sandboxd.engine.cluster import ClusterEngine
        except ImportError as exc:
            raise InvalidArgument(
                f"engine: the cluster engine needs Ray ({exc}); install sandbox[cluster]"
            ) from None
        return ClusterEngine(
            config.cluster_address,
            config.instance_id,
            call_timeout=config.cluster_call_timeout_seconds,
            placement_timeout=config.admission_timeout_seconds,
        )
    raise InvalidArgument(f"engine: unknown engine {config.engine!r} (known: {', '.join(ENGINES)})")


__all__ = [
    "ENGINES",
    "LOCAL_ENGINES",
    "CgroupSample",
    "ContainerInfo",
    "ContainerSpec",
    "Engine",
    "ExecProcess",
    "make_engine",
]
