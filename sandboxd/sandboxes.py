"""Sandboxes: create locked-down containers, admit within caps, reap what expires."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from sandboxd import instances, processes
from sandboxd.config import Profile, ServerConfig
from sandboxd.engine.base import (
    LABEL_EXPIRES,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_SANDBOX,
    ContainerSpec,
    Engine,
)
from sandboxd.errors import (
    EngineUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SandboxError,
)
from sandboxd.images import ImageStore
from sandboxd.limits import Limits, check_ttl, format_size, resolve
from sandboxd.pool import WarmPool

log = logging.getLogger(__name__)

State = Literal["running", "exited", "destroyed"]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
MAX_ENV = 256
#: How long a start waits for leftovers of dead instances to be removed before serving.
STARTUP_REAP_SECONDS = 10.0
GVISOR_PIDS_OVERHEAD = 256
GVISOR_PIDS_PER_PROCESS = 16
MAX_ENV_BYTES = 128 * 1024


@dataclass(frozen=True)
class SandboxRequest:
    """What a client asks for; zero limits mean the server defaults."""

    image: str = ""
    limits: Limits | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = ""
    runtime: str = ""
    ttl_seconds: float = 0.0
    profile: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    owner: str = ""
    preload_argv: tuple[str, ...] = ()


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


@dataclass
class SandboxRecord:
    """A sandbox this instance made and still answers for."""

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
    preload: processes.Started | None = None


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
        self._slots = threading.Condition(self._lock)
        self._pending = 0
        self._pending_by_owner: dict[str, int] = {}
        self._pending_memory = 0
        self._sandboxes: dict[str, SandboxRecord] = {}
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._instance_lock = instances.InstanceLock(config.instance_id)
        self._runtimes: set[str] | None = None
        self.admission_timeout = config.admission_timeout_seconds
        self.memory_budget = config.memory_budget_bytes or _host_memory()
        # Removing a container takes the engine ~0.1 s; nobody should wait for that.
        self._removals = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandbox-remove")
        self.pool: WarmPool | None = None
        if config.pool_max_per_key > 0:
            self.pool = WarmPool(self, config)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Take this instance's liveness lock, reap leftovers, start the reaper thread."""
        self._instance_lock.acquire()
        first_pass = threading.Event()
        self._reaper = threading.Thread(
            target=self._reap_loop, args=(first_pass,), name="sandbox-reaper", daemon=True
        )
        self._reaper.start()
        # Leftovers usually go before the first call is served; but one wedged container
        # in the engine must not keep the service from starting.
        if not first_pass.wait(STARTUP_REAP_SECONDS):
            log.warning("reaping leftovers takes long; serving meanwhile")

    def stop(self, keep: Collection[str] = ()) -> None:
        """Destroy every sandbox of this instance (pooled ones too) and stop reaping.

        Sandboxes named in `keep` stay for inspection; as leftovers of an instance that is
        gone, the next start of any sandboxd (or `sandboxd gc`) removes them.
        """
        self._stop.set()
        if self.pool is not None:
            self.pool.stop()
        for record in self.list():
            if record.id in keep:
                log.info("keeping sandbox %s (container %s)", record.id, record.container_id)
                continue
            with contextlib.suppress(SandboxError):
                self.destroy(record.id)
        self._removals.shutdown(wait=True)
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        self._instance_lock.release()

    def _reap_loop(self, first_pass: threading.Event) -> None:
        try:
            self.reap_orphans()
        except SandboxError as exc:
            log.warning("reaper: %s", exc)
        except Exception:
            log.exception("reaper failed; will try again")
        finally:
            first_pass.set()
        while not self._stop.wait(self.config.reap_interval_seconds):
            try:
                self.reap_expired()
                self.reap_orphans()
            except SandboxError as exc:
                log.warning("reaper: %s", exc)
            except Exception:
                log.exception("reaper failed; will try again")

    def reap_expired(self) -> int:
        """Destroy sandboxes past their time-to-live."""
        now = time.time()
        expired = [r.id for r in self.list() if r.expires_unix <= now]
        for sandbox_id in expired:
            log.info("sandbox %s passed its TTL; destroying", sandbox_id)
            with contextlib.suppress(NotFound):
                self.destroy(sandbox_id)
        return len(expired)

    def reap_orphans(self) -> int:
        """Remove labelled containers whose instance is dead, or that outlived their TTL."""
        removed = 0
        now = time.time()
        # Only containers with an instance label are sandboxes: image labels (managed=1
        # included) are inherited by every container made from the image, a build's too.
        for info in self.engine.list_containers(LABEL_INSTANCE):
            owner = info.labels.get(LABEL_INSTANCE, "")
            if owner == self.config.instance_id:
                # Ours but forgotten (a destroy that met a lost engine); the age check keeps
                # us off containers whose create() has not recorded them yet.
                with self._lock:
                    sid = info.labels.get(LABEL_SANDBOX, "")
                    known = sid in self._sandboxes or (
                        self.pool is not None and self.pool.knows(sid)
                    )
                if known or now - info.created_unix < 120:
                    continue
                with contextlib.suppress(SandboxError):
                    self.engine.remove_container(info.id)
                    removed += 1
                continue
            expires = _float(info.labels.get(LABEL_EXPIRES, ""))
            if instances.is_alive(owner) and (expires is None or expires > now):
                continue
            log.info("reaping %s left by instance %s", info.name, owner or "?")
            with contextlib.suppress(SandboxError):
                self.engine.remove_container(info.id)
                removed += 1
        return removed

    # -- admission ----------------------------------------------------------

    def committed_memory(self) -> int:
        """Memory limits of the live sandboxes and of those being created."""
        with self._lock:
            return self._committed_locked()

    def _committed_locked(self) -> int:
        return self._pending_memory + sum(r.limits.memory_bytes for r in self._sandboxes.values())

    def _admit(self, owner: str, memory: int, prep: Prepared | None = None) -> None:
        """Wait for a free slot and `memory` bytes of the budget, for a bounded time.

        Raises:
            ResourceExhausted: no slot or memory within the admission timeout, or the
                request alone is larger than the whole budget.
        """
        budget = self.memory_budget
        if memory > budget:
            raise ResourceExhausted(
                f"limits.memory_bytes: {format_size(memory)} is more than this server's whole "
                f"memory budget of {format_size(budget)}; ask for less"
            )
        deadline = time.monotonic() + self.admission_timeout
        with self._slots:
            per_client = self.config.max_sandboxes_per_client
            if owner and per_client:
                held = self._pending_by_owner.get(owner, 0) + sum(
                    1 for r in self._sandboxes.values() if r.owner == owner
                )
                if held >= per_client:
                    raise ResourceExhausted(
                        f"client {owner!r} holds {held} sandboxes, its limit is {per_client}; "
                        "destroy one first",
                        retry_after=5.0,
                    )
            while True:
                full = len(self._sandboxes) + self._pending >= self.config.caps.sandboxes
                committed = self._committed_locked()
                if self.pool is not None:
                    # Warm containers count; one this request will take moves, not adds.
                    warm = self.pool.warm_memory()
                    if prep is not None and self.pool.has_ready(prep):
                        warm -= memory
                    over = committed + warm + memory - budget
                    if over > 0 and warm > 0:
                        self.pool.evict(over, keep=prep)
                        warm = self.pool.warm_memory()
                    committed += max(0, warm)
                if not full and committed + memory <= budget:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    what = (
                        f"all {self.config.caps.sandboxes} sandbox slots are in use"
                        if full
                        else f"{format_size(committed)} of the {format_size(budget)} memory "
                        f"budget is committed, {format_size(memory)} more does not fit"
                    )
                    raise ResourceExhausted(f"{what}; retry in a few seconds", retry_after=5.0)
                self._slots.wait(timeout=left)
            self._pending += 1
            self._pending_memory += memory
            if owner:
                self._pending_by_owner[owner] = self._pending_by_owner.get(owner, 0) + 1

    def _release_pending(self, memory: int, owner: str = "") -> None:
        with self._slots:
            self._pending -= 1
            self._pending_memory -= memory
            if owner:
                left = self._pending_by_owner.pop(owner, 1) - 1
                if left:
                    self._pending_by_owner[owner] = left
            # notify_all: a freed slot may fit a smaller request than the first waiter's.
            self._slots.notify_all()

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
            InvalidArgument: bad limits, env, labels, workdir, runtime, preload or TTL.
            NotFound: unknown image.
            PermissionDenied: profile not usable.
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
        )

    def launch(self, prep: Prepared) -> SandboxRecord:
        """Create and start a container for `prep` (and its preload); not yet handed out."""
        cfg = self.config
        sandbox_id = uuid.uuid4().hex[:16]
        now = time.time()
        # The label carries the longest life any sandbox may have; the real TTL is kept in
        # memory, since a pooled container learns it only when it is handed out.
        labels = {
            **{f"user.{k}": v for k, v in prep.labels},
            LABEL_MANAGED: "1",
            LABEL_INSTANCE: cfg.instance_id,
            LABEL_SANDBOX: sandbox_id,
            LABEL_EXPIRES: f"{now + cfg.caps.ttl_seconds:.0f}",
        }
        base_env = {
            "HOME": prep.workdir,
            "USER": "sandbox",
            "TZ": "UTC",
            "LANG": "C.UTF-8",
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "TMPDIR": "/tmp",
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
        spec = ContainerSpec(
            image=prep.image_ref,
            name=f"sandbox-{sandbox_id}",
            labels=labels,
            env={**base_env, **dict(prep.env)},
            user=prep.profile.user,
            workdir=prep.workdir,
            nano_cpus=int(limits.cpus * 1e9),
            memory_bytes=limits.memory_bytes,
            pids=host_pids,
            scratch={"/tmp": limits.scratch_bytes, prep.workdir: limits.scratch_bytes},
            network=limits.network,
            runtime=None if prep.runtime == "runc" else prep.runtime,
            ulimits=ulimits,
        )
        container_id = self.engine.create_container(spec)
        record = SandboxRecord(
            id=sandbox_id,
            container_id=container_id,
            request=SandboxRequest(),
            limits=limits,
            image_ref=prep.image_ref,
            image_digest=prep.image_digest,
            runtime=prep.runtime,
            profile=prep.profile,
            workdir=prep.workdir,
            user=prep.profile.user,
            created_unix=now,
            expires_unix=now + cfg.caps.ttl_seconds,
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
                self._remove_now(container_id)
                raise
        return record

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
        self._admit(req.owner, prep.limits.memory_bytes, prep)
        try:
            record = self.pool.take(prep) if self.pool is not None else None
            if record is None:
                record = self.launch(prep)
                if self.pool is not None:
                    self.pool.missed(prep)
            else:
                record.from_pool = True
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
        finally:
            self._release_pending(prep.limits.memory_bytes, req.owner)

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
        with self._slots:
            if self._sandboxes.pop(sandbox_id, None) is None:
                return
            self._slots.notify_all()
        record.state = "destroyed"
        self.discard(record)

    def discard(self, record: SandboxRecord) -> None:
        """Kill and remove the container in the background; callers need not wait for it."""
        if record.preload is not None:
            record.preload.proc.close()
        try:
            self._removals.submit(self._remove_now, record.container_id)
        except RuntimeError:  # shutting down: remove it right here
            self._remove_now(record.container_id)

    def _remove_now(self, container_id: str) -> None:
        try:
            self.engine.remove_container(container_id)
        except EngineUnavailable:
            # The container keeps its labels; the reaper removes it when the engine is back.
            log.warning("engine unavailable while removing %s; the reaper will retry", container_id)
        except SandboxError as exc:
            log.warning("removing %s: %s", container_id, exc)

    def alive(self, record: SandboxRecord) -> bool:
        return self.engine.container_running(record.container_id)


def _host_memory() -> int:
    """Physical memory of this host: the budget when none is configured."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 62


def _float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None
