"""Sandboxes: validate a request, admit it, hand out a container, answer for it until destroyed.

The manager is the one entry point for the service; what it delegates lives in modules
of its own: admission (slots, memory, per-client caps), the warm pool, the launcher
(container spec, create, remove) and the reaper (TTL and leftovers).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Collection, Mapping

from sandboxd import instances, processes
from sandboxd.admission import Admission, memory_budget
from sandboxd.api import SandboxRequest
from sandboxd.config import Profile, ServerConfig
from sandboxd.engine.base import Engine
from sandboxd.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SandboxError,
)
from sandboxd.images import ImageStore
from sandboxd.launcher import Launcher
from sandboxd.limits import check_ttl, resolve
from sandboxd.models import Prepared, SandboxRecord
from sandboxd.mounts import check_mounts
from sandboxd.pool import WarmPool
from sandboxd.reaping import Reaper

log = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
MAX_ENV = 256
MAX_ENV_BYTES = 128 * 1024

__all__ = ["Prepared", "SandboxManager", "SandboxRecord", "SandboxRequest", "check_env"]


def check_env(env: Mapping[str, str], *, field: str = "env") -> dict[str, str]:
    """Environment variables a container can take.

    Raises:
        InvalidArgument: bad names, NUL bytes, or too many/too large.
    """
    if len(env) > MAX_ENV:
        raise InvalidArgument(f"{field}: {len(env)} variables is above the limit of {MAX_ENV}")
    total = 0
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise InvalidArgument(f"{field}: {name[:40]!r} is not a valid variable name")
        if "\x00" in value:
            raise InvalidArgument(f"{field}: the value of {name} contains a NUL byte")
        total += len(name) + len(value)
    if total > MAX_ENV_BYTES:
        raise InvalidArgument(
            f"{field}: {total} bytes in all is above the limit of {MAX_ENV_BYTES}"
        )
    return dict(env)


class SandboxManager:
    """Owns every sandbox of this instance. Thread-safe; no grpc in here."""

    def __init__(self, config: ServerConfig, engine: Engine, images: ImageStore) -> None:
        self.config = config
        self.engine = engine
        self.images = images
        self._lock = threading.Lock()
        self._sandboxes: dict[str, SandboxRecord] = {}
        self._instance_lock = instances.InstanceLock(config.instance_id)
        self._runtimes: set[str] | None = None
        self.launcher = Launcher(config, engine)
        self.pool: WarmPool | None = None
        if config.pool_max_per_key > 0:
            # Live sandboxes come first: the pool fills only what admission leaves free.
            self.pool = WarmPool(
                config,
                launch=self.launcher.launch,
                discard=self.launcher.discard,
                free_memory=lambda: self.admission.free_memory(),
                memory_budget=memory_budget(config),
            )
        self.admission = Admission(config, self.pool)
        self.reaper = Reaper(
            config, engine, records=self.list, destroy=self.destroy, known=self._knows
        )

    @property
    def admission_timeout(self) -> float:
        return self.admission.timeout

    @admission_timeout.setter
    def admission_timeout(self, seconds: float) -> None:
        self.admission.timeout = seconds

    @property
    def memory_budget(self) -> int:
        return self.admission.budget

    def committed_memory(self) -> int:
        """Memory limits of the live sandboxes and of those being created."""
        return self.admission.committed()

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Take this instance's liveness lock, reap leftovers, start the reaper thread."""
        self._instance_lock.acquire()
        self.reaper.start()

    def stop(self, keep: Collection[str] = ()) -> None:
        """Destroy every sandbox of this instance (pooled ones too) and stop reaping.

        Sandboxes named in `keep` stay for inspection, marked so that every reaper (and
        `sandboxd gc` without `--all`) spares them until their TTL ends.
        """
        self.admission.close()
        self.reaper.stop()
        if self.pool is not None:
            self.pool.stop()
        for record in self.list():
            if record.id in keep and self._keep(record):
                continue
            with contextlib.suppress(SandboxError):
                self.destroy(record.id)
        self.launcher.shutdown()
        self._instance_lock.release()

    def _keep(self, record: SandboxRecord) -> bool:
        """Mark a sandbox as kept past this instance; False (it is destroyed) on failure."""
        try:
            self.reaper.keep(record)
        except SandboxError as exc:
            log.warning("could not keep sandbox %s: %s", record.id, exc)
            return False
        until = time.strftime("%H:%M:%S UTC", time.gmtime(record.expires_unix))
        log.info("keeping sandbox %s (%s) until %s", record.id, record.container_id, until)
        return True

    def reap_expired(self) -> int:
        """Destroy sandboxes past their time-to-live."""
        return self.reaper.reap_expired()

    def reap_orphans(self) -> int:
        """Remove labelled containers whose instance is dead, or that outlived their TTL."""
        return self.reaper.reap_orphans()

    def _knows(self, sandbox_id: str) -> bool:
        with self._lock:
            if sandbox_id in self._sandboxes:
                return True
        return self.pool is not None and self.pool.knows(sandbox_id)

    # -- sandboxes ----------------------------------------------------------

    def _choose_runtime(self, requested: str, profile: Profile) -> str:
        if self._runtimes is None:
            self._runtimes = self.engine.runtimes()
        if requested:
            if requested not in self._runtimes:
                raise InvalidArgument(
                    f"spec.runtime: {requested!r} is not registered with the engine "
                    f"(available: {', '.join(sorted(self._runtimes))})"
                )
            return requested
        if profile.runtime and profile.runtime not in self._runtimes:
            if profile.missing_runtime == "refuse":
                raise PermissionDenied(
                    f"profile {profile.name!r} needs runtime {profile.runtime!r}, which the engine "
                    "does not have; register it (scripts/host-setup.sh does) or configure the "
                    "profile to fall back"
                )
            log.warning(
                "runtime %s missing; profile %s falls back to runc", profile.runtime, profile.name
            )
            return "runc"
        return profile.runtime or "runc"

    def prepare(self, req: SandboxRequest) -> Prepared:
        """Validate a request and resolve everything a container for it needs.

        Raises:
            InvalidArgument: bad limits, env, labels, workdir, runtime, preload, mounts or TTL.
            NotFound: unknown image.
            PermissionDenied: profile not usable, or a mount the server's policy refuses.
        """
        cfg = self.config
        profile = cfg.profile(req.profile)
        limits = resolve(req.limits, cfg.defaults, cfg.caps)
        if limits.network and not profile.allow_network:
            raise PermissionDenied(f"profile {profile.name!r} does not allow network access")
        check_ttl(req.ttl_seconds, cfg.default_ttl_seconds, cfg.caps)
        env = check_env(req.env, field="spec.env")
        for key, value in req.labels.items():
            if not _LABEL.match(key) or len(value) > 256 or "\x00" in value:
                raise InvalidArgument(f"spec.labels: {key[:40]!r} is not a usable label")
        if any("\x00" in a for a in req.preload_argv) or (
            req.preload_argv and not req.preload_argv[0]
        ):
            raise InvalidArgument("spec.preload_argv: not a usable command")
        workdir = req.workdir or cfg.workdir
        if not workdir.startswith("/") or ".." in workdir.split("/") or "\x00" in workdir:
            raise InvalidArgument(
                f"spec.workdir: {workdir[:80]!r} must be an absolute path without '..'"
            )
        mounts = check_mounts(req.mounts, profile, cfg, scratch=("/tmp", workdir))
        runtime_name = self._choose_runtime(req.runtime, profile)
        image_ref, digest = self.images.resolve_ref(req.image, req.owner)
        return Prepared(
            image_ref=image_ref,
            image_digest=digest,
            limits=limits,
            profile=profile,
            runtime=runtime_name,
            workdir=workdir,
            env=tuple(sorted(env.items())),
            labels=tuple(sorted(req.labels.items())),
            preload_argv=tuple(req.preload_argv),
            mounts=mounts,
        )

    def create(self, req: SandboxRequest) -> SandboxRecord:
        """Hand out a sandbox: a warm one from the pool when there is one, else a new one.

        Raises:
            InvalidArgument: bad limits, env, labels, workdir, runtime or TTL.
            NotFound: unknown image.
            PermissionDenied: profile not usable.
            ResourceExhausted: no free slot within the admission timeout.
            EngineUnavailable: the engine cannot be reached.
        """
        started = time.monotonic()
        prep = self.prepare(req)
        ttl = check_ttl(req.ttl_seconds, self.config.default_ttl_seconds, self.config.caps)
        memory = prep.limits.memory_bytes
        self.admission.admit(req.owner, memory, prep)
        try:
            record = self.pool.take(prep) if self.pool is not None else None
            if record is None:
                record = self.launcher.launch(prep)
                if self.pool is not None:
                    self.pool.missed(prep)
            else:
                record.from_pool = True
        except BaseException:
            self.admission.release(req.owner, memory)
            raise
        now = time.time()
        record.request = req
        record.owner = req.owner
        record.created_unix = now
        record.expires_unix = now + ttl
        record.create_seconds = time.monotonic() - started
        with self._lock:
            self._sandboxes[record.id] = record
        log.info(
            "sandbox %s handed out (%s, %.1f ms%s)",
            record.id,
            record.image_ref,
            record.create_seconds * 1e3,
            ", warm" if record.from_pool else "",
        )
        return record

    def prewarm(self, req: SandboxRequest) -> None:
        """Grow the warm pool for this request by one, if there is a pool.

        Raises:
            The same as `prepare`: a prewarm of a bad request fails like its create would.
        """
        prep = self.prepare(req)
        if self.pool is not None:
            self.pool.missed(prep)

    def take_preload(self, record: SandboxRecord) -> processes.Started:
        """The sandbox's waiting preload command, once.

        Raises:
            FailedPrecondition: there is none (not asked for, or already attached to).
        """
        with self._lock:
            run, record.preload = record.preload, None
        if run is None:
            raise FailedPrecondition(
                f"sandbox {record.id} has no preloaded command waiting "
                "(none was given in spec.preload_argv, or it was attached to already)"
            )
        return run

    def get(self, sandbox_id: str, owner: str = "") -> SandboxRecord:
        """The sandbox with this id, if the caller may see it.

        Raises:
            NotFound: unknown id.
            PermissionDenied: it belongs to another client.
        """
        with self._lock:
            record = self._sandboxes.get(sandbox_id)
        if record is None:
            raise NotFound(f"no sandbox {sandbox_id[:40]!r} (destroyed, expired, or never created)")
        # A client never reaches the operator's unowned sandboxes either; the operator ("")
        # reaches every one.
        if owner and record.owner != owner:
            raise PermissionDenied(f"sandbox {sandbox_id} belongs to another client")
        return record

    def list(self, owner: str = "") -> list[SandboxRecord]:
        with self._lock:
            records = list(self._sandboxes.values())
        return [r for r in records if not owner or r.owner == owner]

    def destroy(self, sandbox_id: str, owner: str = "") -> None:
        """Remove the sandbox's container and forget it.

        Raises:
            NotFound: unknown id.
            PermissionDenied: it belongs to another client.
        """
        record = self.get(sandbox_id, owner)
        with self._lock:
            if self._sandboxes.pop(sandbox_id, None) is None:
                return  # destroyed meanwhile by another caller
        record.state = "destroyed"
        self.admission.release(record.owner, record.limits.memory_bytes)
        self.launcher.discard(record)

    def release_image(self, image_digest: str) -> None:
        """Make way for removing an image: its warm containers go, and those being removed
        are waited for (the engine only untags an image a container still uses).

        Raises:
            FailedPrecondition: a live sandbox runs on the image.
        """
        with self._lock:
            users = sorted(r.id for r in self._sandboxes.values() if r.image_digest == image_digest)
        if users:
            raise FailedPrecondition(
                f"the image is in use by sandbox {', '.join(users[:5])}; destroy "
                f"{'it' if len(users) == 1 else 'them'} first"
            )
        if self.pool is not None:
            for record in self.pool.retire(lambda prep: prep.image_digest == image_digest):
                self.launcher.discard(record)
        self.launcher.settle(image_digest)

    def alive(self, record: SandboxRecord) -> bool:
        return self.engine.container_running(record.container_id)
