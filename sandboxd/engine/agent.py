"""The node agent: one per cluster node, wrapping that node's own Docker engine.

The gateway's `ClusterEngine` starts one agent per sandbox node as a Ray actor pinned to
the node (the actor is made from this plain class there; nothing here imports Ray). The
agent runs every container call against the engine `DOCKER_HOST` names on its node, so the
containers get today's protections, verdicts and measurements (cgroups are read on the node).

Output travels by chunked long polling: an exec's or a build's output is read on the node
by a thread into a bounded buffer, and the gateway asks `read(handle, wait)` for whatever
has arrived, waiting up to `wait` seconds for something. One poll costs one actor call; a
chatty command's output comes in batches of up to `READ_BATCH_BYTES`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from sandboxd.build_run import BuildJob, BuildRun, BuildSettings
from sandboxd.engine.base import LABEL_INSTANCE, CgroupSample, ContainerInfo, ContainerSpec
from sandboxd.engine.docker import DockerEngine
from sandboxd.errors import SandboxError

log = logging.getLogger(__name__)

#: Label naming the cluster node a container was made on (its Ray node name).
LABEL_NODE = "sandbox.node"
#: Output a stream holds for the gateway before its reader waits (back pressure).
BUFFER_BYTES = 8 << 20
#: Most output one `read` returns.
READ_BATCH_BYTES = 1 << 20

#: One chunk of a stream: (1 = stdout, 2 = stderr, 0 = a build log line; data).
Chunk = tuple[int, bytes]
#: How a stream ended: an exec's exit code (None if unknown) and why it could not start.
Ended = tuple[int | None, str | None]


class Stream:
    """Items of an iterator read on a thread of their own, handed out in batches."""

    def __init__(self, items: Iterator[Chunk], on_end: Callable[[], None] = lambda: None) -> None:
        self._items = items
        self._on_end = on_end
        self._changed = threading.Condition()
        self._buffer: list[Chunk] = []
        self._size = 0
        self._done = False
        self._error: SandboxError | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._pump, name="agent-stream", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for chunk in self._items:
                with self._changed:
                    while self._size >= BUFFER_BYTES and not self._closed:
                        self._changed.wait()
                    if self._closed:
                        return
                    self._buffer.append(chunk)
                    self._size += len(chunk[1])
                    self._changed.notify_all()
        except SandboxError as exc:
            self._error = exc
        except Exception as exc:
            log.exception("stream failed")
            self._error = SandboxError(f"on the node: {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                self._on_end()
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def read(self, wait: float) -> tuple[list[Chunk], bool]:
        """(chunks that arrived, whether the stream ended), waiting up to `wait` for either.

        Raises:
            SandboxError: what ended the stream, once its chunks are all read.
        """
        with self._changed:
            if not self._buffer and not self._done:
                self._changed.wait(wait)
            out: list[Chunk] = []
            size = 0
            while self._buffer and size < READ_BATCH_BYTES:
                chunk = self._buffer.pop(0)
                out.append(chunk)
                size += len(chunk[1])
            self._size -= size
            self._changed.notify_all()
            done = self._done and not self._buffer
        if done and not out and self._error is not None:
            raise self._error
        return out, done

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._buffer.clear()
            self._changed.notify_all()


class NodeAgent:
    """Runs one node's containers for one gateway instance. Thread-safe (a threaded actor)."""

    def __init__(self, instance_id: str, node_name: str, docker_host: str | None = None) -> None:
        self.instance_id = instance_id
        self.node_name = node_name
        self.engine = DockerEngine(docker_host)
        self._lock = threading.Lock()
        self._handles = itertools.count(1)
        self._streams: dict[int, Stream] = {}
        self._execs: dict[int, Any] = {}
        #: Builds' cancel events, set by `close`.
        self._cancels: dict[int, threading.Event] = {}
        self.reaped = self._reap_leftovers()

    def _reap_leftovers(self) -> int:
        """Remove this instance's containers on this node: a new agent knows none of them,
        so they are what survived a loss of the node (or of its agent)."""
        removed = 0
        for info in self.engine.list_containers(f"{LABEL_NODE}={self.node_name}"):
            if info.labels.get(LABEL_INSTANCE) == self.instance_id:
                with contextlib.suppress(SandboxError):
                    self.engine.remove_container(info.id)
                    removed += 1
        if removed:
            log.info("node %s: reaped %d leftover containers", self.node_name, removed)
        return removed

    def describe(self) -> dict[str, Any]:
        """What the gateway wants to know once: engine version, runtimes, leftovers reaped."""
        return {
            "version": self.engine.version(),
            "runtimes": sorted(self.engine.runtimes()),
            "reaped": self.reaped,
            "pid": os.getpid(),
        }

    # -- engine calls, passed through ------------------------------------------------------------

    def ping(self) -> None:
        self.engine.ping()

    def image_info(self, ref: str) -> tuple[str, dict[str, str]] | None:
        """(id, labels) of the image, or None when this node's engine lacks it."""
        image = self.engine.image_id(ref)
        if image is None:
            return None
        return image, dict(self.engine.image_labels(ref))

    def save_image(self, ref: str) -> bytes:
        return self.engine.save_image(ref)

    def load_image(self, data: bytes) -> None:
        self.engine.load_image(data)

    def import_image(
        self, data: bytes, tag: str, labels: Mapping[str, str], changes: list[str]
    ) -> str:
        import io

        return self.engine.import_image(io.BytesIO(data), tag, labels, changes)

    def remove_image(self, ref: str) -> None:
        self.engine.remove_image(ref)

    def list_images(self, label: str) -> list[tuple[str, list[str], Mapping[str, str], int]]:
        return self.engine.list_images(label)

    def create_container(self, spec: ContainerSpec) -> str:
        labels = {**spec.labels, LABEL_NODE: self.node_name}
        return self.engine.create_container(replace(spec, labels=labels))

    def remove_container(self, container_id: str) -> None:
        self.engine.remove_container(container_id)

    def rename_container(self, container_id: str, name: str) -> None:
        self.engine.rename_container(container_id, name)

    def kill_container(self, container_id: str) -> None:
        self.engine.kill_container(container_id)

    def container_running(self, container_id: str) -> bool:
        return self.engine.container_running(container_id)

    def list_containers(self, label: str) -> list[ContainerInfo]:
        """This node's containers carrying `label` (an engine shared by several nodes, as
        in tests, holds others' too)."""
        return [
            c
            for c in self.engine.list_containers(label)
            if c.labels.get(LABEL_NODE) == self.node_name
        ]

    def sample(self, container_id: str) -> CgroupSample:
        return self.engine.sample(container_id)

    def reset_peak(self, container_id: str) -> None:
        self.engine.reset_peak(container_id)

    # -- streams: builds and execs ----------------------------------------------------------------

    def _add(self, stream: Stream, proc: Any = None) -> int:
        handle = next(self._handles)
        with self._lock:
            self._streams[handle] = stream
            if proc is not None:
                self._execs[handle] = proc
        return handle

    def build_start(self, job: BuildJob, settings: BuildSettings) -> int:
        """Start a sandboxed step build (sandboxd.builder) on this node's engine with the
        gateway's settings; its log lines are read with `read` (stream 0). Its containers
        carry this node's name and the instance's id, so a new agent reaps what a lost one
        left; `close` cancels it (its steps' containers and layers are removed)."""
        cancel = threading.Event()
        run = BuildRun(
            self.engine,
            settings,
            job,
            self.instance_id,
            cancel,
            container_labels={LABEL_NODE: self.node_name, LABEL_INSTANCE: self.instance_id},
        )
        handle = self._add(Stream((0, line.encode()) for line in run.execute()))
        with self._lock:
            self._cancels[handle] = cancel
        return handle

    def exec_start(
        self,
        container_id: str,
        argv: list[str],
        env: Mapping[str, str],
        workdir: str,
        user: str,
        stdin: bool,
        tty: bool = False,
        window: tuple[int, int] | None = None,
    ) -> int:
        """Start a command; its output and, at its end, its exit code are read with `read`."""
        proc = self.engine.exec(
            container_id,
            argv,
            env=env,
            workdir=workdir,
            user=user,
            stdin=stdin,
            tty=tty,
            window=window,
        )
        return self._add(Stream(proc.output()), proc)

    def read(self, handle: int, wait: float) -> tuple[list[Chunk], Ended | None]:
        """Output that arrived since the last read, waiting up to `wait` seconds for some;
        with how it ended once it has (for an exec: its exit code and start failure).

        Raises:
            SandboxError: what ended the stream (a failed build).
        """
        chunks, done = self._stream(handle).read(wait)
        if not done:
            return chunks, None
        with self._lock:
            proc = self._execs.get(handle)
        if proc is None:
            return chunks, (None, None)
        return chunks, (proc.exit_code(), proc.start_failure())

    def write_stdin(self, handle: int, data: bytes) -> None:
        self._proc(handle).write_stdin(data)

    def close_stdin(self, handle: int) -> None:
        self._proc(handle).close_stdin()

    def kill(self, handle: int) -> None:
        self._proc(handle).kill()

    def resize(self, handle: int, rows: int, columns: int) -> None:
        self._proc(handle).resize(rows, columns)

    def signal(self, handle: int, signum: int) -> None:
        self._proc(handle).signal(signum)

    def close(self, handle: int) -> None:
        """Forget a stream, closing its exec's connection."""
        with self._lock:
            stream = self._streams.pop(handle, None)
            proc = self._execs.pop(handle, None)
            cancel = self._cancels.pop(handle, None)
        if cancel is not None:
            cancel.set()
        if stream is not None:
            stream.close()
        if proc is not None:
            proc.close()

    def _stream(self, handle: int) -> Stream:
        with self._lock:
            stream = self._streams.get(handle)
        if stream is None:
            raise SandboxError(f"node {self.node_name}: no stream {handle} (closed already)")
        return stream

    def _proc(self, handle: int) -> Any:
        with self._lock:
            proc = self._execs.get(handle)
        if proc is None:
            raise SandboxError(f"node {self.node_name}: no exec {handle} (closed already)")
        return proc
