"""Runs one group of tests in sandboxes; called on the controller's pool threads.

Everything here talks to the service and posts plain results to the main
thread through `emit`; reports are deserialized and fired there, never here.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import secrets
import tarfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pytest_sandbox.collector import Collector, timeout_sections
from pytest_sandbox.coverage_data import CoverageSpec, data_from_tar, write_mapped
from pytest_sandbox.models import Group, GroupDone, ItemResult, Kept, Placement, RunSettings
from pytest_sandbox.outcome import describe_kill
from pytest_sandbox.progress import BuildFailures
from pytest_sandbox.reuse import REUSE_ENVIRONMENTS, BuiltEnvironments, reuse_key
from pytest_sandbox.snapshot import PROJECT, WORKER, Snapshot
from pytest_sandbox.spec import RouteSpec
from sandboxd import errors
from sandboxd.api import BuildResult, ExecResult, SandboxRequest, Stream, requested_limits
from sandboxd.client import SandboxClient

log = logging.getLogger(__name__)

# Interpreter start, pytest import and collection, on a busy machine.
STARTUP_SECONDS = 60.0
PER_TEST_GRACE = 6.0  # the worker's hard backstop fires 5 s after a test's timeout


class Registry:
    """Every sandbox the session made and has not destroyed yet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: set[str] = set()

    def add(self, sandbox_id: str) -> None:
        with self._lock:
            self._ids.add(sandbox_id)

    def discard(self, sandbox_id: str) -> None:
        with self._lock:
            self._ids.discard(sandbox_id)

    def destroy_all(self, client: SandboxClient) -> None:
        with self._lock:
            ids, self._ids = self._ids, set()
        for sandbox_id in ids:
            try:
                client.destroy_sandbox(sandbox_id)
            except errors.SandboxError as exc:
                log.warning("could not destroy sandbox %s: %s", sandbox_id, exc)


#: (build key, image number, images in the chain) -> the build's on_log callback.
WatchBuild = Callable[[tuple[str, str], int, int], Callable[[str], None]]


class ImageCache:
    """One build per (base, fragment) for the session, shared by all threads; a failed
    build is recorded once in `failures`, for one report per spec."""

    def __init__(
        self, client: SandboxClient, snapshot: Snapshot, watch: WatchBuild | None = None
    ) -> None:
        self._client = client
        self._snapshot = snapshot
        self._lock = threading.Lock()
        self._builds: dict[tuple[str, str], Future[BuildResult]] = {}
        self.watch = watch
        self.failures = BuildFailures()
        self._env_lock = threading.Lock()
        self._built = BuiltEnvironments()

    def get(self, spec: RouteSpec) -> BuildResult:
        """Raises: SandboxError (BuildFailed with the log tail) from the service."""
        with self._lock:
            future = self._builds.get(spec.build_key)
            owner = future is None
            if future is None:
                future = self._builds[spec.build_key] = Future()
        if owner:
            try:
                future.set_result(self._build(spec))
            except errors.SandboxError as exc:
                self.failures.add(spec.build_key, str(exc))
                future.set_exception(exc)
            except BaseException as exc:
                future.set_exception(exc)
        return future.result()

    def _build(self, spec: RouteSpec) -> BuildResult:
        """The project's image on the environment's: an earlier session's environment
        image when the fingerprint matches and the service still has it, else the
        environment's images in order (mostly cache hits), then the project's."""
        key = None
        # The shortcut stays off: in CI a session that took it built a project image with
        # another key than the chain's (a rebuild and an upload the chain would not make).
        if REUSE_ENVIRONMENTS and self._snapshot.env_fingerprint:
            key = reuse_key(self._snapshot.env_fingerprint, spec.image, spec.dockerfile)
            tag = self._built.get(key)
            if tag is not None:
                try:
                    return self._project(spec, tag, 1, 1)
                except errors.SandboxError as exc:
                    log.info("environment image %s is gone, building it again: %s", tag, exc)
        snap = self._environment()
        base = spec.image
        stages = snap.environment(spec.dockerfile)
        count = len(stages) + 1
        for number, (fragment, files) in enumerate(stages, 1):
            built = self._client.build_image(
                fragment,
                base=base,
                context_files=files,
                label="pytest-sandbox-env",
                on_log=self._watch(spec, number, count),
            )
            base = built.image.tag
        result = self._project(spec, base, count, count)
        if key is not None:
            self._built.put(key, base)
        return result

    def _project(self, spec: RouteSpec, base: str, number: int, count: int) -> BuildResult:
        return self._client.build_image(
            self._snapshot.fragment(),
            base=base,
            context_files=self._snapshot.context,
            label="pytest-sandbox",
            on_log=self._watch(spec, number, count),
        )

    def _environment(self) -> Snapshot:
        """The snapshot with its environment read, once for all threads.

        Raises:
            EnvironmentProblem: a distribution cannot be mirrored.
        """
        with self._env_lock:
            self._snapshot = self._snapshot.with_environment()
            return self._snapshot

    def _watch(self, spec: RouteSpec, number: int, count: int) -> Callable[[str], None] | None:
        return None if self.watch is None else self.watch(spec.build_key, number, count)


