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

from sandboxd.engine.base import CgroupSample, ContainerInfo, ContainerSpec
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
class Placed:
    """Where a container runs and the reservation that holds its room."""

    node_id: str
    docker_id: str
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

    def build_image(
        self,
        dockerfile: str,
        context: Mapping[str, tuple[bytes, int]],
        tag: str,
        labels: Mapping[str, str],
    ) -> Iterator[str]:
        return self.images.build(dockerfile, context, tag, labels)

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
            self.images.ensure(node_id, spec.image)
            docker_id = str(self.nodes.call(node_id, "create_container", spec))
        except BaseException:
            remove_placement_group(group)
            raise
        container_id = f"{docker_id}@{node_id[:12]}"
        with self._lock:
            self._placed[container_id] = Placed(node_id, docker_id, group)
        return container_id

    def _wait_placed(self, group: PlacementGroup, what: str) -> str:
        """Wait for Ray to place the group; when it is not placed at once, warm containers
        give way (`make_room`) and the wait goes on to the placement timeout.

        Raises:
            ResourceExhausted: not placed within the placement timeout.
        """
        started = time.monotonic()
        first = min(ROOM_CHECK_SECONDS, self.placement_timeout)
        try:
            ray.get(group.ready(), timeout=first)
        except ray.exceptions.GetTimeoutError:
            if self.make_room():
                log.info("no room for %s at once: warm sandboxes gave way", what)
            self._wait_more(group, what, self.placement_timeout - (time.monotonic() - started))
        table = placement_group_table(group)
        return str(table["bundles_to_node_id"][0])

    def _wait_more(self, group: PlacementGroup, what: str, seconds: float) -> None:
        try:
            ray.get(group.ready(), timeout=max(0.0, seconds))
        except ray.exceptions.GetTimeoutError:
            raise ResourceExhausted(
                f"no node of the cluster had {what} free within "
                f"{self.placement_timeout:g}s ({capacity(self.nodes.alive())} in all); "
                "retry in a few seconds",
                retry_after=RETRY_AFTER_SECONDS,
            ) from None

    def _where(self, container_id: str) -> tuple[str, str]:
        """(node id, docker id) of one of our container ids.

        Raises:
            NodeLost: its node is gone.
        """
        with self._lock:
            placed = self._placed.get(container_id)
        if placed is not None:
            self.nodes.check(placed.node_id)
            return placed.node_id, placed.docker_id
        docker_id, _, short = container_id.partition("@")
        return self.nodes.by_short_id(short).node_id, docker_id

    def remove_container(self, container_id: str) -> None:
        with self._lock:
            placed = self._placed.pop(container_id, None)
        try:
            node_id, docker_id = self._where(container_id)
            self.nodes.call(node_id, "remove_container", docker_id)
        except NodeLost:
            pass  # gone with its node; the node's next agent reaps what is left
        finally:
            if placed is not None:
                with contextlib.suppress(Exception):
                    remove_placement_group(placed.group)

    def kill_container(self, container_id: str) -> None:
        with contextlib.suppress(NodeLost):
            node_id, docker_id = self._where(container_id)
            self.nodes.call(node_id, "kill_container", docker_id)

    def container_running(self, container_id: str) -> bool:
        node_id, docker_id = self._where(container_id)
        return bool(self.nodes.call(node_id, "container_running", docker_id))

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
        node_id, docker_id = self._where(container_id)
        sample: CgroupSample = self.nodes.call(node_id, "sample", docker_id)
        return sample

    def reset_peak(self, container_id: str) -> None:
        node_id, docker_id = self._where(container_id)
        self.nodes.call(node_id, "reset_peak", docker_id)

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
        node_id, docker_id = self._where(container_id)
        handle = self.nodes.call(
            node_id, "exec_start", docker_id, argv, dict(env), workdir, user, stdin, tty, window
        )
        return RemoteExec(self.nodes, node_id, int(handle))

    def _drop_node(self, node_id: str) -> None:
        """A node was lost: give back the reservations of its containers at once (Ray would
        otherwise re-place them on other nodes, holding room for containers that are gone)."""
        with self._lock:
            gone = [cid for cid, p in self._placed.items() if p.node_id == node_id]
            groups = [self._placed[cid].group for cid in gone]
        for group in groups:
            with contextlib.suppress(Exception):
                remove_placement_group(group)
        self.images.forget_node(node_id)


class RemoteExec:
    """An exec running on a node, seen through its agent (the `ExecProcess` Protocol)."""

    def __init__(self, nodes: Nodes, node_id: str, handle: int) -> None:
        self._nodes = nodes
        self._node_id = node_id
        self._handle = handle
        #: (exit code, start failure) once the output has ended.
        self._ended: tuple[int | None, str | None] | None = None

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        return self._nodes.call(self._node_id, method, self._handle, *args, timeout=timeout)

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
