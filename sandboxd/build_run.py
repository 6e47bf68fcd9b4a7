"""One image build, run like a sandbox: step by step, in containers the service makes.

The engine's own builder runs every RUN step as root with the engine's network and no
limits, and fetches `ADD http://...` from the host's own network namespace. So builds
never go through it: each RUN step runs in a container created from the image so far,
with the build profile's runtime (runsc for `untrusted`), memory, CPU and process limits,
the build network policy, and only the capabilities a package install needs; the
container is then committed as the next layer. COPY and ADD unpack context files into a
container that never starts. A build ends, nothing committed and every container and
layer removed, at its deadline or when the client goes away. `sandboxd.builder` decides
the settings and where the run happens (this engine, or a cluster node's agent).
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from sandboxd import instances
from sandboxd.build_state import BuildState, copy_archive, fail
from sandboxd.config import BuildNetwork
from sandboxd.engine.base import LABEL_MANAGED, ContainerSpec, ExecProcess, LayerEngine
from sandboxd.errors import BuildFailed, Cancelled, DeadlineExceeded, NotFound, SandboxError
from sandboxd.fragments import Instruction, expand
from sandboxd.limits import format_size

log = logging.getLogger(__name__)


#: On build containers and a build's layers: the instance that made them. The final image
#: gets it as "", so nothing made from it carries it.
LABEL_BUILD = "sandbox.build"
#: What a build step may do as root: own, read and write any file, switch users (apt's
#: `_apt`, maintainer scripts' `useradd`), signal its own processes. Nothing else: no raw
#: sockets, device nodes, mounts, chroot, tracing or module loading.
BUILD_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID")
#: How many lines of a failed step's output its error repeats.
TAIL_LINES = 20


@dataclass(frozen=True)
class BuildSettings:
    """The sandbox every step of one build runs in."""

    runtime: str
    nano_cpus: int
    memory_bytes: int
    pids: int
    ulimits: Mapping[str, tuple[int, int]]
    disk_bytes: int
    timeout_seconds: float
    network: BuildNetwork
    #: host:port of the package proxy and the network it is on (policy `proxy` only).
    proxy: str = ""
    proxy_network: str = ""


@dataclass(frozen=True)
class BuildJob:
    """One image to build: base, parsed fragment, context files, and what the image gets."""

    base: str
    instructions: tuple[Instruction, ...]
    files: Mapping[str, tuple[bytes, int]]
    tag: str
    labels: Mapping[str, str]
    owner: str = ""
    #: The fragment as the client wrote it (for an engine without layers, see EngineBuilder).
    fragment: str = ""


def reap_build_leftovers(engine: LayerEngine) -> int:
    """Remove build containers, and layers no image builds on, of service instances that
    are no longer running (a build's layers carry its instance until the final commit)."""
    leftovers: list[tuple[str, Mapping[str, str], Callable[[str], None]]] = [
        (c.id, c.labels, engine.remove_container) for c in engine.list_containers(LABEL_BUILD)
    ]
    leftovers += [
        (i, labels, engine.remove_image) for i, labels in engine.dangling_images(LABEL_BUILD)
    ]
    removed = 0
    for ref, labels, remove in leftovers:
        owner = labels.get(LABEL_BUILD, "")
        if owner and not instances.is_alive(owner):
            with contextlib.suppress(SandboxError):
                remove(ref)
                removed += 1
    return removed


@dataclass
class BuildRun:
    """One build in progress: its state, its layers so far, and the container it runs."""

    engine: LayerEngine
    settings: BuildSettings
    job: BuildJob
    instance_id: str
    cancel: threading.Event | None = None
    #: Extra labels of its build containers (a cluster node's name, so its agent reaps them).
    container_labels: Mapping[str, str] = field(default_factory=dict)
    image: str = ""
    state: BuildState = field(default_factory=BuildState)
    layers: list[str] = field(default_factory=list)
    written: int = 0
    _container: str = ""
    _process: ExecProcess | None = None
    _stopped: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _removing: threading.Lock = field(default_factory=threading.Lock)
    _done: threading.Event = field(default_factory=threading.Event)

    def execute(self) -> Iterator[str]:
        """Every step, then the tagged image; on any failure nothing is left behind."""
        watchdog = threading.Thread(target=self._watch, name="sandboxd-build-watch", daemon=True)
        watchdog.start()
        ok = False
        try:
            self.image = self.job.base
            self.state = BuildState.of_image(self.engine.image_config(self.job.base))
            for number, ins in enumerate(self.job.instructions, 1):
                self._check_stopped(ins)
                first_line = ins.text.splitlines()[0][:200]
                yield f"Step {number}/{len(self.job.instructions)} : {first_line}"
                if ins.keyword == "RUN":
                    yield from self._run(ins)
                elif ins.keyword in ("COPY", "ADD"):
                    self._copy(ins)
                else:
                    self.state.apply(ins)
            self._check_stopped(None)
            container = self._container_for(started=False)
            final = self._commit_in(container, {**self.job.labels, LABEL_BUILD: ""})
            self.engine.tag_image(final, self.job.tag)
            ok = True
            yield f"Successfully built {final[7:19]} as {self.job.tag}"
        finally:
            self._done.set()
            if not ok:
                self._remove_layers()

    # -- steps --------------------------------------------------------------

    def _run(self, ins: Instruction) -> Iterator[str]:
        argv = self.state.run_argv(ins)
        container = self._container_for(started=True)
        env = {**self.state.variables(), **self._proxy_env()}
        user = self.state.user or "0"
        if self.state.workdir != "/":
            self._exec(container, ["mkdir", "-p", "--", self.state.workdir], env, "0", "/")
        tail: list[str] = []
        process = self.engine.exec(
            container, argv, env=env, workdir=self.state.workdir, user=user, stdin=False
        )
        with self._lock:
            self._process = process
        try:
            pending = b""
            for _, data in process.output():
                pending += data
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace").rstrip()
                    tail = [*tail[-TAIL_LINES + 1 :], line]
                    yield f" ---> {line}"
            code = process.exit_code()
        finally:
            with self._lock:
                self._process = None
            process.close()
        self._check_stopped(ins)
        if code != 0:
            raise self._step_failed(ins, container, code, tail)
        self.written += self.engine.disk_usage(container)
        self._check_disk(ins)
        self._commit_in(container)

    def _copy(self, ins: Instruction) -> None:
        container = self._container_for(started=False)
        dest = expand(ins.args[-1], self.state.variables())
        path = posixpath.join(self.state.workdir, dest)
        into_dir = dest.endswith("/") or self.engine.is_directory(container, path)
        archive = copy_archive(ins, self.state, self.job.files, into_dir)
        self.written += len(archive)
        self._check_disk(ins)
        self.engine.put_archive(container, "/", archive)
        self._commit_in(container)

    def _exec(
        self, container: str, argv: list[str], env: dict[str, str], user: str, workdir: str
    ) -> None:
        process = self.engine.exec(
            container, argv, env=env, workdir=workdir, user=user, stdin=False
        )
        try:
            for _ in process.output():
                pass
        finally:
            process.close()

    def _step_failed(
        self, ins: Instruction, container: str, code: int | None, tail: list[str]
    ) -> BuildFailed:
        why = f"the command returned a non-zero code: {code}"
        sample = self.engine.sample(container)
        s = self.settings
        # 128 (or no code at all) is runsc's own answer when its sandbox went under the exec.
        gvisor_lost = s.runtime == "runsc" and code in (None, 128)
        if sample.oom_kills:
            why = f"out of memory (limit {format_size(s.memory_bytes)})"
        elif sample.pids_max_events:
            why = f"process limit ({s.pids}) reached; exit code {code}"
        elif gvisor_lost or not self.engine.container_running(container):
            # gVisor ends the whole sandbox at a limit; its own words name internal ids.
            why = (
                f"the build sandbox was ended, most likely by a limit (memory "
                f"{format_size(s.memory_bytes)}, {s.pids} processes)"
            )
            tail = []
        error = fail(ins, why)
        if tail:
            error = BuildFailed(f"{error.message}\n--- build log tail ---\n" + "\n".join(tail))
        return error

    def _check_disk(self, ins: Instruction) -> None:
        if self.written > self.settings.disk_bytes:
            raise fail(
                ins, f"the build wrote {format_size(self.written)}, above its disk limit of "
                f"{format_size(self.settings.disk_bytes)}"
            )  # fmt: skip

    def _proxy_env(self) -> dict[str, str]:
        if self.settings.network != "proxy":
            return {}
        url = f"http://{self.settings.proxy}"
        return {"http_proxy": url, "HTTP_PROXY": url}

    # -- containers and layers ----------------------------------------------

    def _container_for(self, *, started: bool) -> str:
        """A fresh build container on the image so far (the previous one is gone)."""
        self._drop_container()
        s = self.settings
        network = s.network != "none"
        spec = ContainerSpec(
            image=self.image,
            name=f"sandbox-build-{self.instance_id}-{uuid.uuid4().hex[:8]}",
            labels={**self.container_labels, LABEL_MANAGED: "1", LABEL_BUILD: self.instance_id},
            command=(),
            entrypoint=("sleep", "infinity"),
            env={},
            user=self.state.user,
            workdir="/",
            hostname="build",
            nano_cpus=s.nano_cpus,
            memory_bytes=s.memory_bytes,
            pids=s.pids,
            network=network,
            network_name=s.proxy_network if s.network == "proxy" else "",
            runtime=s.runtime,
            read_only=False,
            ulimits=s.ulimits,
            cap_add=BUILD_CAPABILITIES,
            start=started,
        )
        try:
            container = self.engine.create_container(spec)
        except NotFound as exc:
            if s.network == "proxy":
                raise BuildFailed(
                    f"the build network {s.proxy_network!r} is missing: {exc.message}; "
                    "scripts/host-setup.sh makes it when SANDBOX_BUILD_PROXY=1"
                ) from None
            raise
        with self._lock:
            self._container = container
            stopped = self._stopped
        if stopped:
            self._drop_container()
            self._check_stopped(None)
        return container

    def _commit_in(self, container: str, labels: Mapping[str, str] | None = None) -> str:
        """Commit the next layer. Until the final one (whose `labels` clear it), a layer
        names the instance building it, so what a crash leaves is found and reaped."""
        config = self.state.commit_config(labels or {LABEL_BUILD: self.instance_id})
        image = self.engine.commit(container, config)
        self.layers.append(image)
        self.image = image
        self._drop_container()
        return image

    def _drop_container(self) -> None:
        # One removal at a time: the layers are removed only once the watchdog's removal of
        # a container made from them has finished (an image in use cannot be removed).
        with self._removing:
            with self._lock:
                container, self._container = self._container, ""
            if not container:
                return
            try:
                self.engine.remove_container(container)
            except SandboxError as exc:
                log.warning("removing build container %s: %s", container[:12], exc)
                with self._lock:
                    if not self._container:
                        self._container = container  # the watchdog tries again

    def _remove_layers(self) -> None:
        self._drop_container()
        for image in reversed(self.layers):
            with contextlib.suppress(SandboxError):
                self.engine.remove_image(image)

    # -- deadline and cancellation ------------------------------------------

    def _watch(self) -> None:
        """Stop the build at its deadline or when the client goes away: the running
        step's container is removed, which ends the step and everything it started.
        Removal is retried until the build has noticed, so a slow engine cannot let a
        step run on."""
        deadline = time.monotonic() + self.settings.timeout_seconds
        while not self._done.wait(0.2):
            with self._lock:
                stopped = self._stopped
            if not stopped:
                if self.cancel is not None and self.cancel.is_set():
                    stopped = "cancelled"
                elif time.monotonic() >= deadline:
                    stopped = "deadline"
                else:
                    continue
                with self._lock:
                    self._stopped = stopped
                log.info("build of %s stopped: %s", self.job.tag, stopped)
            self._drop_container()
            with self._lock:
                process = self._process
            if process is not None:
                process.close()  # ends the step's output even if the engine keeps it open

    def _check_stopped(self, ins: Instruction | None) -> None:
        with self._lock:
            stopped = self._stopped
        where = f" during fragment line {ins.line}" if ins is not None else ""
        if stopped == "cancelled":
            raise Cancelled(f"build cancelled{where}: the client went away; nothing was kept")
        if stopped == "deadline":
            raise DeadlineExceeded(
                f"build deadline of {self.settings.timeout_seconds:g}s passed{where}; "
                "nothing was kept"
            )
