"""Images on a cluster without a registry: which node sends, when a node rebuilds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from sandboxd.build_run import BuildJob, BuildSettings
from sandboxd.engine.cluster_images import ClusterImages
from sandboxd.engine.nodes import PeerLost
from sandboxd.errors import InvalidArgument, NotFound

BASE = "sandbox-base:bookworm"


@dataclass
class FakeNode:
    node_id: str
    name: str
    images: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    alive: bool = True
    #: Killed but still counted alive, as Ray does for a few seconds: what it sends is lost.
    dying: bool = False
    builds: list[str] = field(default_factory=list)
    loads: int = 0
    runtimes: tuple[str, ...] = ("runc",)


class FakeAgent:
    """The one agent method called through a handle: its result goes to another node."""

    def __init__(self, node: FakeNode) -> None:
        self._node = node

    @property
    def save_image(self) -> Any:
        node = self._node

        class Remote:
            @staticmethod
            def remote(ref: str) -> tuple[str, dict[str, str], str]:
                return (*node.images[ref], ref)

        return Remote


class FakeNodes:
    """The slice of `Nodes` the catalogue uses, over in-memory engines."""

    def __init__(self, *nodes: FakeNode) -> None:
        self.by_id = {n.node_id: n for n in nodes}

    def alive(self) -> list[FakeNode]:
        return [n for n in self.by_id.values() if n.alive]

    def all(self, fresh: bool = False) -> list[FakeNode]:
        return list(self.by_id.values())

    def name(self, node_id: str) -> str:
        return self.by_id[node_id].name

    def settle(self, node_id: str) -> bool:
        """`Nodes.settle`: Ray's verdict on a dying node comes, and it is dead."""
        node = self.by_id[node_id]
        node.alive = not node.dying and node.alive
        return not node.alive

    def is_lost(self, node_id: str) -> bool:
        return not self.by_id[node_id].alive

    def agent(self, node_id: str) -> FakeAgent:
        return FakeAgent(self.by_id[node_id])

    def generation(self, node_id: str) -> int:
        return 1

    def facts(self, node_id: str) -> dict[str, Any]:
        return {"runtimes": list(self.by_id[node_id].runtimes)}

    def call(self, node_id: str, method: str, *args: Any, **options: Any) -> Any:
        """`Nodes.call`; its options (timeout, agent generation) do not matter here."""
        node = self.by_id[node_id]
        if method == "image_info":
            return node.images.get(args[0])
        if method == "load_image":
            image_id, labels, ref = args[0]
            source = next(
                n for n in self.by_id.values() if n.images.get(ref, ())[:1] == (image_id,)
            )
            if source.dying:
                raise PeerLost(f"the agent on node {node.name} lost an input from another agent")
            node.images[ref] = (image_id, labels)
            node.loads += 1
            return None
        if method == "build_start":
            job, settings = args
            assert settings.runtime in node.runtimes
            node.builds.append(job.tag)
            node.images[job.tag] = (f"sha256:{node.name}-{job.tag}", dict(job.labels))
            return 1
        if method == "read":
            return [(0, b"Step 1/2 : FROM base")], (None, None)
        if method == "close":
            return None
        raise AssertionError(f"unexpected call {method}")


def job(tag: str, labels: dict[str, str] | None = None) -> BuildJob:
    return BuildJob(BASE, (), {}, tag, labels or {})


def settings(runtime: str = "runc") -> BuildSettings:
    return BuildSettings(runtime, 10**9, 512 << 20, 256, {}, 1 << 30, 60.0, "none")


def cluster() -> tuple[FakeNodes, FakeNode, FakeNode]:
    a = FakeNode("a" * 56, "n1", {BASE: ("sha256:base", {})})
    b = FakeNode("b" * 56, "n2")
    return FakeNodes(a, b), a, b


def test_the_base_image_is_sent_from_a_node_that_has_it_keeping_its_id() -> None:
    nodes, _, b = cluster()
    images = ClusterImages(nodes)  # type: ignore[arg-type]
    assert images.image_id(BASE) == "sha256:base"
    images.ensure(b.node_id, BASE)
    assert b.images[BASE][0] == "sha256:base" and b.loads == 1
    images.ensure(b.node_id, BASE)
    assert b.loads == 1  # known to be there now: not sent again


def test_a_build_runs_where_the_base_is_and_its_log_comes_back() -> None:
    nodes, a, b = cluster()
    images = ClusterImages(nodes)  # type: ignore[arg-type]
    lines = list(images.build(job("img:1", {"k": "v"}), settings()))
    assert lines == ["Step 1/2 : FROM base"]
    assert a.builds == ["img:1"] and not b.builds
    assert images.labels("img:1") == {"k": "v"}


def test_an_image_whose_holders_are_all_lost_is_rebuilt_from_its_recipe() -> None:
    nodes, a, b = cluster()
    images = ClusterImages(nodes)  # type: ignore[arg-type]
    list(images.build(job("img:1"), settings()))
    first_id = images.image_id("img:1")
    b.images[BASE] = a.images[BASE]  # the base is on the survivor too
    a.alive = False
    images.forget_node(a.node_id)
    images.ensure(b.node_id, "img:1")
    assert b.builds == ["img:1"]
    # The gateway keeps one id per image, whichever node holds which build of it.
    assert images.image_id("img:1") == first_id


def test_an_image_no_live_node_has_and_nobody_built_here_is_not_found() -> None:
    nodes, a, b = cluster()
    images = ClusterImages(nodes)  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="no node of the cluster has the image 'other:1'"):
        images.ensure(b.node_id, "other:1")
    assert images.image_id(BASE) == "sha256:base"
    a.alive = False
    images.forget_node(a.node_id)
    with pytest.raises(NotFound, match=r"no node of the cluster has the image 'sandbox-base"):
        images.ensure(b.node_id, BASE)


def test_an_image_whose_sender_dies_mid_transfer_comes_from_its_recipe_instead() -> None:
    """The receiving node is fine: its create must not fail with the sender's loss."""
    nodes, a, b = cluster()
    images = ClusterImages(nodes)  # type: ignore[arg-type]
    list(images.build(job("img:1"), settings()))
    b.images[BASE] = a.images[BASE]
    a.dying = True
    images.ensure(b.node_id, "img:1")
    assert b.builds == ["img:1"] and b.loads == 0 and not a.alive


def test_a_build_runs_on_a_node_with_its_runtime_and_none_is_refused() -> None:
    nodes, a, b = cluster()
    b.runtimes = ("runc", "runsc")
    images = ClusterImages(nodes)  # type: ignore[arg-type]
    list(images.build(job("img:gvisor"), settings("runsc")))
    assert b.builds == ["img:gvisor"] and not a.builds
    assert b.images[BASE][0] == "sha256:base"  # the base was sent there first
    b.alive = False
    with pytest.raises(InvalidArgument, match="no live node of the cluster has the build runtime"):
        list(images.build(job("img:2"), settings("runsc")))
