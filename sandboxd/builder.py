"""Where and how image builds run: the build sandbox's settings for a client, and the
builder that runs `sandboxd.build_run.BuildRun` on this engine or, on a cluster, on one
node whose agent runs the steps against its own engine (the gateway decides the runtime,
limits and network policy either way).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from sandboxd.build_run import BuildJob, BuildRun, BuildSettings, reap_build_leftovers
from sandboxd.config import UNTRUSTED_PROFILE, BuildNetwork, Profile, ServerConfig
from sandboxd.engine.base import Engine, LayerEngine, OwnBuildEngine
from sandboxd.errors import FailedPrecondition, PermissionDenied

log = logging.getLogger(__name__)


def build_settings(config: ServerConfig, owner: str, runtimes: set[str]) -> BuildSettings:
    """The build sandbox for a client: the build profile's runtime and network policy,
    the server's default limits, the build deadline and disk limit.

    Raises:
        PermissionDenied: the profile needs a runtime the engine lacks and may not fall back.
    """
    name = config.build_profile or (UNTRUSTED_PROFILE.name if owner else config.default_profile)
    profile = config.profile(name)
    limits = config.defaults
    return BuildSettings(
        runtime=_runtime(profile, runtimes),
        nano_cpus=int(limits.cpus * 1e9),
        memory_bytes=limits.memory_bytes,
        pids=limits.pids,
        ulimits={n: (soft, hard) for n, soft, hard in profile.ulimits},
        disk_bytes=config.build_disk_bytes,
        timeout_seconds=config.build_timeout_seconds,
        network=build_network(config, profile),
        proxy=config.build_proxy,
        proxy_network=config.build_proxy_network,
    )


def build_network(config: ServerConfig, profile: Profile) -> BuildNetwork:
    """A profile's build network: its own setting, else none where tenants are."""
    if profile.build_network is not None:
        return profile.build_network
    return "none" if config.authenticated or not profile.allow_network else "open"


def _runtime(profile: Profile, runtimes: set[str]) -> str:
    if profile.runtime and profile.runtime not in runtimes:
        if profile.missing_runtime == "refuse":
            raise PermissionDenied(
                f"builds run under profile {profile.name!r}, which needs runtime "
                f"{profile.runtime!r}; the engine does not have it"
            )
        return "runc"
    return profile.runtime or "runc"


@runtime_checkable
class NodeBuildEngine(Engine, Protocol):
    """An engine whose nodes run the step build themselves (the cluster's): it gets the job
    and the settings decided here, and one node's agent runs `BuildRun` on its engine."""

    def build_steps(
        self,
        job: BuildJob,
        settings: BuildSettings,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Run the build on a node that has the settings' runtime; yields log lines.

        Raises:
            BuildFailed, DeadlineExceeded, Cancelled: as `BuildRun.execute`.
            NodeLost: the node died during the build.
        """
        ...


def make_builder(engine: Engine, config: ServerConfig) -> StepBuilder | EngineBuilder:
    """The sandboxed step builder, on this engine or on a cluster's nodes; any other engine
    (a test fake) builds with its own builder, if it has one."""
    if isinstance(engine, LayerEngine | NodeBuildEngine):
        return StepBuilder(engine, config)
    log.warning("engine %s builds with its own builder, unsandboxed", type(engine).__name__)
    return EngineBuilder(engine)


class EngineBuilder:
    """The engine's own builder, for an engine that can build no other way (a test fake).
    The fragment is still checked by sandboxd.fragments, but RUN steps get the engine's
    default root, network and no limits."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def build(self, job: BuildJob, cancel: threading.Event | None = None) -> Iterator[str]:
        """Build `FROM base` + fragment; yields log lines.

        Raises:
            BuildFailed: the engine's build failed (the message has the log tail).
            FailedPrecondition: the engine cannot build images.
        """
        if not isinstance(self._engine, OwnBuildEngine):
            raise FailedPrecondition(f"engine {type(self._engine).__name__} cannot build images")
        dockerfile = f"FROM {job.base}\n{job.fragment}\n"
        yield from self._engine.build_image(dockerfile, job.files, job.tag, job.labels)


class StepBuilder:
    """Builds images step by step in sandboxes (see the module's docstring)."""

    def __init__(self, engine: LayerEngine | NodeBuildEngine, config: ServerConfig) -> None:
        self._engine = engine
        self._config = config
        self._runtimes: set[str] | None = None
        self._reaped = False

    def build(self, job: BuildJob, cancel: threading.Event | None = None) -> Iterator[str]:
        """Run the job's steps and tag the result; yields log lines.

        Raises:
            BuildFailed: a step failed or wrote more than the disk limit.
            DeadlineExceeded: the build deadline passed. Cancelled: `cancel` was set.
            PermissionDenied: the build profile's runtime is missing.
            NodeLost: on a cluster, the building node died.
        """
        if self._runtimes is None:
            self._runtimes = self._engine.runtimes()
        settings = build_settings(self._config, job.owner, self._runtimes)
        if not isinstance(self._engine, LayerEngine):
            yield from self._engine.build_steps(job, settings, cancel)
            return
        if not self._reaped:
            self._reaped = True
            reap_build_leftovers(self._engine)
        run = BuildRun(self._engine, settings, job, self._config.instance_id, cancel)
        yield from run.execute()