def read_capture_tar(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            f = tar.extractfile(member) if member.isfile() else None
            if f is not None and name in ("stdout", "stderr"):
                out[name] = f.read().decode("utf-8", "replace")
    return out


class GroupRunner:
    """Runs a group's tests, restarting in a fresh sandbox after a limit kill."""

    def __init__(
        self,
        client: SandboxClient,
        images: ImageCache,
        settings: RunSettings,
        registry: Registry,
        emit: Callable[[object], None],
        stop: threading.Event,
    ) -> None:
        self.client = client
        self.images = images
        self.settings = settings
        self.registry = registry
        self.emit = emit
        self.stop = stop
        self._destroyer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sandbox-rm")

    def run(self, group: Group) -> None:
        try:
            self._run(group)
        except Exception as exc:  # never a plugin traceback: the tests fail instead
            log.exception("sandbox group failed")
            if not self.stop.is_set():
                for nodeid in group.nodeids:
                    self.emit(ItemResult(nodeid, [], None, failure=f"sandbox error: {exc}"))
        finally:
            self.emit(GroupDone(group))

    def _fail_all(self, nodeids: list[str], message: str, placement: Placement | None) -> None:
        for nodeid in nodeids:
            self.emit(ItemResult(nodeid, [], placement, failure=message))

    def _run(self, group: Group) -> None:
        spec = group.spec
        try:
            build = self.images.get(spec)
        except errors.SandboxError:
            message = self.images.failures.test_message(spec.build_key)
            self._fail_all(list(group.nodeids), message, None)
            return
        pending = list(group.nodeids)
        while pending and not self.stop.is_set():
            try:
                sandbox = self.client.create_sandbox(self.sandbox_spec(build, spec, len(pending)))
            except errors.SandboxError as exc:
                self._fail_all(pending, f"could not create a sandbox: {exc}", None)
                return
            self.registry.add(sandbox.id)
            if self.stop.is_set():
                # Ctrl-C while it was being made: the session's sweep may already be over.
                self._destroy(sandbox.id)
                return
            placement = Placement(
                sandbox.id, sandbox.container_id, sandbox.image_digest or build.image.digest
            )
            kept = False
            try:
                pending, failed = self._attempt(group, pending, placement)
                if failed and self.settings.keep_failed and not self.stop.is_set():
                    kept = True
                    self.emit(Kept(sandbox.container_id, tuple(failed), sandbox.id))
            finally:
                if kept:
                    # Out of the registry, or the session's final sweep would remove it.
                    self.registry.discard(sandbox.id)
                else:
                    self._release(sandbox.id)

    def _release(self, sandbox_id: str) -> None:
        """Destroy off this thread, so the next group need not wait for the engine's rm;
        on this thread once `close` has shut the destroyer down (Ctrl-C, -x)."""
        try:
            self._destroyer.submit(self._destroy, sandbox_id)
        except RuntimeError:  # cannot schedule new futures after shutdown
            self._destroy(sandbox_id)

    def _destroy(self, sandbox_id: str) -> None:
        try:
            self.client.destroy_sandbox(sandbox_id)
        # ValueError: grpc's closed channel, when the session ended first (Ctrl-C).
        except (errors.SandboxError, ValueError) as exc:
            log.warning("could not destroy sandbox %s: %s", sandbox_id, exc)
        finally:
            self.registry.discard(sandbox_id)

    def close(self) -> None:
        """Wait for pending destroys."""
        self._destroyer.shutdown(wait=True)

    def sandbox_spec(self, build: BuildResult, spec: RouteSpec, count: int) -> SandboxRequest:
        env = dict(self.settings.env)
        env.update(spec.env)
        return SandboxRequest(
            image=build.image.key or build.image.tag,
            limits=requested_limits(
                cpus=spec.cpus,
                memory_bytes=spec.memory,
                pids=spec.pids,
                network=spec.network,
                timeout_seconds=self._deadline(spec, count),
            ),
            env=env,
            runtime=spec.runtime,
            profile=spec.profile,
            mounts=spec.mounts,
            ttl_seconds=min(
                self._deadline(spec, count) + 300.0, self.client.server_info().caps.ttl_seconds
            ),
            labels=dict(self.settings.labels),
            # The worker starts (and imports pytest) as soon as the container is up, or
            # even earlier in the service's warm pool; the exec below attaches to it.
            preload_argv=("python3", WORKER),
        )

    def _deadline(self, spec: RouteSpec, count: int) -> float:
        """The exec's backstop; the worker's per-test watchdog normally acts long before.
        Asking past the server's cap is refused, never lowered, so stay under it."""
        cap = self.client.server_info().caps.timeout_seconds
        if self.settings.post_mortem:
            return cap  # a person at a pdb prompt takes longer than any test
        return min(STARTUP_SECONDS + count * (spec.timeout + PER_TEST_GRACE), cap)

    def _attempt(
        self, group: Group, pending: list[str], placement: Placement
    ) -> tuple[list[str], list[str]]:
        """One worker run; returns (tests left to run elsewhere, tests that failed)."""
        nonce = secrets.token_hex(16)
        capture_dir = f"/tmp/.pytest-sandbox-{nonce}"
        collector = Collector(nonce, pending, placement, self.settings, self.emit)

        def on_output(stream: Stream, data: bytes) -> None:
            (collector.feed if stream == "stdout" else collector.log)(data)

        result: ExecResult | None = None
        error = ""
        try:
            result = self.client.exec(
                placement.sandbox_id,
                [],
                attach_preload=True,
                stdin=self._request(group, pending, nonce, capture_dir),
                timeout=self._deadline(group.spec, len(pending)),
                on_output=on_output,
            )
        except errors.SandboxError as exc:
            error = str(exc)
        if self.stop.is_set():
            return [], []
        if self.settings.coverage is not None:
            self._take_coverage(self.settings.coverage, placement.sandbox_id, capture_dir)
        message = describe_kill(
            result,
            group.spec,
            error=error,
            elapsed=collector.elapsed(),
            watchdog_timeout=collector.watchdog_seconds(),
        )
        return collector.settle(message, functools.partial(self._recovered, placement, capture_dir))

    def _request(self, group: Group, pending: list[str], nonce: str, capture_dir: str) -> bytes:
        """The worker's request; one line, as a preloaded worker's stdin may stay open."""
        request = {
            "nonce": nonce,
            "args": list(self.settings.args),
            "files": list(group.files),
            "nodeids": pending,
            "cwd": self.settings.cwd,
            "capture_dir": capture_dir,
            "timeout": group.spec.timeout,
            "fork": group.spec.forks,
            "recycle_after": self.settings.recycle_after,
            "deadline": self._deadline(group.spec, len(pending)),
        }
        if self.settings.debug:
            request["debug"] = True
        if self.settings.coverage is not None:
            request["coverage"] = self.settings.coverage.worker_options(capture_dir)
        return json.dumps(request).encode() + b"\n"

    def _take_coverage(self, spec: CoverageSpec, sandbox_id: str, capture_dir: str) -> None:
        """Bring the worker's coverage data back as a parallel file beside the host's, for
        pytest-cov's combine; a worker killed before saving it measured nothing to bring."""
        try:
            data = data_from_tar(self.client.get_files(sandbox_id, f"{capture_dir}/.coverage"))
            if data is not None:
                tag = f"{sandbox_id}.{secrets.token_hex(4)}"
                write_mapped(data, PROJECT, spec.host_root, spec.data_file, tag)
        except (errors.SandboxError, tarfile.TarError, OSError) as exc:
            log.warning("no coverage data from %s: %s", sandbox_id, exc)

    def _recovered(
        self, placement: Placement, capture_dir: str, timeout: Mapping[str, Any] | None
    ) -> list[tuple[str, str]]:
        """What the killed test printed before the kill, read back from the sandbox."""
        if timeout is not None:
            return timeout_sections(timeout)
        try:
            captured = read_capture_tar(self.client.get_files(placement.sandbox_id, capture_dir))
        except (errors.SandboxError, tarfile.TarError) as exc:
            log.debug("no captured output from %s: %s", placement.sandbox_id, exc)
            return []
        return [(f"Captured {k}", v) for k, v in captured.items() if v]
