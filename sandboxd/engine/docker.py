"""The Docker Engine adapter: the only module that imports docker-py.

Size: longer than the house's ~450 lines on purpose: keeping docker-py in one module means the
engine calls, the exec stream (`DockerExec`) and the kill paths that need both live here.
Host cgroup and /proc reading is in `sandboxd.cgroups`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.utils.socket import frames_iter
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from sandboxd import cgroups
from sandboxd.engine.base import BindMount, CgroupSample, ContainerInfo, ContainerSpec, ImageFacts
from sandboxd.engine.inside import KILL_SCRIPT, KILL_SLACK_SECONDS, RUNSC_NOISE, scrub
from sandboxd.errors import (
    EngineUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SandboxError,
)

log = logging.getLogger(__name__)
#: How long killing an exec's processes from inside the sandbox may take.
KILL_WAIT_SECONDS = 5.0
T = TypeVar("T")
#: Size of the tmpfs over an image's VOLUME path when the container asks for no scratch.
VOLUME_TMPFS_BYTES = 64 * 1024 * 1024
#: Environment variable that marks every process of one exec, so they can be found inside.
EXEC_TAG = "SANDBOXD_EXEC"

#: How the engine's own message starts when the runtime could not start an exec's command.
_START_FAILED = b"OCI runtime exec failed"
_START_REASON = re.compile(r'exec: (".*?"): (.*?)(?:: unknown)?$')

_CONNECTION_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    ConnectionError,
    socket.timeout,
)


def _labels(inspected: Mapping[str, Any]) -> dict[str, str]:
    """An image's labels from its `inspect` answer."""
    return dict((inspected.get("Config") or {}).get("Labels") or {})


