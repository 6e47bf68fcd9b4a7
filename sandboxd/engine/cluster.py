"""The cluster engine: the `Engine` seam over a Ray cluster of sandbox nodes.

The gateway (`sandboxd serve` with `engine = "cluster"`) keeps today's core (admission,
warm pool, image cache, reaper) and this engine below it. Each container gets a Ray
placement group of one bundle sized to its limits, so Ray picks a node with room and holds
that room until the container is removed; the node's agent (`sandboxd.engine.agent`) then
makes the container on the node's own Docker engine. A container id is the node's Docker
id, "@", and the node's short Ray id, so every later call goes to the right agent.

Exec output and build logs come back by long polling the agent (see agent.py); stdin,
file archives (which travel as exec stdin/stdout) and cgroup samples are one actor call
each. Images travel between nodes through Ray's object store (see cluster_images.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import ray
import ray.exceptions
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from sandboxd.admission import wait_limit
from sandboxd.build_run import BuildJob, BuildSettings
from sandboxd.engine.base import CgroupSample, ContainerInfo, ContainerSpec, ImageFacts
from sandboxd.engine.cluster_images import ClusterImages
from sandboxd.engine.nodes import Nodes
from sandboxd.engine.placement import Need, capacity, check_fits, need_of
from sandboxd.errors import EngineUnavailable, NodeLost, ResourceExhausted, SandboxError

log = logging.getLogger(__name__)

#: How long a refused client is told to wait before asking again.
RETRY_AFTER_SECONDS = 5.0
#: How long one poll of an exec's output waits on the node for something to arrive.
POLL_SECONDS = 0.5
#: How long a new container waits for room before warm ones are asked to give way.
ROOM_CHECK_SECONDS = 1.0
#: The smallest sandbox: `ping` checks only that some node is alive.
NOTHING = Need(cpus=0.0, memory_bytes=0)


@dataclass(frozen=True)
class Where:
    """Where a container runs: its node, its id there, and the agent generation that made
    it (calls for it go to that agent only; when it died, so did the container)."""

    node_id: str
    docker_id: str
    generation: int


@dataclass(frozen=True)
class Placed:
    """Where a container runs and the reservation that holds its room."""

    where: Where
    group: PlacementGroup


class ClusterEngine:
    """Runs containers on the nodes of a Ray cluster, one Docker engine per node."""

    def __init__(
        self,
        address: str,
        instance_id: str,
        *,
        call_timeout: float = 20.0,
        placement_timeout: float = 30.0,
    ) -> None:
        self.address = address
        self.placement_timeout = placement_timeout
        self.nodes = Nodes(address, instance_id, call_timeout)
        self.nodes.on_lost = self._drop_node
        self.images = ClusterImages(self.nodes)
        self._lock = threading.Lock()
        self._placed: dict[str, Placed] = {}
        #: See `RoomMaking`: pointed at the warm pool by the wiring when there is one.
        self.make_room: Callable[[], bool] = lambda: False

    # -- the cluster as a whole -------------------------------------------------------------------

    def ping(self) -> None:
        check_fits(self.nodes.all(fresh=True), NOTHING, self.address)

    def runtimes(self) -> set[str]:
        found = {"runc"}
        for node in self.nodes.alive():
            with contextlib.suppress(SandboxError):
                found |= set(self.nodes.facts(node.node_id).get("runtimes", ()))
        return found

    def version(self) -> str:
        """Ray's version and the cluster's size, e.g. "ray 2.60.0; 3 nodes, 6 CPU, 12 GiB"."""
        return f"ray {ray.__version__}; {capacity(self.nodes.all(fresh=True))}"

    # -- images -----------------------------------------------------------------------------------

    def image_id(self, ref: str) -> str | None:
        return self.images.image_id(ref)

    def image_labels(self, ref: str) -> Mapping[str, str]:
        return self.images.labels(ref)

    def image_facts(self, ref: str) -> ImageFacts | None:
        """Size 0: the gateway knows which nodes hold an image, not its size on each."""
        known = self.images.lookup(ref)
        return None if known is None else ImageFacts(known.image_id, dict(known.labels), 0)

    def build_steps(
        self, job: BuildJob, settings: BuildSettings, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        return self.images.build(job, settings, cancel)

    def import_image(
        self, fileobj: IO[bytes], tag: str, labels: Mapping[str, str], changes: list[str]
    ) -> str:
        return self.images.import_image(fileobj.read(), tag, labels, changes)

    def remove_image(self, ref: str) -> None:
        self.images.remove(ref)

    def list_images(self, label: str) -> list[tuple[str, list[str], Mapping[str, str], int]]:
        return self.images.listing(label)

    # -- containers -------------------------------------------------------------------------------

    def create_container(self, spec: ContainerSpec) -> str:
        """Reserve room on a node with enough CPU and memory, then create the container there.

        Raises:
            InvalidArgument: no node could ever hold these limits.
            ResourceExhausted: no node had room within the placement timeout.
            NodeLost: the chosen node died meanwhile.
        """
        need = need_of(spec)
        check_fits(self.nodes.alive(), need, self.address)
        group = placement_group([need.bundle()], strategy="STRICT_PACK")
        try:
            node_id = self._wait_placed(group, need.describe())
            where = self._create_on(node_id, spec)
        except BaseException:
            remove_placement_group(group)
            raise
        container_id = f"{where.docker_id}@{node_id[:12]}"
        with self._lock:
            self._placed[container_id] = Placed(where, group)
        return container_id

    def _create_on(self, node_id: str, spec: ContainerSpec) -> Where:
        """Create the container on its node; once more with a fresh agent when the node's
        agent turns out to have died (the node is up: its room is still reserved).

        Raises:
            NodeLost: the node died, or its fresh agent died too.
        """
        for attempt in (1, 2):
            try:
                self.images.ensure(node_id, spec.image)
                generation = self.nodes.generation(node_id)
                docker_id = self.nodes.call(
                    node_id, "create_container", spec, generation=generation
                )
                return Where(node_id, str(docker_id), generation)
            except NodeLost:
                if attempt == 2 or self.nodes.is_lost(node_id):
                    raise
        raise AssertionError("unreachable")

    def _wait_placed(self, group: PlacementGroup, what: str) -> str:
        """Wait for Ray to place the group; when it is not placed at once, warm containers
        give way (`make_room`) and the wait goes on to the placement timeout, or to the
        create call's deadline when that is nearer (as admission waits on one machine).

        Raises:
            ResourceExhausted: not placed in time.
        """
        started = time.monotonic()
        limit = wait_limit(self.placement_timeout)
        try:
            ray.get(group.ready(), timeout=min(ROOM_CHECK_SECONDS, limit))
        except ray.exceptions.GetTimeoutError:
            if self.make_room():
                log.info("no room for %s at once: warm sandboxes gave way", what)
            self._wait_more(group, what, limit, limit - (time.monotonic() - started))
        table = placement_group_table(group)
        return str(table["bundles_to_node_id"][0])

    def _wait_more(self, group: PlacementGroup, what: str, limit: float, seconds: float) -> None:
        try:
            ray.get(group.ready(), timeout=max(0.0, seconds))
        except ray.exceptions.GetTimeoutError:
            raise ResourceExhausted(
                f"no node of the cluster had {what} free within {limit:.3g}s "
                f"({capacity(self.nodes.alive())} in all); retry in a few seconds",
                retry_after=RETRY_AFTER_SECONDS,
            ) from None

    def _where(self, container_id: str) -> Where:
        """Where one of our containers runs.

        Raises:
            NodeLost: its node, or the agent that made it, is gone.
        """
        with self._lock:
            placed = self._placed.get(container_id)
        if placed is not None:
            self.nodes.check(placed.where.node_id, placed.where.generation)
            return placed.where
        docker_id, _, short = container_id.partition("@")
        node_id = self.nodes.by_short_id(short).node_id
        return Where(node_id, docker_id, self.nodes.generation(node_id))

    def _call(self, where: Where, method: str, *args: Any) -> Any:
        return self.nodes.call(
            where.node_id, method, where.docker_id, *args, generation=where.generation
        )

    def remove_container(self, container_id: str) -> None:
        with self._lock:
            placed = self._placed.pop(container_id, None)
        try:
            self._call(self._where_or(placed, container_id), "remove_container")
        except NodeLost:
            pass  # gone with its node or agent; the node's next agent reaps what is left
        finally:
            if placed is not None:
                with contextlib.suppress(Exception):
                    remove_placement_group(placed.group)

    def _where_or(self, placed: Placed | None, container_id: str) -> Where:
        if placed is None:
            return self._where(container_id)
        self.nodes.check(placed.where.node_id, placed.where.generation)
        return placed.where

    def rename_container(self, container_id: str, name: str) -> None:
        self._call(self._where(container_id), "rename_container", name)

    def kill_container(self, container_id: str) -> None:
        with contextlib.suppress(NodeLost):
            self._call(self._where(container_id), "kill_container")

    def container_running(self, container_id: str) -> bool:
        return bool(self._call(self._where(container_id), "container_running"))

    def list_containers(self, label: str) -> list[ContainerInfo]:
        out: list[ContainerInfo] = []
        for node in self.nodes.alive():
            try:
                found = self.nodes.call(node.node_id, "list_containers", label)
            except SandboxError as exc:
                log.warning("listing containers on node %s: %s", node.name, exc)
                continue
            for info in found:
                out.append(
                    ContainerInfo(
                        id=f"{info.id}@{node.short_id}",
                        name=info.name,
                        labels=info.labels,
                        status=info.status,
                        created_unix=info.created_unix,
                    )
                )
        return out

    def sample(self, container_id: str) -> CgroupSample:
        sample: CgroupSample = self._call(self._where(container_id), "sample")
        return sample

    def reset_peak(self, container_id: str) -> None:
        self._call(self._where(container_id), "reset_peak")

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
    ) -> RemoteExec:
        where = self._where(container_id)
        handle = self._call(where, "exec_start", argv, dict(env), workdir, user, stdin, tty, window)
        return RemoteExec(self.nodes, where, int(handle))

    def _drop_node(self, node_id: str, generation: int | None) -> None:
        """A node was lost, or the agent `generation` on it died: give back the reservations
        of the containers that went with it at once (for a lost node, Ray would otherwise
        re-place them on other nodes, holding room for containers that are gone)."""
        with self._lock:
            groups = [
                p.group
                for p in self._placed.values()
                if p.where.node_id == node_id
                and (generation is None or p.where.generation == generation)
            ]
        for group in groups:
            with contextlib.suppress(Exception):
                remove_placement_group(group)
        if generation is None:
            self.images.forget_node(node_id)


class RemoteExec:
    """An exec running on a node, seen through its agent (the `ExecProcess` Protocol)."""

    def __init__(self, nodes: Nodes, where: Where, handle: int) -> None:
        self._nodes = nodes
        self._where = where
        self._handle = handle
        #: (exit code, start failure) once the output has ended.
        self._ended: tuple[int | None, str | None] | None = None

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        where = self._where
        return self._nodes.call(
            where.node_id, method, self._handle, *args, timeout=timeout, generation=where.generation
        )

    def write_stdin(self, data: bytes) -> None:
        self._call("write_stdin", data)

    def close_stdin(self) -> None:
        with contextlib.suppress(EngineUnavailable):
            self._call("close_stdin")

    def output(self) -> Iterator[tuple[int, bytes]]:
        timeout = POLL_SECONDS + self._nodes.call_timeout
        while self._ended is None:
            chunks, ended = self._call("read", POLL_SECONDS, timeout=timeout)
            for stream, data in chunks:
                yield int(stream), bytes(data)
            self._ended = ended

    def exit_code(self) -> int | None:
        return self._ended[0] if self._ended is not None else None

    def start_failure(self) -> str | None:
        return self._ended[1] if self._ended is not None else None

    def kill(self) -> None:
        with contextlib.suppress(NodeLost):
            self._call("kill")

    def resize(self, rows: int, columns: int) -> None:
        self._call("resize", rows, columns)

    def signal(self, signum: int) -> None:
        self._call("signal", signum)

    def close(self) -> None:
        with contextlib.suppress(SandboxError):
            self._call("close")
