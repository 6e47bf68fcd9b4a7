"""The gateway's view of the Ray cluster: which sandbox nodes exist, their agents, and calls
to them with bounded waits that turn a dead node into a clear `NodeLost`.

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

_DEAD = (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError)


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
        self._agents: dict[str, Any] = {}
        self._facts: dict[str, dict[str, Any]] = {}
        self._creating: dict[str, threading.Lock] = {}
        self._lost: dict[str, str] = {}
        #: Told the node id of a node found lost (the engine drops its reservations).
        self.on_lost: Callable[[str], None] = lambda _: None

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

    def check(self, node_id: str) -> None:
        """Raises: NodeLost when the node was found lost."""
        with self._lock:
            reason = self._lost.get(node_id)
        if reason is not None:
            raise NodeLost(f"node {self.name(node_id)} was lost ({reason})")

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
        self.on_lost(node_id)

    # -- agents -----------------------------------------------------------------------------------

    def agent(self, node_id: str) -> Any:
        """The node's agent, started (and its leftovers reaped) on first use. Agents are
        owned by this process (the Ray driver) and end with it.

        Raises:
            NodeLost: the node died. EngineUnavailable: the agent did not start in time.
        """
        self.check(node_id)
        with self._lock:
            handle: Any = self._agents.get(node_id)
            creating = self._creating.setdefault(node_id, threading.Lock())
        if handle is not None:
            return handle
        with creating:
            with self._lock:
                handle = self._agents.get(node_id)
            if handle is not None:
                return handle
            if node_id[:12] not in self._known:
                self.all(fresh=True)  # a node that just joined: its name labels containers
            name = self.name(node_id)
            handle = (
                ray.remote(NodeAgent)
                .options(
                    num_cpus=0,
                    max_concurrency=AGENT_CONCURRENCY,
                    max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                )
                .remote(self.instance_id, name)
            )
            facts = self._get(node_id, handle.describe.remote(), self.call_timeout * 3)
            with self._lock:
                self._agents[node_id] = handle
                self._facts[node_id] = facts
            log.info("agent started on node %s (%s)", name, facts)
            return handle

    def call(self, node_id: str, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Call the node agent's `method`, waiting a bounded time.

        Raises:
            NodeLost: the node (or its agent) died.
            EngineUnavailable: the agent did not answer in time.
            SandboxError: what the agent raised.
        """
        handle = self.agent(node_id)
        ref = getattr(handle, method).remote(*args)
        return self._get(node_id, ref, self.call_timeout if timeout is None else timeout)

    def _get(self, node_id: str, ref: Any, timeout: float) -> Any:
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, SandboxError):
                raise cause from None
            raise SandboxError(f"the agent on node {self.name(node_id)} failed: {cause}") from None
        except ray.exceptions.ActorUnavailableError:
            # Unreachable for now: lost only if Ray has given up on the node too.
            if self._still_alive(node_id):
                raise EngineUnavailable(
                    f"the agent on node {self.name(node_id)} cannot be reached just now"
                ) from None
            self._mark_lost(node_id, "it cannot be reached and Ray reports it dead")
            self.check(node_id)
            raise
        except _DEAD:
            self._mark_lost(node_id, "its agent died with it")
            self.check(node_id)
            raise  # unreachable: check raised
        except ray.exceptions.GetTimeoutError:
            if not self._still_alive(node_id):
                self._mark_lost(node_id, "it stopped answering and Ray reports it dead")
                self.check(node_id)
            raise EngineUnavailable(
                f"the agent on node {self.name(node_id)} did not answer within {timeout:g}s"
            ) from None

    def _still_alive(self, node_id: str) -> bool:
        return any(n.node_id == node_id and n.alive for n in self.all(fresh=True))