class DockerEngine:
    """Talks to one Docker Engine; measures containers through their cgroups when local."""

    def __init__(self, base_url: str | None = None, timeout: float = 120.0) -> None:
        self.base_url = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self._timeout = timeout
        self._api: docker.APIClient | None = None
        # Re-entrant: `api` reports a failed connect through `_unavailable`, which takes it too.
        self._lock = threading.RLock()
        self._pids: dict[str, int] = {}
        self._cgroup_paths: dict[str, dict[str, Path]] = {}
        #: container id -> tags of its execs not yet closed (their processes are spared).
        self._live_tags: dict[str, set[str]] = {}
        self._kill_locks: dict[str, threading.Lock] = {}

    # -- plumbing -----------------------------------------------------------

    @property
    def api(self) -> docker.APIClient:
        with self._lock:
            if self._api is None:
                try:
                    self._api = docker.APIClient(
                        base_url=self.base_url, version="auto", timeout=self._timeout
                    )
                except docker.errors.DockerException as exc:
                    raise self._unavailable(exc) from None
            return self._api

    def _unavailable(self, exc: BaseException) -> EngineUnavailable:
        with self._lock:
            self._api = None  # reconnect (and renegotiate the version) next time
        return EngineUnavailable(
            f"cannot reach the Docker engine at {self.base_url} ({type(exc).__name__}); "
            "is dockerd running? (scripts/host-setup.sh starts it)"
        )

    def _call(self, fn: Callable[[], T]) -> T:
        """Run one engine call, turning connection failures into EngineUnavailable."""
        try:
            return fn()
        except docker.errors.NotFound as exc:
            raise NotFound(_explain(exc)) from None
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from None
        except docker.errors.APIError as exc:
            # The engine refused what we passed on from a client (e.g. a malformed image
            # reference): that is the client's input, not an engine failure.
            if exc.status_code == 400:
                raise InvalidArgument(f"the container engine refused it: {_explain(exc)}") from None
            if exc.status_code == 409:
                raise FailedPrecondition(
                    f"the container engine refused it: {_explain(exc)}"
                ) from None
            raise SandboxError(f"container engine error: {_explain(exc)}") from None
        except docker.errors.DockerException as exc:
            if "Connection" in str(exc) or "connection" in str(exc):
                raise self._unavailable(exc) from None
            raise SandboxError(f"container engine error: {_explain(exc)}") from None

    def _safe(self, fn: Callable[[], T]) -> T:
        """`_call` for idempotent calls, retried briefly on a lost engine."""
        retry = Retrying(
            retry=retry_if_exception_type(EngineUnavailable),
            stop=stop_after_attempt(3),
            wait=wait_exponential(multiplier=0.2, max=1.0),
            reraise=True,
        )
        return retry(lambda: self._call(fn))

    def ping(self) -> None:
        self._safe(lambda: self.api.ping())

    def runtimes(self) -> set[str]:
        info = self._safe(lambda: self.api.info())
        return set((info.get("Runtimes") or {}).keys()) | {"runc"}

    def version(self) -> str:
        return str(self._safe(lambda: self.api.version()).get("Version", ""))

    # -- images -------------------------------------------------------------

    def image_id(self, ref: str) -> str | None:
        try:
            data = self._safe(lambda: self.api.inspect_image(ref))
        except NotFound:
            return None
        return str(data["Id"])

    def image_labels(self, ref: str) -> Mapping[str, str]:
        return _labels(self._safe(lambda: self.api.inspect_image(ref)))

    def image_facts(self, ref: str) -> ImageFacts | None:
        try:
            data = self._safe(lambda: self.api.inspect_image(ref))
        except NotFound:
            return None
        return ImageFacts(str(data["Id"]), _labels(data), int(data.get("Size") or 0))

    def image_config(self, ref: str) -> Mapping[str, Any]:
        data = self._safe(lambda: self.api.inspect_image(ref))
        return dict(data.get("Config") or {})

    def put_archive(self, container_id: str, path: str, data: bytes) -> None:
        if not self._call(lambda: self.api.put_archive(container_id, path, data)):
            raise SandboxError(f"the engine did not unpack the files at {path}")

    def is_directory(self, container_id: str, path: str) -> bool:
        try:
            stream, stat = self._call(lambda: self.api.get_archive(container_id, path))
        except NotFound:
            return False
        with contextlib.suppress(Exception):
            stream.close()  # only the path's stat header was wanted
        return bool(int(stat.get("mode", 0)) & (1 << 31))  # Go's os.ModeDir

    def commit(self, container_id: str, config: Mapping[str, Any]) -> str:
        answer = self._call(lambda: self.api.commit(container_id, conf=dict(config)))
        return str(answer["Id"])

    def tag_image(self, image_id: str, tag: str) -> None:
        repo, _, version = tag.rpartition(":")
        self._call(lambda: self.api.tag(image_id, repo, version))

    def disk_usage(self, container_id: str) -> int:
        found = self._safe(
            lambda: self.api.containers(all=True, size=True, filters={"id": container_id})
        )
        return int(found[0].get("SizeRw") or 0) if found else 0

    def import_image(
        self, fileobj: IO[bytes], tag: str, labels: Mapping[str, str], changes: list[str]
    ) -> str:
        repo, _, version = tag.partition(":")
        label_changes = [f'LABEL "{k}"="{v}"' for k, v in labels.items()]
        self._call(
            lambda: self.api.import_image(
                src=fileobj,
                repository=repo,
                tag=version or "latest",
                changes=[*changes, *label_changes],
            )
        )
        image = self.image_id(tag)
        if image is None:
            raise SandboxError(f"importing {tag} produced no image")
        return image

    def save_image(self, ref: str) -> bytes:
        """The image as a `docker save` tar, to load into another engine (no registry)."""
        return b"".join(self._call(lambda: self.api.get_image(ref)))

    def load_image(self, data: bytes) -> None:
        """Load a `docker save` tar; the image keeps its id and tags."""
        self._call(lambda: list(self.api.load_image(data)))

    def remove_image(self, ref: str) -> None:
        with contextlib.suppress(NotFound):
            self._call(lambda: self.api.remove_image(ref, force=True, noprune=False))

    def list_images(self, label: str) -> list[tuple[str, list[str], Mapping[str, str], int]]:
        images = self._safe(lambda: self.api.images(filters={"label": label}))
        return [
            (
                str(i["Id"]),
                list(i.get("RepoTags") or []),
                dict(i.get("Labels") or {}),
                int(i.get("Size") or 0),
            )
            for i in images
        ]

    def dangling_images(self, label: str) -> list[tuple[str, Mapping[str, str]]]:
        filters = {"label": label, "dangling": True}
        images = self._safe(lambda: self.api.images(filters=filters))
        return [(str(i["Id"]), dict(i.get("Labels") or {})) for i in images]

    # -- containers ---------------------------------------------------------

    def _volumes(self, image: str) -> list[str]:
        """The paths an image declares as VOLUME: each would get an anonymous volume on the
        engine's disk, outside the read-only root and every size limit."""
        data = self._safe(lambda: self.api.inspect_image(image))
        return sorted((data.get("Config") or {}).get("Volumes") or {})

    def _tmpfs(self, spec: ContainerSpec) -> dict[str, str]:
        """The spec's scratch mounts, plus one over each VOLUME the image declares: a tmpfs
        the size of /tmp's scratch at its path is what keeps the engine from making an
        anonymous volume on its own disk."""
        scratch = dict(spec.scratch)
        size = scratch.get("/tmp") or max(scratch.values(), default=VOLUME_TMPFS_BYTES)
        bound = {b.target for b in spec.binds}
        for path in self._volumes(spec.image):
            if path not in bound:  # a host mount there already keeps the volume away
                scratch.setdefault(path, size)
        # `exec` explicitly: Docker's tmpfs default is noexec, and sandboxes exist to run
        # what was uploaded or compiled into the scratch. nosuid and nodev stay.
        return {
            path: f"rw,exec,nosuid,nodev,size={size},mode=1777"
            if path == "/tmp"
            else f"rw,exec,nosuid,nodev,size={size},{self._tmpfs_owner(spec.user)},mode=755"
            for path, size in scratch.items()
        }

    def create_container(self, spec: ContainerSpec) -> str:
        api = self.api
        tmpfs = self._tmpfs(spec)
        host_config = api.create_host_config(
            nano_cpus=spec.nano_cpus,
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,  # equal to the limit: no swap
            pids_limit=spec.pids,
            network_mode=(spec.network_name or "bridge") if spec.network else "none",
            cap_drop=["ALL"],
            cap_add=list(spec.cap_add) or None,
            security_opt=["no-new-privileges:true"],
            read_only=spec.read_only,
            tmpfs=tmpfs,
            init=True,
            runtime=spec.runtime,
            ulimits=[
                docker.types.Ulimit(name=name, soft=soft, hard=hard)
                for name, (soft, hard) in spec.ulimits.items()
            ],
            ipc_mode="private",
            **self._host_mounts(spec),
        )
        created = self._call(
            lambda: api.create_container(
                spec.image,
                command=list(spec.command),
                entrypoint=list(spec.entrypoint) if spec.entrypoint is not None else None,
                user=spec.user,
                environment=dict(spec.env),
                working_dir=spec.workdir,
                hostname=spec.hostname,
                labels=dict(spec.labels),
                host_config=host_config,
                name=spec.name,
                network_disabled=not spec.network,
            )
        )
        container_id = str(created["Id"])
        if not spec.start:
            return container_id
        try:
            self._call(lambda: api.start(container_id))
        except BaseException:
            with contextlib.suppress(SandboxError):
                self.remove_container(container_id)
            raise
        return container_id

    def _host_mounts(self, spec: ContainerSpec) -> dict[str, Any]:
        """The host config's arguments for the spec's host directories."""
        return {"mounts": [_bind_volume(b, spec.labels) for b in spec.binds] or None}

    def _tmpfs_owner(self, user: str) -> str:
        """The tmpfs option that gives a scratch mount to the sandbox's user."""
        return f"uid={_uid(user)},gid={_gid(user)}"

    def remove_container(self, container_id: str) -> None:
        with self._lock:
            self._kill_locks.pop(container_id, None)
            self._live_tags.pop(container_id, None)
        self._pids.pop(container_id, None)
        self._cgroup_paths.pop(container_id, None)
        try:
            self._safe(lambda: self.api.remove_container(container_id, force=True, v=True))
        except NotFound:
            pass
        except SandboxError as exc:
            if "already in progress" not in str(exc):  # someone else is removing it: fine
                raise

    def rename_container(self, container_id: str, name: str) -> None:
        self._safe(lambda: self.api.rename(container_id, name))

    def kill_container(self, container_id: str) -> None:
        with contextlib.suppress(NotFound, SandboxError):
            self._call(lambda: self.api.kill(container_id))

    def container_state(self, container_id: str) -> Mapping[str, Any]:
        data = self._safe(lambda: self.api.inspect_container(container_id))
        return dict(data.get("State") or {})

    def container_running(self, container_id: str) -> bool:
        try:
            return bool(self.container_state(container_id).get("Running"))
        except NotFound:
            return False

    def list_containers(self, label: str) -> list[ContainerInfo]:
        found = self._safe(lambda: self.api.containers(all=True, filters={"label": label}))
        return [
            ContainerInfo(
                id=str(c["Id"]),
                name=str((c.get("Names") or ["?"])[0]).lstrip("/"),
                labels=dict(c.get("Labels") or {}),
                status=str(c.get("State") or ""),
                created_unix=float(c.get("Created") or 0),
            )
            for c in found
        ]

    # -- exec ---------------------------------------------------------------

    def exec(
        self,
        container_id: str,
        argv: list[str],
        *,
        env: Mapping[str, str],
        workdir: str,
        user: str,
        stdin: bool,
        tty: bool = False,
        window: tuple[int, int] | None = None,
    ) -> DockerExec:
        api = self.api
        tag = uuid.uuid4().hex
        if tty and window is not None:
            argv = _sized(argv, *window)
        created = self._call(
            lambda: api.exec_create(
                container_id,
                argv,
                stdin=stdin or tty,
                stdout=True,
                stderr=True,
                tty=tty,
                environment={**env, EXEC_TAG: tag},
                workdir=workdir or None,
                user=user,
            )
        )
        exec_id = str(created["Id"])
        started = time.monotonic()
        sock = self._call(lambda: api.exec_start(exec_id, socket=True, tty=tty))
        self._track(container_id, tag, live=True)
        proc = DockerExec(
            self, container_id, exec_id, sock, tag=tag, user=user, tty=tty, started=started
        )
        if tty and window is not None:
            proc.resize(*window)
        return proc

    def resize_exec(self, exec_id: str, rows: int, columns: int) -> None:
        """Set an exec's terminal size; an exec that already ended is left alone."""
        with contextlib.suppress(NotFound, FailedPrecondition):
            self._call(lambda: self.api.exec_resize(exec_id, height=rows, width=columns))

    def signal_exec(self, container_id: str, tag: str, user: str, signum: int) -> None:
        """Send `signum` to an exec's main process, from inside the container: the tagged
        process whose parent is not tagged (its parent is outside the container's view).
        From inside, so it works the same under gVisor and against a remote engine."""
        script = (
            "for d in /proc/[0-9]*; do "
            f"grep -qsa {EXEC_TAG}={tag} $d/environ || continue; "
            "p=$(sed -n 's/^PPid:[[:space:]]*//p' $d/status); "
            f"grep -qsa {EXEC_TAG}={tag} /proc/$p/environ 2>/dev/null || "
            f"kill -{int(signum)} ${{d#/proc/}} 2>/dev/null; "
            "done; echo signalled"
        )
        created = self._call(
            lambda: self.api.exec_create(container_id, ["sh", "-c", script], user=user)
        )
        sock = self._call(lambda: self.api.exec_start(str(created["Id"]), socket=True))
        _read_until(sock, b"signalled", KILL_WAIT_SECONDS)

    def kill_tagged(self, container_id: str, tag: str, user: str, since: float) -> None:
        """Kill, from inside, every process the exec tagged `tag` started.

        Under gVisor an exec's processes are not host processes, and under either runtime a
        process that left the exec's tree (setsid, double fork) and dropped its environment
        (execve with an empty one) carries neither the tag nor a parent to find it by. So
        besides the tagged processes this kills every process that started after the exec
        (host monotonic `since`) and does not descend from another live exec (the sandbox's
        preloaded worker included): pid 1, the container's command and what earlier execs
        left running are older, and other execs are known by their tags.
        """
        with self._lock:
            # One kill at a time per container: a second one would see the first's script
            # as a new process of nobody's, and kill it.
            serial = self._kill_locks.setdefault(container_id, threading.Lock())
        with serial:
            self._kill_inside(container_id, tag, user, since)

    def _kill_inside(self, container_id: str, tag: str, user: str, since: float) -> None:
        with self._lock:
            keep = sorted(self._live_tags.get(container_id, set()) - {tag})
        argv = ["sh", "-c", KILL_SCRIPT, "sandboxd-kill", tag, "|".join(keep)]
        try:
            created = self._call(
                lambda: self.api.exec_create(container_id, argv, user=user, stdin=True)
            )
            kill_id = str(created["Id"])
            sock = self._call(lambda: self.api.exec_start(kill_id, socket=True))
            # How long ago the exec started, told once the script runs: counted back from the
            # script's own start, it can only reach further back than the exec, never less
            # far (a throttled sandbox may start the script seconds late).
            ago = max(0, int((time.monotonic() - since + KILL_SLACK_SECONDS) * 100))
            raw: socket.socket | None = getattr(sock, "_sock", None)
            with contextlib.suppress(OSError):
                if raw is not None:
                    raw.sendall(f"{ago}\n".encode())
            # The script's own word says it is done: under gVisor a finished exec can be
            # reported as running for many seconds, and an attached start can wait forever
            # on a wedged sandbox, so neither the exec's state nor its end is waited for.
            if _read_until(sock, b"killed", KILL_WAIT_SECONDS):
                return
            log.warning(
                "killing inside %s did not finish; killing the container", container_id[:12]
            )
            self.kill_container(container_id)
        except SandboxError as exc:
            log.debug("killing tagged processes in %s: %s", container_id[:12], exc)

    def _track(self, container_id: str, tag: str, live: bool) -> None:
        """Keep the tags of the execs still open in each container (see `kill_tagged`)."""
        with self._lock:
            tags = self._live_tags.setdefault(container_id, set())
            if live:
                tags.add(tag)
            else:
                tags.discard(tag)
                if not tags:
                    del self._live_tags[container_id]

    # -- measurements -------------------------------------------------------

    def _init_pid(self, container_id: str) -> int:
        pid = self._pids.get(container_id)
        if pid is None:
            pid = int(self.container_state(container_id).get("Pid") or 0)
            self._pids[container_id] = pid
        return pid

    def _cgroup_dirs(self, container_id: str) -> dict[str, Path]:
        """Controller name -> the container's cgroup dir on this host ("" for v2)."""
        dirs = self._cgroup_paths.get(container_id)
        if dirs is None:
            dirs = cgroups.cgroup_dirs(self._init_pid(container_id))
            self._cgroup_paths[container_id] = dirs
        return dirs

    def sample(self, container_id: str) -> CgroupSample:
        sample = cgroups.sample(self._cgroup_dirs(container_id))
        if sample is None:
            sample = self._sample_stats(container_id)
        if sample.oom_kills is None:
            sample = self._with_dead_oom(container_id, sample)
        return sample

    def _with_dead_oom(self, container_id: str, sample: CgroupSample) -> CgroupSample:
        """A container killed as a whole (gVisor's sandbox process at its memory limit) takes
        its cgroup with it; the engine still records that the kill was for memory."""
        try:
            state = self._settled_state(container_id)
        except SandboxError:
            return sample
        if state.get("Running"):
            return sample
        return replace(sample, oom_kills=1 if state.get("OOMKilled") else 0)

    def _settled_state(self, container_id: str) -> Mapping[str, Any]:
        """The container's state; while its cgroup is already gone but the engine still says
        it runs (gVisor's sandbox process was just killed), ask again for up to 2 s, or the
        memory kill would read as a crash."""
        state = self.container_state(container_id)
        dirs = self._cgroup_paths.get(container_id) or {}
        for _ in range(20):
            if not state.get("Running") or not dirs or any(p.is_dir() for p in dirs.values()):
                break
            time.sleep(0.1)
            state = self.container_state(container_id)
        return state

    def _sample_stats(self, container_id: str) -> CgroupSample:
        """Fallback through the stats API when the cgroup files are not ours to read."""
        try:
            stats = self._call(lambda: self.api.stats(container_id, stream=False))
        except (SandboxError, ValueError):
            # ValueError: a container removed meanwhile (its sandbox destroyed under a
            # running command) can answer with an empty body instead of JSON.
            return CgroupSample()
        mem = stats.get("memory_stats") or {}
        cpu = (stats.get("cpu_stats") or {}).get("cpu_usage") or {}
        return CgroupSample(
            cpu_ns=int(cpu["total_usage"]) if "total_usage" in cpu else None,
            memory_peak_bytes=int(mem["max_usage"]) if "max_usage" in mem else None,
        )

    def reset_peak(self, container_id: str) -> None:
        cgroups.reset_peak(self._cgroup_dirs(container_id))

    def kill_exec_tree(self, container_id: str, exec_id: str) -> bool:
        """Kill an exec'd process and its descendants from the host; False if impossible."""
        try:
            info = self._call(lambda: self.api.exec_inspect(exec_id))
        except SandboxError:
            return False
        if not info.get("Running"):
            return True  # already ended: nothing to kill, and the container must be spared
        pid = int(info.get("Pid") or 0)
        if not cgroups.process_exists(pid):
            # Gone between the two looks (it ended), or never visible here (a remote
            # engine): the container's own init tells which.
            return cgroups.process_exists(self._init_pid(container_id))
        # Several passes: a forking process may add children while we kill.
        for _ in range(10):
            victims = cgroups.descendants(pid)
            if not victims:
                return True
            for victim in victims:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(victim, signal.SIGKILL)
            time.sleep(0.01)
        return True


