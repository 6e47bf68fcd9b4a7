"""Runs one group of tests in sandboxes; called on the controller's pool threads.

Everything here talks to the service and posts plain results to the main
thread through `emit`; reports are deserialized and fired there, never here.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pytest_sandbox.outcome import describe_kill
from pytest_sandbox.records import RecordReader, Tail
from pytest_sandbox.snapshot import WORKER, Snapshot
from pytest_sandbox.spec import SandboxSpec
from sandboxd import errors
from sandboxd._proto.sandbox.v1 import sandbox_pb2 as pb
from sandboxd.client import BuildResult, SandboxClient

log = logging.getLogger(__name__)

# Interpreter start, pytest import and collection, on a busy machine.
STARTUP_SECONDS = 60.0
PER_TEST_GRACE = 6.0  # the worker's hard backstop fires 5 s after a test's timeout
# The service's default caps; asking for more is refused, never lowered.
MAX_EXEC_SECONDS = 3600.0
MAX_TTL_SECONDS = 6 * 3600.0


@dataclass(frozen=True)
class Group:
    """Tests that share one sandbox at a time, in collection order."""

    spec: SandboxSpec
    nodeids: tuple[str, ...]
    files: tuple[str, ...]  # rootdir-relative paths handed to the worker's pytest


@dataclass(frozen=True)
class Placement:
    """Where a test ran: recorded on its reports."""

    sandbox_id: str
    container_id: str
    image_digest: str


@dataclass
class ItemResult:
    nodeid: str
    reports: list[dict[str, Any]]
    placement: Placement | None
    failure: str | None = None  # why the sandbox could not finish the test
    sections: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Kept:
    container_id: str
    nodeids: tuple[str, ...]
    sandbox_id: str = ""


@dataclass(frozen=True)
class GroupDone:
    group: Group


@dataclass(frozen=True)
class RunSettings:
    args: tuple[str, ...]  # the worker's pytest arguments, before the files
    cwd: str
    env: Mapping[str, str]
    keep_failed: bool = False
    echo_output: bool = False  # -s: show the sandbox's live output
    drop_unfinished: bool = False  # -x/--maxfail: a worker stopping early is expected
    labels: Mapping[str, str] = field(default_factory=dict)


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


class ImageCache:
    """One build per (base, fragment) for the session, shared by all threads."""

    def __init__(self, client: SandboxClient, snapshot: Snapshot) -> None:
        self._client = client
        self._snapshot = snapshot
        self._lock = threading.Lock()
        self._builds: dict[tuple[str, str], Future[BuildResult]] = {}

    def get(self, spec: SandboxSpec) -> BuildResult:
        """Raises: SandboxError (BuildFailed with the log tail) from the service."""
        with self._lock:
            future = self._builds.get(spec.build_key)
            owner = future is None
            if future is None:
                future = self._builds[spec.build_key] = Future()
        if owner:
            try:
                future.set_result(self._build(spec))
            except BaseException as exc:
                future.set_exception(exc)
        return future.result()

    def _build(self, spec: SandboxSpec) -> BuildResult:
        """The environment's images in order (mostly cache hits), then the project's."""
        base = spec.image
        for fragment, files in self._snapshot.environment(spec.dockerfile):
            built = self._client.build_image(
                fragment, base=base, context_files=files, label="pytest-sandbox-env"
            )
            base = built.image.tag
        return self._client.build_image(
            self._snapshot.fragment(),
            base=base,
            context_files=self._snapshot.context,
            label="pytest-sandbox",
        )


def _failed(report: Mapping[str, Any]) -> bool:
    return report.get("outcome") == "failed"


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
        except errors.SandboxError as exc:
            self._fail_all(list(group.nodeids), f"sandbox image build failed: {exc}", None)
            return
        pending = list(group.nodeids)
        while pending and not self.stop.is_set():
            try:
                sandbox = self.client.create_sandbox(self.sandbox_spec(build, spec, len(pending)))
            except errors.SandboxError as exc:
                self._fail_all(pending, f"could not create a sandbox: {exc}", None)
                return
            self.registry.add(sandbox.id)
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
                    # Off this thread: the next group need not wait for the engine's rm.
                    self._destroyer.submit(self._destroy, sandbox.id)

    def _destroy(self, sandbox_id: str) -> None:
        try:
            self.client.destroy_sandbox(sandbox_id)
        except errors.SandboxError as exc:
            log.warning("could not destroy sandbox %s: %s", sandbox_id, exc)
        finally:
            self.registry.discard(sandbox_id)

    def close(self) -> None:
        """Wait for pending destroys."""
        self._destroyer.shutdown(wait=True)

    def sandbox_spec(self, build: BuildResult, spec: SandboxSpec, count: int) -> pb.SandboxSpec:
        env = dict(self.settings.env)
        env.update(spec.env)
        return pb.SandboxSpec(
            image=build.image.key or build.image.tag,
            limits=pb.Limits(
                cpus=spec.cpus,
                memory_bytes=spec.memory,
                pids=spec.pids,
                network=spec.network,
                timeout_seconds=self._deadline(spec, count),
            ),
            env=env,
            runtime=spec.runtime,
            profile=spec.profile,
            ttl_seconds=min(self._deadline(spec, count) + 300.0, MAX_TTL_SECONDS),
            labels=dict(self.settings.labels),
            # The worker starts (and imports pytest) as soon as the container is up, or
            # even earlier in the service's warm pool; the exec below attaches to it.
            preload_argv=["python3", WORKER],
        )

    @staticmethod
    def _deadline(spec: SandboxSpec, count: int) -> float:
        """The exec's backstop; the worker's per-test watchdog normally acts long before."""
        return min(STARTUP_SECONDS + count * (spec.timeout + PER_TEST_GRACE), MAX_EXEC_SECONDS)

    def _attempt(
        self, group: Group, pending: list[str], placement: Placement
    ) -> tuple[list[str], list[str]]:
        """One worker run; returns (tests left to run elsewhere, tests that failed)."""
        spec = group.spec
        nonce = secrets.token_hex(16)
        capture_dir = f"/tmp/.pytest-sandbox-{nonce}"
        request = {
            "nonce": nonce,
            "args": list(self.settings.args),
            "files": list(group.files),
            "nodeids": pending,
            "cwd": self.settings.cwd,
            "capture_dir": capture_dir,
            "timeout": spec.timeout,
        }
        reader = RecordReader(nonce)
        stderr = Tail()
        done: set[str] = set()
        failed: list[str] = []
        held: list[ItemResult] = []  # with --sandbox-keep-failed, results wait for the logs
        current: dict[str, Any] = {}
        state: dict[str, Any] = {"exited": False, "timeout": None, "missing": [], "collect": []}

        def post(result: ItemResult) -> None:
            if result.failure or any(_failed(r) for r in result.reports):
                failed.append(result.nodeid)
            if self.settings.keep_failed:
                held.append(result)
            else:
                self.emit(result)

        def on_record(rec: dict[str, Any]) -> None:
            kind = rec["t"]
            if kind == "start":
                current.clear()
                current.update(nodeid=rec["nodeid"], reports=[], since=time.monotonic())
            elif kind == "report" and current:
                current["reports"].append(rec["report"])
            elif kind == "finish" and current.get("nodeid") == rec["nodeid"]:
                done.add(rec["nodeid"])
                post(ItemResult(rec["nodeid"], current["reports"], placement))
                current.clear()
            elif kind == "missing":
                state["missing"] = list(rec["nodeids"])
            elif kind == "collect":
                state["collect"].append(rec["report"].get("longrepr"))
            elif kind == "timeout":
                state["timeout"] = rec
            elif kind == "exit":
                state["exited"] = True
            elif kind == "error":
                stderr.add(str(rec.get("text", "")).encode())

        def on_output(stream: int, data: bytes) -> None:
            if stream == pb.STREAM_STDOUT:
                for rec in reader.feed(data):
                    on_record(rec)
            else:
                stderr.add(data)
                if self.settings.echo_output:
                    sys.stderr.write(data.decode("utf-8", "replace"))

        result: pb.ExecResult | None = None
        error = ""
        try:
            result = self.client.exec(
                placement.sandbox_id,
                [],
                attach_preload=True,
                # One line: a preloaded worker's stdin may stay open after it.
                stdin=json.dumps(request).encode() + b"\n",
                timeout=self._deadline(spec, len(pending)),
                on_output=on_output,
            )
        except errors.SandboxError as exc:
            error = str(exc)
        if self.stop.is_set():
            return [], []

        missing = [n for n in state["missing"] if n not in done]
        if missing:
            why = "\n".join(str(c) for c in state["collect"] if c) or "no such test there"
            for nodeid in missing:
                post(
                    ItemResult(
                        nodeid, [], placement, failure=f"not collected in the sandbox:\n{why}"
                    )
                )
                done.add(nodeid)
        left = [n for n in pending if n not in done and n != current.get("nodeid")]

        if state["exited"]:
            left = [n for n in pending if n not in done]
            if left and not self.settings.drop_unfinished:
                for nodeid in left:
                    post(
                        ItemResult(
                            nodeid, [], placement, failure="the sandbox worker did not run it"
                        )
                    )
            left = []
        else:
            timeout = state["timeout"]
            killed = current.get("nodeid") or (timeout or {}).get("nodeid")
            message = describe_kill(
                result,
                spec,
                error=error,
                elapsed=time.monotonic() - current["since"] if current else None,
                watchdog_timeout=float(timeout["seconds"]) if timeout else None,
            )
            if killed:
                post(
                    ItemResult(
                        killed,
                        list(current.get("reports", [])),
                        placement,
                        failure=message,
                        sections=self._recovered(placement, capture_dir, timeout)
                        + ([("Captured sandbox log", stderr.text())] if stderr.text() else []),
                    )
                )
            elif not done:  # no progress at all: a retry would fail the same way
                tail = stderr.text().strip()
                for nodeid in left:
                    post(ItemResult(nodeid, [], placement, failure=f"{message}\n{tail}".strip()))
                left = []

        tail = stderr.text().strip()
        for held_result in held:
            if held_result.nodeid in failed and tail:
                held_result.sections.append(("Captured sandbox log", tail))
            self.emit(held_result)
        return left, failed

    def _recovered(
        self, placement: Placement, capture_dir: str, timeout: Mapping[str, Any] | None
    ) -> list[tuple[str, str]]:
        """What the killed test printed before the kill, read back from the sandbox."""
        captured: dict[str, str] = {}
        if timeout is not None:
            captured = {k: str(timeout.get(k, "")) for k in ("stdout", "stderr")}
        else:
            try:
                captured = read_capture_tar(
                    self.client.get_files(placement.sandbox_id, capture_dir)
                )
            except (errors.SandboxError, tarfile.TarError) as exc:
                log.debug("no captured output from %s: %s", placement.sandbox_id, exc)
        sections = [(f"Captured {k}", v) for k, v in captured.items() if v]
        if timeout is not None and timeout.get("stack"):
            sections.append(("Stack of the test when it timed out", str(timeout["stack"])))
        return sections
