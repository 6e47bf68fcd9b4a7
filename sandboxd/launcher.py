"""Turning a prepared request into a started, labelled container, and removing it again."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait

from sandboxd import processes
from sandboxd.api import SandboxRequest
from sandboxd.config import ServerConfig
from sandboxd.engine.base import (
    LABEL_EXPIRES,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_SANDBOX,
    ContainerSpec,
    Engine,
)
from sandboxd.errors import EngineUnavailable, SandboxError
from sandboxd.models import Prepared, SandboxRecord

log = logging.getLogger(__name__)

GVISOR_PIDS_OVERHEAD = 256
GVISOR_PIDS_PER_PROCESS = 16
_BASE_ENV = {
    "USER": "sandbox",
    "TZ": "UTC",
    "LANG": "C.UTF-8",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "TMPDIR": "/tmp",
}


def container_name(sandbox_id: str) -> str:
    """The engine's name for a sandbox's container (`docker ps` shows it)."""
    return f"sandbox-{sandbox_id}"


class Launcher:
    """Creates containers for prepared requests and removes them in the background."""

    def __init__(self, config: ServerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        # Removing a container takes the engine ~0.1 s; nobody should wait for that.
        self._removals = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandbox-remove")
        self._lock = threading.Lock()
        #: container id -> (its image id, its background removal), until the removal ends.
        self._pending: dict[str, tuple[str, Future[None]]] = {}

    def container_spec(self, prep: Prepared, sandbox_id: str, now: float) -> ContainerSpec:
        """The locked-down container `prep` asks for, labelled as this instance's."""
        cfg = self.config
        # The label carries the longest life any sandbox may have; the real TTL is kept in
        # memory, since a pooled container learns it only when it is handed out.
        labels = {
            **{f"user.{k}": v for k, v in prep.labels},
            LABEL_MANAGED: "1",
            LABEL_INSTANCE: cfg.instance_id,
            LABEL_SANDBOX: sandbox_id,
            LABEL_EXPIRES: f"{now + cfg.caps.ttl_seconds:.0f}",
        }
        limits = prep.limits
        ulimits = {name: (soft, hard) for name, soft, hard in prep.profile.ulimits}
        host_pids = limits.pids
        if prep.runtime == "runsc":
            # gVisor's own threads and its per-process ptrace stubs count in the host's pids
            # cgroup (about 55 idle, up to 14 per guest process), and the sandbox dies when that
            # cgroup is full. The guest's process limit is RLIMIT_NPROC instead, which
            # gVisor's kernel enforces per sandbox; the cgroup stays as a backstop.
            ulimits["nproc"] = (limits.pids, limits.pids)
            host_pids = GVISOR_PIDS_OVERHEAD + GVISOR_PIDS_PER_PROCESS * limits.pids
        return ContainerSpec(
            image=prep.image_ref,
            name=container_name(sandbox_id),
            labels=labels,
            env={"HOME": prep.workdir, **_BASE_ENV, **dict(prep.env)},
            user=prep.profile.user,
            workdir=prep.workdir,
            nano_cpus=int(limits.cpus * 1e9),
            memory_bytes=limits.memory_bytes,
            pids=host_pids,
            scratch={"/tmp": limits.scratch_bytes, prep.workdir: limits.scratch_bytes},
            network=limits.network,
            runtime=None if prep.runtime == "runc" else prep.runtime,
            ulimits=ulimits,
            binds=prep.mounts,
        )

    def launch(self, prep: Prepared) -> SandboxRecord:
        """Create and start a container for `prep` (and its preload); not yet handed out.

        Raises:
            EngineUnavailable: the engine cannot be reached.
            SandboxError: the engine refused the container.
        """
        sandbox_id = uuid.uuid4().hex[:16]
        now = time.time()
        container_id = self.engine.create_container(self.container_spec(prep, sandbox_id, now))
        record = SandboxRecord(
            id=sandbox_id,
            container_id=container_id,
            request=SandboxRequest(),
            limits=prep.limits,
            image_ref=prep.image_ref,
            image_digest=prep.image_digest,
            runtime=prep.runtime,
            profile=prep.profile,
            workdir=prep.workdir,
            user=prep.profile.user,
            created_unix=now,
            expires_unix=now + self.config.caps.ttl_seconds,
        )
        if prep.preload_argv:
            try:
                record.preload = processes.start(
                    self.engine,
                    container_id,
                    list(prep.preload_argv),
                    env={},
                    workdir=prep.workdir,
                    user=prep.profile.user,
                    stdin=True,
                )
            except BaseException:
                self.remove_now(container_id)
                raise
        return record

    def discard(self, record: SandboxRecord) -> None:
        """Kill and remove the container in the background; callers need not wait for it."""
        if record.preload is not None:
            record.preload.proc.close()
        try:
            removal = self._removals.submit(self.remove_now, record.container_id)
        except RuntimeError:  # shutting down: remove it right here
            self.remove_now(record.container_id)
            return
        with self._lock:
            self._pending[record.container_id] = (record.image_digest, removal)
        removal.add_done_callback(lambda _: self._forget(record.container_id))

    def _forget(self, container_id: str) -> None:
        with self._lock:
            self._pending.pop(container_id, None)

    def settle(self, image_digest: str, timeout: float = 60.0) -> None:
        """Wait until the containers of this image that are being removed are gone."""
        with self._lock:
            removals = [f for digest, f in self._pending.values() if digest == image_digest]
        wait(removals, timeout=timeout)

    def remove_now(self, container_id: str) -> None:
        """Remove a container, logging rather than raising: the reaper retries what is left."""
        try:
            self.engine.remove_container(container_id)
        except EngineUnavailable:
            # The container keeps its labels; the reaper removes it when the engine is back.
            log.warning("engine unavailable while removing %s; the reaper will retry", container_id)
        except SandboxError as exc:
            log.warning("removing %s: %s", container_id, exc)

    def shutdown(self) -> None:
        """Wait for the background removals; later discards remove in the caller."""
        self._removals.shutdown(wait=True)
