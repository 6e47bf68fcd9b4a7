"""The container engine behind one Protocol; `docker.py` is the Docker Engine implementation."""

from __future__ import annotations

from sandboxd.runtime.base import (
    CgroupSample,
    ContainerInfo,
    ContainerSpec,
    ExecProcess,
    Runtime,
)

__all__ = ["CgroupSample", "ContainerInfo", "ContainerSpec", "ExecProcess", "Runtime"]
