"""The plain records a sandbox passes through: asked for, resolved, handed out.

They live apart from the code that makes sandboxes so that the manager, the warm
pool, admission and the reaper can all speak of them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sandboxd.api import SandboxRequest
from sandboxd.config import Profile
from sandboxd.engine.base import BindMount
from sandboxd.limits import Limits
from sandboxd.processes import Started

State = Literal["running", "exited", "destroyed"]


@dataclass(frozen=True)
class Prepared:
    """A validated request, resolved: equal values can share warm containers."""

    image_ref: str
    image_digest: str
    limits: Limits
    profile: Profile
    runtime: str
    workdir: str
    env: tuple[tuple[str, str], ...]
    labels: tuple[tuple[str, str], ...]
    preload_argv: tuple[str, ...]
    #: Host directories, resolved and allowed by policy.
    mounts: tuple[BindMount, ...] = ()


@dataclass
class SandboxRecord:
    """A sandbox this instance made and still answers for.

    Mutable on purpose: a warm container learns its request, owner and TTL only when it
    is handed out, and its state changes as execs find it stopped.
    """

    id: str
    container_id: str
    request: SandboxRequest
    limits: Limits
    image_ref: str
    image_digest: str
    runtime: str
    profile: Profile
    workdir: str
    user: str
    created_unix: float
    expires_unix: float
    create_seconds: float = 0.0
    from_pool: bool = False
    state: State = "running"
    owner: str = ""
    preload: Started | None = None
