"""Placement arithmetic of the cluster engine: what a sandbox reserves, what is refused."""

from __future__ import annotations

import pytest

from sandboxd.engine.base import ContainerSpec
from sandboxd.engine.placement import (
    MARKER_SHARE,
    NODE_RESOURCE,
    RUNSC_RESOURCE,
    Need,
    NodeInfo,
    capacity,
    check_fits,
    need_of,
    nodes_from_ray,
)
from sandboxd.errors import EngineUnavailable, InvalidArgument
from sandboxd.limits import GiB, MiB


def node(name: str, cpus: float = 2.0, memory: int = 1 * GiB, **kw: object) -> NodeInfo:
    values: dict[str, object] = {
        "node_id": f"{name:0<56}", "name": name, "alive": True,
        "cpus": cpus, "memory_bytes": memory, "runsc": False,
    }  # fmt: skip
    values.update(kw)
    return NodeInfo(**values)  # type: ignore[arg-type]


def test_a_spec_reserves_its_cpus_and_memory_on_a_sandbox_node() -> None:
    spec = ContainerSpec(
        image="i", name="n", labels={}, nano_cpus=500_000_000, memory_bytes=64 * MiB
    )
    assert need_of(spec).bundle() == {
        NODE_RESOURCE: MARKER_SHARE, "memory": float(64 * MiB), "CPU": 0.5,
    }  # fmt: skip
    gvisor = need_of(ContainerSpec(image="i", name="n", labels={}, runtime="runsc"))
    assert gvisor.bundle()[RUNSC_RESOURCE] == MARKER_SHARE


def test_only_nodes_that_declare_the_resource_count_and_dead_ones_are_kept() -> None:
    nodes = nodes_from_ray(
        [
            {"NodeID": "a" * 56, "NodeName": "head", "Alive": True, "Resources": {"CPU": 0.0}},
            {
                "NodeID": "b" * 56, "NodeName": "n1", "Alive": True,
                "Resources": {"CPU": 2.0, "memory": 1.0 * GiB, NODE_RESOURCE: 1.0,
                              RUNSC_RESOURCE: 1.0},
            },
            {"NodeID": "c" * 56, "NodeName": "n2", "Alive": False, "Resources": {}},
        ]
    )  # fmt: skip
    assert [(n.name, n.alive, n.runsc) for n in nodes] == [("n1", True, True), ("n2", False, False)]
    assert nodes[0].memory_bytes == GiB and nodes[0].short_id == "b" * 12
    assert capacity(nodes) == "1 nodes, 2 CPU, 1 GiB"


def test_what_fits_some_node_passes() -> None:
    check_fits([node("n1"), node("n2", cpus=4.0)], Need(3.0, 512 * MiB), "head:6379")


def test_limits_above_the_largest_node_are_refused_naming_it() -> None:
    nodes = [node("small", memory=512 * MiB), node("big", memory=2 * GiB)]
    with pytest.raises(InvalidArgument, match=r"largest node \(big\) has 2 CPU and 2 GiB") as e:
        check_fits(nodes, Need(1.0, 3 * GiB), "head:6379")
    assert e.value.field == "limits.memory_bytes"
    with pytest.raises(InvalidArgument) as e:
        check_fits(nodes, Need(3.0, 64 * MiB), "head:6379")
    assert e.value.field == "limits.cpus"


def test_dead_nodes_do_not_count_and_no_live_node_is_unavailable() -> None:
    with pytest.raises(EngineUnavailable, match="no sandbox node is alive"):
        check_fits([node("n1", alive=False)], Need(0.5, MiB), "head:6379")


def test_runsc_needs_a_node_with_gvisor() -> None:
    with pytest.raises(InvalidArgument, match="no node of the cluster has the runsc runtime"):
        check_fits([node("n1")], Need(0.5, MiB, runsc=True), "head:6379")
    check_fits([node("n1"), node("n2", runsc=True)], Need(0.5, MiB, runsc=True), "head:6379")
