"""The gateway's view of the Ray cluster: which sandbox nodes exist, their agents, and calls
to them with bounded waits that turn a dead node into a clear `NodeLost`.

Agents come in generations: when a node's agent dies while the node stays up, the sandboxes
that agent made are lost with it (calls for them end with `NodeLost`), but the node is not:
its next call starts a fresh agent, which reaps the dead one's containers and serves new
sandboxes. A node Ray reports dead is lost for good; when it comes back it has a new Ray id.

The only other module besides `cluster.py` that imports Ray; both are imported only when
the config names the cluster engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import ray
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sandboxd.engine.agent import NodeAgent
from sandboxd.engine.placement import NodeInfo, nodes_from_ray
from sandboxd.errors import EngineUnavailable, NodeLost, SandboxError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long a view of the cluster's nodes is trusted before Ray is asked again.
NODES_TTL_SECONDS = 1.0
#: Concurrent calls one agent serves (each exec being read holds one while it waits).
AGENT_CONCURRENCY = 256
#: How long an unreachable agent's call waits for Ray's verdict on its node: Ray's health
#: checks count a killed node alive for a few seconds, and a call in flight then should end
#: with the node's loss, not with "cannot be reached just now".
VERDICT_SECONDS = 8.0
VERDICT_POLL_SECONDS = 0.25

_DEAD = (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError)


class PeerLost(EngineUnavailable):
    """A call's argument was a result of another agent, which died before handing it over
    (e.g. an image sent from a node that was lost meanwhile); the called agent is fine."""


class Nodes:
    """Sandbox nodes, one agent per live node, and calls to them. Thread-safe."""

    def __init__(self, address: str, instance_id: str, call_timeout: float) -> None:
        self.address = address
        self.instance_id = instance_id
        self.call_timeout = call_timeout
        self._lock = threading.RLock()
        self._connected = False
        self._view: list[NodeInfo] = []
        self._view_at = -NODES_TTL_SECONDS
        self._known: dict[str, NodeInfo] = {}
        #: Per node: the live agent's handle and its generation.
        self._agents: dict[str, tuple[Any, int]] = {}
        self._generations: dict[str, int] = {}
        #: Why an agent generation, (node id, generation), died.
        self._dead: dict[tuple[str, int], str] = {}
        self._facts: dict[str, dict[str, Any]] = {}
        self._creating: dict[str, threading.Lock] = {}
        self._lost: dict[str, str] = {}
        #: Told (node id, None) of a node found lost and (node id, generation) of an agent
        #: that died on a live node: the engine drops the reservations of their containers.
        self.on_lost: Callable[[str, int | None], None] = lambda node_id, generation: None

    # -- the cluster ------------------------------------------------------------------------------

    def connect(self) -> None:
        """Join the Ray cluster as a driver, once.

        Raises:
            EngineUnavailable: the cluster cannot be reached.
        """
        with self._lock:
            if self._connected:
                return
            try:
                if not ray.is_initialized():
                    ray.init(
                        address=self.address,
                        namespace="sandboxd",
                        logging_level=logging.WARNING,
                        log_to_driver=False,
                        configure_logging=False,
                    )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise EngineUnavailable(
                    f"cannot join the Ray cluster at {self.address}: {exc}; is the head "
                    "running (`ray start --head`)?"
                ) from None
            self._connected = True

    def all(self, fresh: bool = False) -> list[NodeInfo]:
        """Every sandbox node Ray knows of, dead ones included (to name them)."""
        self.connect()
        with self._lock:
            if fresh or time.monotonic() - self._view_at >= NODES_TTL_SECONDS:
                self._view = nodes_from_ray(ray.nodes())  # type: ignore[no-untyped-call]
                self._view_at = time.monotonic()
                for node in self._view:
                    self._known[node.short_id] = node
                    if not node.alive:
                        self._mark_lost(node.node_id, "Ray reports the node dead")
            return [n for n in self._view if n.node_id not in self._lost]

    def alive(self) -> list[NodeInfo]:
        return [n for n in self.all() if n.alive]

    def by_short_id(self, short_id: str) -> NodeInfo:
        """The node a container id names.

        Raises:
            NodeLost: the node is gone.
            NotFound-like SandboxError: no such node was ever seen.
        """
        node = self._known.get(short_id)
        if node is None:
            self.all(fresh=True)
            node = self._known.get(short_id)
        if node is None:
            raise SandboxError(f"no cluster node {short_id!r} is known")
        self.check(node.node_id)
        return node

    def check(self, node_id: str, generation: int | None = None) -> None:
        """Raises: NodeLost when the node was found lost, or the agent `generation` died."""
        with self._lock:
            reason = self._lost.get(node_id)
            if reason is None and generation is not None:
                reason = self._dead.get((node_id, generation))
        if reason is not None:
            raise NodeLost(f"node {self.name(node_id)} was lost ({reason})")

    def is_lost(self, node_id: str) -> bool:
        with self._lock:
            return node_id in self._lost

    def name(self, node_id: str) -> str:
        node = self._known.get(node_id[:12])
        return node.name if node is not None else node_id[:12]

    def facts(self, node_id: str) -> dict[str, Any]:
        """What the node's agent said at its start (engine version, runtimes)."""
        self.agent(node_id)
        return self._facts.get(node_id, {})

    def _mark_lost(self, node_id: str, reason: str) -> None:
        with self._lock:
            if node_id in self._lost:
                return
            self._lost[node_id] = reason
            self._agents.pop(node_id, None)
        log.warning("node %s was lost: %s", self.name(node_id), reason)
        self.on_lost(node_id, None)

    def _mark_agent_dead(self, node_id: str, generation: int, reason: str) -> None:
        """One agent died on a node that is still up: its sandboxes are lost, the node is not."""
        with self._lock:
            if (node_id, generation) in self._dead:
                return
            self._dead[(node_id, generation)] = reason
            if self._agents.get(node_id, (None, -1))[1] == generation:
                del self._agents[node_id]
        log.warning("the agent on node %s died: %s", self.name(node_id), reason)
        self.on_lost(node_id, generation)

    def _agent_died(self, node_id: str, generation: int, exc: BaseException) -> None:
        """Raises: NodeLost, for the node when Ray reports it dead, else for the generation."""
        if isinstance(exc, ray.exceptions.NodeDiedError) or not self._still_alive(node_id):
            self._mark_lost(node_id, "its agent died with it")
        else:
            self._mark_agent_dead(
                node_id, generation, "its agent died; the node's new sandboxes get a new one"
            )
        self.check(node_id, generation)

    # -- agents -----------------------------------------------------------------------------------

    def agent(self, node_id: str) -> Any:
        """The node's live agent (see `current`).

        Raises:
            NodeLost: the node died. EngineUnavailable: the agent did not start in time.
        """
        return self.current(node_id)[0]

    def generation(self, node_id: str) -> int:
        """The generation of the node's live agent, started if there is none.

        Raises:
            NodeLost: the node died. EngineUnavailable: the agent did not start in time.
        """
        return self.current(node_id)[1]

    def current(self, node_id: str) -> tuple[Any, int]:
        """The node's live agent and its generation, started (and the node's leftovers
        reaped) on first use and after an agent died. Agents are owned by this process (the
        Ray driver) and end with it.

        Raises:
            NodeLost: the node died. EngineUnavailable: the agent did not start in time.
        """
        self.check(node_id)
        with self._lock:
            live = self._agents.get(node_id)
            creating = self._creating.setdefault(node_id, threading.Lock())
        if live is not None:
            return live
        with creating:
            with self._lock:
                live = self._agents.get(node_id)
                if live is None:
                    generation = self._generations.get(node_id, 0) + 1
                    self._generations[node_id] = generation
            if live is not None:
                return live
            return self._start_agent(node_id, generation)

    def _start_agent(self, node_id: str, generation: int) -> tuple[Any, int]:
        if node_id[:12] not in self._known:
            self.all(fresh=True)  # a node that just joined: its name labels containers
        name = self.name(node_id)
        handle: Any = (
            ray.remote(NodeAgent)
            .options(
                num_cpus=0,
                max_concurrency=AGENT_CONCURRENCY,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            )
            .remote(self.instance_id, name)
        )
        facts = self._get(node_id, generation, handle.describe.remote(), self.call_timeout * 3)
        with self._lock:
            self._agents[node_id] = (handle, generation)
            self._facts[node_id] = facts
        log.info("agent %d started on node %s (%s)", generation, name, facts)
        return handle, generation

    def call(
        self,
        node_id: str,
        method: str,
        *args: Any,
        timeout: float | None = None,
        generation: int | None = None,
    ) -> Any:
        """Call the node agent's `method`, waiting a bounded time. With `generation`, the
        call is for what that agent made (a container, an exec): only that agent will do.

        Raises:
            NodeLost: the node, or the agent `generation`, died.
            EngineUnavailable: the agent did not answer in time.
            SandboxError: what the agent raised.
        """
        self.check(node_id, generation)
        handle, current = self.current(node_id)
        if generation is not None and generation != current:
            self._mark_agent_dead(node_id, generation, "its agent died")
            self.check(node_id, generation)
        ref = getattr(handle, method).remote(*args)
        return self._get(node_id, current, ref, self.call_timeout if timeout is None else timeout)

    def _get(self, node_id: str, generation: int, ref: Any, timeout: float) -> Any:
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, SandboxError):
                raise cause from None
            if isinstance(cause, ray.exceptions.RayActorError):
                raise PeerLost(
                    f"the agent on node {self.name(node_id)} lost an input from another "
                    f"agent: {cause}"
                ) from None
            raise SandboxError(f"the agent on node {self.name(node_id)} failed: {cause}") from None
        except ray.exceptions.ActorUnavailableError:
            # Unreachable for now: lost only if Ray gives up on the node too, which it does
            # a few seconds after a node is killed.
            if self.settle(node_id, min(VERDICT_SECONDS, timeout)):
                self._mark_lost(node_id, "it cannot be reached and Ray reports it dead")
                self.check(node_id)
            raise EngineUnavailable(
                f"the agent on node {self.name(node_id)} cannot be reached just now"
            ) from None
        except _DEAD as exc:
            self._agent_died(node_id, generation, exc)
            raise  # unreachable: _agent_died raised
        except ray.exceptions.GetTimeoutError:
            if not self._still_alive(node_id):
                self._mark_lost(node_id, "it stopped answering and Ray reports it dead")
                self.check(node_id)
            raise EngineUnavailable(
                f"the agent on node {self.name(node_id)} did not answer within {timeout:g}s"
            ) from None

    def settle(self, node_id: str, seconds: float = VERDICT_SECONDS) -> bool:
        """Whether Ray finds the node dead within `seconds` (polled): True once it does (or
        the node was already found lost), False if it still counts the node alive."""
        deadline = time.monotonic() + seconds
        while True:
            if self.is_lost(node_id) or not self._still_alive(node_id):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(VERDICT_POLL_SECONDS)

    def _still_alive(self, node_id: str) -> bool:
        return any(n.node_id == node_id and n.alive for n in self.all(fresh=True))