class DockerExec:
    """One running `docker exec`, its multiplexed output read from the hijacked socket."""

    def __init__(
        self,
        engine: DockerEngine,
        container_id: str,
        exec_id: str,
        sock: Any,
        *,
        tag: str = "",
        user: str = "",
        tty: bool = False,
        started: float = 0.0,
    ) -> None:
        self._engine = engine
        self._tty = tty
        self._tag = tag
        self._started = started or time.monotonic()
        self._user = user
        self.container_id = container_id
        self.exec_id = exec_id
        self._sock = sock
        self._raw: socket.socket | None = getattr(sock, "_sock", None)
        self._killed = False
        self._start_failure: str | None = None

    def write_stdin(self, data: bytes) -> None:
        if self._raw is not None:
            self._raw.sendall(data)
        else:
            self._sock.write(data)

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            if self._raw is not None:
                self._raw.shutdown(socket.SHUT_WR)

    def output(self) -> Iterator[tuple[int, bytes]]:
        # When the runtime cannot start the command, the engine writes its own error to the
        # exec's stdout and reports 126. A first chunk that looks like that is held until
        # the end: if no process ever ran (pid 0), it is the engine's, not the command's.
        held = b""
        first = True
        try:
            for stream, data in frames_iter(self._sock, tty=self._tty):
                if data and stream == 2:
                    data = RUNSC_NOISE.sub(b"", bytes(data))
                if not data:
                    continue
                if first and stream == 1 and bytes(data).startswith(_START_FAILED):
                    held = bytes(data)
                elif held:
                    yield 1, held
                    held = b""
                first = False
                if not held:
                    yield int(stream), bytes(data)
        except (OSError, ValueError):
            pass
        if held and self._never_started():
            self._start_failure = _start_failure(held)
        elif held:
            yield 1, held

    def _never_started(self) -> bool:
        try:
            info = self._engine._call(lambda: self._engine.api.exec_inspect(self.exec_id))
        except SandboxError:
            return False
        return not info.get("Running") and not info.get("Pid")

    def start_failure(self) -> str | None:
        return self._start_failure

    def exit_code(self) -> int | None:
        if self._start_failure is not None:
            # The engine says 126 for both; a shell says 127 for a command it cannot find.
            missing = "not found" in self._start_failure or "no such file" in self._start_failure
            return 127 if missing else 126
        for _ in range(100):
            try:
                info = self._engine._call(lambda: self._engine.api.exec_inspect(self.exec_id))
            except NotFound:
                return None  # the container died (e.g. gVisor's sandbox was OOM-killed)
            if not info.get("Running"):
                code = info.get("ExitCode")
                return int(code) if code is not None else None
            time.sleep(0.01)
        return None

    def resize(self, rows: int, columns: int) -> None:
        self._engine.resize_exec(self.exec_id, rows, columns)

    def signal(self, signum: int) -> None:
        self._engine.signal_exec(self.container_id, self._tag, self._user, signum)

    def kill(self) -> None:
        if self._killed:
            return  # a second kill would find the process gone and kill the whole container
        self._killed = True
        if not self._engine.kill_exec_tree(self.container_id, self.exec_id):
            # Not local (remote engine): the only sure way is to kill the container.
            self._engine.kill_container(self.container_id)
        elif self._tag:
            self._engine.kill_tagged(self.container_id, self._tag, self._user, self._started)

    def close(self) -> None:
        # Shut down first: that wakes a thread still blocked reading the output (a build
        # stopped from its watchdog), which a close alone does not; the engine does not
        # always end the stream when a gVisor container is removed under it.
        if self._raw is not None:
            with contextlib.suppress(OSError):
                self._raw.shutdown(socket.SHUT_RDWR)
        if self._tag:
            self._engine._track(self.container_id, self._tag, live=False)
        # Closing the SocketIO wrapper alone leaves the socket's fd open until the
        # garbage collector finds the HTTP response that still refers to it.
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._raw is not None:
            with contextlib.suppress(OSError):
                self._raw.close()
        response = getattr(self._sock, "_response", None)
        if response is not None:
            with contextlib.suppress(Exception):
                response.close()


