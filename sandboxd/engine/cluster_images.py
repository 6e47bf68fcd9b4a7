"""Images on a cluster without a registry.

The gateway keeps, per image reference, what it knows: the image id, its labels, which
nodes hold it, and for images built here the recipe (the step build's job and settings: a
node runs it sandboxed, as one machine does, see sandboxd.builder). Before a
container is created on a node, `ensure` puts its image there: sent from a live node that
holds it (`docker save` on that node, through Ray's object store, `docker load` on this
one; the image keeps its id), or, when no live node holds it, built again from its recipe.
The base image reaches nodes the same way, from any node that has it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from sandboxd.build_run import BuildJob, BuildSettings
from sandboxd.engine.nodes import Nodes, PeerLost
from sandboxd.errors import Cancelled, InvalidArgument, NodeLost, NotFound, SandboxError

log = logging.getLogger(__name__)

#: How long one image transfer or one build step on a node may take.
TRANSFER_TIMEOUT_SECONDS = 600.0
#: How long a build may stay silent before the gateway gives up on it.
BUILD_SILENCE_SECONDS = 900.0


@dataclass(frozen=True)
class Recipe:
    """What a node needs to build an image itself."""

    job: BuildJob
    settings: BuildSettings

    @property
    def base(self) -> str:
        return self.job.base


@dataclass
class Known:
    """One image as the gateway knows it. Mutable: holders change as nodes come and go."""

    image_id: str
    labels: dict[str, str]
    recipe: Recipe | None = None
    holders: set[str] = field(default_factory=set)


class ClusterImages:
    """The gateway's image catalogue and the moves that put images onto nodes. Thread-safe."""

    def __init__(self, nodes: Nodes) -> None:
        self._nodes = nodes
        self._lock = threading.Lock()
        self._known: dict[str, Known] = {}
        self._moving: dict[tuple[str, str], threading.Lock] = {}

    # -- what the engine asks ---------------------------------------------------------------------

    def lookup(self, ref: str) -> Known | None:
        """The image, asking the live nodes when it is not known yet (or no longer held)."""
        with self._lock:
            known = self._known.get(ref)
        if known is not None and (known.recipe is not None or known.holders):
            return known
        found: Known | None = None
        for node in self._nodes.alive():
            try:
                info = self._nodes.call(node.node_id, "image_info", ref)
            except SandboxError as exc:
                log.debug("asking node %s for %s: %s", node.name, ref, exc)
                continue
            if info is None:
                continue
            image_id, labels = info
            if found is None:
                found = known or Known(image_id, dict(labels))
            found.holders.add(node.node_id)
        if found is not None:
            with self._lock:
                found = self._known.setdefault(ref, found)
        return found

    def image_id(self, ref: str) -> str | None:
        known = self.lookup(ref)
        return known.image_id if known is not None else None

    def labels(self, ref: str) -> Mapping[str, str]:
        """Raises: NotFound when no node has the image."""
        known = self.lookup(ref)
        if known is None:
            raise NotFound(f"no node of the cluster has the image {ref!r}")
        return dict(known.labels)

    def listing(self, label: str) -> list[tuple[str, list[str], Mapping[str, str], int]]:
        """Images carrying `label` on any live node, each once (by id)."""
        seen: dict[str, tuple[str, list[str], Mapping[str, str], int]] = {}
        for node in self._nodes.alive():
            try:
                found = self._nodes.call(node.node_id, "list_images", label)
            except SandboxError as exc:
                log.warning("listing images on node %s: %s", node.name, exc)
                continue
            for image_id, tags, labels, size in found:
                seen.setdefault(str(image_id), (str(image_id), list(tags), labels, int(size)))
        return list(seen.values())

    def remove(self, ref: str) -> None:
        """Remove the image from every live node and forget it."""
        with self._lock:
            known = self._known.pop(ref, None)
            for key, other in list(self._known.items()):
                if other is known or other.image_id == ref:
                    del self._known[key]
        for node in self._nodes.alive():
            try:
                self._nodes.call(node.node_id, "remove_image", ref)
            except SandboxError as exc:
                log.warning("removing image %s on node %s: %s", ref[:19], node.name, exc)

    def forget_node(self, node_id: str) -> None:
        with self._lock:
            for known in self._known.values():
                known.holders.discard(node_id)

    # -- builds and imports -----------------------------------------------------------------------

    def build(
        self, job: BuildJob, settings: BuildSettings, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """Build on one node with the settings' runtime (one that has the base, when one
        does) and keep the recipe.

        Raises:
            BuildFailed, DeadlineExceeded, Cancelled: as the step build on the node.
            NotFound: the base image is on no node and cannot be built.
            InvalidArgument: no live node has the build's runtime.
        """
        recipe = Recipe(job, settings)
        node_id = self._builder(recipe.base, settings.runtime)
        yield from self._build_on(node_id, recipe, cancel)
        info = self._nodes.call(node_id, "image_info", job.tag)
        if info is None:
            name = self._nodes.name(node_id)
            raise SandboxError(f"the build of {job.tag} on node {name} left no image")
        known = Known(info[0], dict(info[1]), recipe, {node_id})
        with self._lock:
            self._known[job.tag] = known
            self._known[info[0]] = known

    def _builder(self, base: str, runtime: str) -> str:
        """A node with `runtime` to build on: one holding the base, else the first (the
        base is sent).

        Raises:
            InvalidArgument: no live node has the runtime.
        """
        alive = self._nodes.alive()
        if not alive:
            self._nodes.all(fresh=True)
            raise SandboxError("no sandbox node is alive to build on")
        able = [n for n in alive if runtime in self._nodes.facts(n.node_id).get("runtimes", ())]
        if not able:
            raise InvalidArgument(f"no live node of the cluster has the build runtime {runtime!r}")
        known = self.lookup(base) if base else None
        holders = [n.node_id for n in able if known is not None and n.node_id in known.holders]
        node_id = holders[0] if holders else able[0].node_id
        if base and not holders and known is not None:
            self.ensure(node_id, base)
        return node_id

    def _build_on(
        self, node_id: str, recipe: Recipe, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        # The build is the agent's that started it: should it die, the build ends NodeLost.
        generation = self._nodes.generation(node_id)
        handle = self._nodes.call(
            node_id, "build_start", recipe.job, recipe.settings, generation=generation
        )
        try:
            ended = None
            while ended is None:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("build cancelled: the client went away; nothing was kept")
                chunks, ended = self._nodes.call(
                    node_id, "read", handle, 1.0, timeout=BUILD_SILENCE_SECONDS,
                    generation=generation,
                )  # fmt: skip
                for _, line in chunks:
                    yield bytes(line).decode("utf-8", "replace")
        finally:
            try:
                self._nodes.call(node_id, "close", handle, generation=generation)
            except SandboxError as exc:
                log.debug("closing build %s: %s", handle, exc)

    def import_image(
        self, data: bytes, tag: str, labels: Mapping[str, str], changes: list[str]
    ) -> str:
        """Import a root file system tar on one node; other nodes receive it when they need it.

        Raises:
            EngineUnavailable: no sandbox node is alive.
        """
        alive = self._nodes.alive()
        if not alive:
            raise SandboxError("no sandbox node is alive to import the image on")
        node_id = alive[0].node_id
        image_id = str(
            self._nodes.call(
                node_id, "import_image", data, tag, dict(labels), changes,
                timeout=TRANSFER_TIMEOUT_SECONDS,
            )
        )  # fmt: skip
        with self._lock:
            self._known.pop(tag, None)
        return image_id

    # -- moving images onto nodes -----------------------------------------------------------------

    def ensure(self, node_id: str, ref: str) -> None:
        """Put the image on the node, unless it is there already.

        Raises:
            NotFound: no live node holds it and there is no recipe to build it from.
            NodeLost: the node died meanwhile.
        """
        known = self.lookup(ref)
        if known is None:
            raise NotFound(f"no node of the cluster has the image {ref!r}")
        if node_id in known.holders:
            return
        with self._lock:
            moving = self._moving.setdefault((node_id, ref), threading.Lock())
        with moving:
            if node_id in known.holders:
                return
            if self._nodes.call(node_id, "image_info", ref) is None:
                self._deliver(node_id, ref, known)
            known.holders.add(node_id)

    def _send(self, source: str, node_id: str, ref: str) -> bool:
        """Send the image from node `source` to `node_id`; False if the source was lost
        meanwhile (the receiving node is fine and can take it from elsewhere).

        Raises:
            NodeLost: the receiving node died. SandboxError: the transfer failed otherwise.
        """
        name, source_name = self._nodes.name(node_id), self._nodes.name(source)
        log.info("sending image %s from node %s to %s", ref, source_name, name)
        try:
            # The tar goes from node to node through the object store, not through here.
            data = self._nodes.agent(source).save_image.remote(ref)
            self._nodes.call(node_id, "load_image", data, timeout=TRANSFER_TIMEOUT_SECONDS)
        except (PeerLost, NodeLost) as exc:
            if isinstance(exc, NodeLost) and self._nodes.is_lost(node_id):
                raise
            if not self._nodes.settle(source):
                raise
            log.warning("node %s was lost while sending image %s to %s", source_name, ref, name)
            return False
        return True

    def _deliver(self, node_id: str, ref: str, known: Known) -> None:
        name = self._nodes.name(node_id)
        failed: set[str] = set()
        while True:
            alive = {n.node_id for n in self._nodes.alive()}
            sources = [h for h in known.holders if h in alive and h not in failed | {node_id}]
            if not sources:
                break
            if self._send(sources[0], node_id, ref):
                return
            failed.add(sources[0])
            known.holders.discard(sources[0])
        if known.recipe is None:
            raise NotFound(f"no live node holds the image {ref!r}, and it cannot be rebuilt here")
        log.info("building image %s on node %s from its recipe", ref, name)
        if known.recipe.base:
            self.ensure(node_id, known.recipe.base)
        recipe = Recipe(replace(known.recipe.job, tag=ref), known.recipe.settings)
        for _ in self._build_on(node_id, recipe):
            pass
