"""The Podman adapter: Podman's Docker-compatible API, with what differs from Docker.

`podman system service` speaks the Docker Engine API, so this is `DockerEngine` with the
differences measured against Debian's Podman 4.3 (root, cgroupfs, runc):

- Podman's default RLIMIT_NOFILE (1048576) is refused by runc here, so every container
  gets explicit ulimits unless the spec already names them.
- Podman's default runtime (crun) refuses hybrid cgroup hosts; runc is asked for
  explicitly unless the spec names another runtime (runsc).
- tmpfs mounts take `U` (chown to the container's user) instead of `uid=`/`gid=`.
- An import ignores the tag asked for (the image lands as `docker.io/library/REPO:latest`
  or untagged), so the imported id is tagged afterwards.
- A commit ignores the configuration sent with it (Docker's `conf`): the image would keep
  the build container's entrypoint and labels. The configuration goes as `changes`
  (Dockerfile lines) instead.
- Host directories go in as plain binds with `nosuid,nodev` (which Podman honours, also
  read-write); Docker's anonymous volume with mount options comes out empty here.
- Its API ignores the runtime a create asks for (Docker's `HostConfig.Runtime` and
  libpod's `oci_runtime` alike; podman issue #28429, fixed only in later releases): a
  container asked for under gVisor would silently run under runc. So runc is the only
  runtime reported, a profile that needs runsc is refused (or falls back, as its
  `missing_runtime` says), and a create that names another runtime is refused here too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import IO, Any

from sandboxd.engine.base import ContainerSpec
from sandboxd.engine.docker import DockerEngine
from sandboxd.errors import EngineUnavailable, FailedPrecondition, SandboxError

#: Where `scripts/host-setup.sh` has root's `podman system service` listen.
DEFAULT_PODMAN_SOCKET = "unix:///run/podman/podman.sock"
#: Podman's own default is refused by this host's runc; Docker's daemon default is this.
DEFAULT_ULIMITS = {"nofile": (1024, 1024), "nproc": (1024, 1024)}
DEFAULT_RUNTIME = "runc"


class PodmanEngine(DockerEngine):
    """Talks to `podman system service` through its Docker-compatible API."""

    def __init__(self, base_url: str | None = None, timeout: float = 120.0) -> None:
        super().__init__(base_url or DEFAULT_PODMAN_SOCKET, timeout)

    def _unavailable(self, exc: BaseException) -> EngineUnavailable:
        super()._unavailable(exc)
        return EngineUnavailable(
            f"cannot reach Podman at {self.base_url} ({type(exc).__name__}); "
            "is `podman system service` running? (scripts/host-setup.sh starts it)"
        )

    def runtimes(self) -> set[str]:
        self.ping()  # the answer is fixed, but asking must still find Podman
        return {DEFAULT_RUNTIME}

    def create_container(self, spec: ContainerSpec) -> str:
        """Create and start with runc and explicit ulimits.

        Raises:
            FailedPrecondition: another runtime was asked for, which Podman would ignore.
        """
        if spec.runtime not in (None, DEFAULT_RUNTIME):
            raise FailedPrecondition(
                f"runtime {spec.runtime!r} is not available with Podman: its API runs every "
                "container under its default runtime (runc here)"
            )
        return super().create_container(
            replace(
                spec,
                runtime=DEFAULT_RUNTIME,
                ulimits={**DEFAULT_ULIMITS, **spec.ulimits},
            )
        )

    def _tmpfs_owner(self, user: str) -> str:
        return "U"

    def commit(self, container_id: str, config: Mapping[str, Any]) -> str:
        changes = _changes_of(config)
        answer = self._call(lambda: self.api.commit(container_id, changes=changes))
        return str(answer["Id"])

    def _host_mounts(self, spec: ContainerSpec) -> dict[str, Any]:
        """Plain binds with their options: Podman takes `nosuid,nodev` there (read-write ones
        too), and its API would mount an empty volume for Docker's volume-with-options form."""
        binds = [
            f"{b.source}:{b.target}:{'ro' if b.read_only else 'rw'},nosuid,nodev"
            for b in spec.binds
        ]
        return {"binds": binds or None}

    def import_image(
        self, fileobj: IO[bytes], tag: str, labels: Mapping[str, str], changes: list[str]
    ) -> str:
        """Import a root file system tar as `tag`.

        Raises:
            SandboxError: Podman did not report the imported image.
        """
        label_changes = [f'LABEL "{k}"="{v}"' for k, v in labels.items()]
        answer = self._call(
            lambda: self.api.import_image(src=fileobj, changes=[*changes, *label_changes])
        )
        try:
            image = str(json.loads(str(answer).splitlines()[-1])["id"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise SandboxError(f"importing {tag}: Podman answered {str(answer)[:200]!r}") from None
        repo, _, version = tag.partition(":")
        self._call(lambda: self.api.tag(image, repo, version or "latest"))
        return image


def _changes_of(config: Mapping[str, Any]) -> list[str]:
    """An image configuration as the Dockerfile lines of a commit's `changes`."""
    quote = json.dumps
    changes = [f"ENV {k}={quote(v)}" for k, _, v in (e.partition("=") for e in config["Env"])]
    changes += [f"LABEL {quote(k)}={quote(v)}" for k, v in config["Labels"].items()]
    changes.append(f"ENTRYPOINT {quote(config['Entrypoint'] or [])}")
    if config.get("Cmd"):
        changes.append(f"CMD {quote(config['Cmd'])}")
    changes.append(f"WORKDIR {config['WorkingDir'] or '/'}")
    if config.get("User"):
        changes.append(f"USER {config['User']}")
    changes += [f"EXPOSE {port}" for port in config.get("ExposedPorts") or {}]
    if config.get("StopSignal"):
        changes.append(f"STOPSIGNAL {config['StopSignal']}")
    return changes
