"""What a sandbox reserves on a cluster node, and whether any node could ever hold it.

Plain data and arithmetic, no Ray: the cluster engine turns a `Need` into a placement group
bundle, and checks it against the nodes' capacities before asking Ray to wait for room.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sandboxd.engine.base import ContainerSpec
from sandboxd.errors import EngineUnavailable, InvalidArgument
from sandboxd.limits import format_size

#: Custom Ray resource every sandbox node declares (`--resources '{"sandbox_node": 1}'`).
NODE_RESOURCE = "sandbox_node"
#: Custom Ray resource of nodes whose engine has gVisor registered as `runsc`.
RUNSC_RESOURCE = "sandbox_runsc"
#: What one sandbox takes of a node's marker resources: any number fit a node, the marker
#: only steers placement (a node's CPU and memory are the real bound).
MARKER_SHARE = 0.001


@dataclass(frozen=True)
class Need:
    """What one sandbox reserves on its node."""

    cpus: float
    memory_bytes: int
    runsc: bool = False

    def bundle(self) -> dict[str, float]:
        """The placement group bundle: CPU and memory, on a sandbox node (with runsc)."""
        bundle: dict[str, float] = {NODE_RESOURCE: MARKER_SHARE, "memory": float(self.memory_bytes)}
        if self.cpus > 0:
            bundle["CPU"] = self.cpus
        if self.runsc:
            bundle[RUNSC_RESOURCE] = MARKER_SHARE
        return bundle

    def describe(self) -> str:
        runsc = " with runsc" if self.runsc else ""
        return f"{self.cpus:g} CPU and {format_size(self.memory_bytes)}{runsc}"


def need_of(spec: ContainerSpec) -> Need:
    """The reservation a container spec asks for."""
    return Need(
        cpus=spec.nano_cpus / 1e9, memory_bytes=spec.memory_bytes, runsc=spec.runtime == "runsc"
    )


@dataclass(frozen=True)
class NodeInfo:
    """A sandbox node as Ray reports it: identity, liveness and total capacity."""

    node_id: str
    name: str
    alive: bool
    cpus: float
    memory_bytes: int
    runsc: bool

    @property
    def short_id(self) -> str:
        return self.node_id[:12]

    def holds(self, need: Need) -> bool:
        """Whether the node could hold the sandbox when it runs nothing else."""
        return (
            self.cpus >= need.cpus
            and self.memory_bytes >= need.memory_bytes
            and (self.runsc or not need.runsc)
        )


def nodes_from_ray(entries: Iterable[Mapping[str, Any]]) -> list[NodeInfo]:
    """Sandbox nodes out of `ray.nodes()`: those that declare the node resource."""
    out = []
    for entry in entries:
        resources = entry.get("Resources") or {}
        if NODE_RESOURCE not in resources and entry.get("Alive"):
            continue
        node_id = str(entry.get("NodeID", ""))
        name = str(entry.get("NodeName") or entry.get("NodeManagerAddress") or node_id[:12])
        out.append(
            NodeInfo(
                node_id=node_id,
                name=name,
                alive=bool(entry.get("Alive")),
                cpus=float(resources.get("CPU", 0.0)),
                memory_bytes=int(resources.get("memory", 0)),
                runsc=RUNSC_RESOURCE in resources,
            )
        )
    return out


def check_fits(nodes: Sequence[NodeInfo], need: Need, address: str) -> None:
    """Refuse at once what no live node could ever hold.

    Raises:
        EngineUnavailable: no sandbox node is alive.
        InvalidArgument: the limits are above the largest node's capacity.
    """
    alive = [n for n in nodes if n.alive]
    if not alive:
        raise EngineUnavailable(
            f"no sandbox node is alive in the Ray cluster at {address} (nodes join with "
            f"`ray start --address ... --resources '{{\"{NODE_RESOURCE}\": 1}}'`)"
        )
    if any(n.holds(need) for n in alive):
        return
    if need.runsc and not any(n.runsc for n in alive):
        raise InvalidArgument(
            "spec.runtime: no node of the cluster has the runsc runtime "
            f"(nodes with gVisor declare the resource {RUNSC_RESOURCE})"
        )
    largest = max(alive, key=lambda n: (n.memory_bytes, n.cpus))
    field = "limits.memory_bytes" if need.memory_bytes > largest.memory_bytes else "limits.cpus"
    raise InvalidArgument(
        f"{field}: {need.describe()} is more than any node of the cluster has; the largest "
        f"node ({largest.name}) has {largest.cpus:g} CPU and "
        f"{format_size(largest.memory_bytes)}",
    )


def capacity(nodes: Sequence[NodeInfo]) -> str:
    """The live nodes' count and total capacity, for a person."""
    alive = [n for n in nodes if n.alive]
    cpus = sum(n.cpus for n in alive)
    memory = sum(n.memory_bytes for n in alive)
    return f"{len(alive)} nodes, {cpus:g} CPU, {format_size(memory)}"