def _read_until(sock: Any, word: bytes, seconds: float) -> bool:
    """Whether `word` arrives on an exec's output within `seconds`; the socket is closed."""
    raw: socket.socket | None = getattr(sock, "_sock", None)
    seen = b""
    deadline = time.monotonic() + seconds
    try:
        while raw is not None and time.monotonic() < deadline:
            raw.settimeout(max(0.05, deadline - time.monotonic()))
            data = raw.recv(4096)
            if not data:
                break
            seen = (seen + data)[-256:]
            if word in seen:
                return True
    except (OSError, ValueError):
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    return word in seen


def _sized(argv: list[str], rows: int, columns: int) -> list[str]:
    """`argv` run after its terminal is given its size. The engine's API (before 1.42) has
    no initial console size: a resize only lands after the command started, and a program
    that reads its size at once (`stty size`, a shell's line editor) would see 0 x 0."""
    script = f'stty rows {int(rows)} cols {int(columns)} 2>/dev/null; exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *argv]


def _start_failure(engine_text: bytes) -> str:
    """The engine's "OCI runtime exec failed: ... exec: "x": permission denied: unknown"
    as a sentence about the command."""
    text = scrub(engine_text.decode("utf-8", "replace"))
    match = _START_REASON.search(text)
    if match is None:
        return f"the command could not be started: {text[:300]}"
    return f"cannot run {match.group(1)}: {match.group(2)}"


def _bind_volume(bind: BindMount, labels: Mapping[str, str]) -> docker.types.Mount:
    """A host directory as an anonymous `local` volume with mount options, where a plain bind
    takes only read-only: a read-only one is mounted ro,nosuid,nodev (seen from inside). The
    local driver applies the other flags only with its read-only remount, so a writable one
    relies on no-new-privileges and the dropped capabilities (no setuid, no mknod) instead.
    The volume goes with its container (`v=True`); the engine unmounts it first and leaves
    the host directory's content alone."""
    options = "bind,nosuid,nodev" + (",ro" if bind.read_only else "")
    return docker.types.Mount(
        target=bind.target,
        source="",
        type="volume",
        labels={k: v for k, v in labels.items() if k.startswith("sandbox.")},
        driver_config=docker.types.DriverConfig(
            "local", {"type": "none", "device": bind.source, "o": options}
        ),
    )


def _explain(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return scrub(str(explanation or exc))


def _uid(user: str) -> str:
    return user.split(":")[0]


def _gid(user: str) -> str:
    parts = user.split(":")
    return parts[1] if len(parts) > 1 else parts[0]
