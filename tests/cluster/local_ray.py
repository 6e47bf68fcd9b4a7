"""A local multi-node Ray cluster for tests and benchmarks of the cluster engine (not product
code): `ray.cluster_utils.Cluster` with every node on loopback and a private temp dir.

The head is sandbox node n1 (one raylet fewer on a 2-core machine); more nodes join with
`add_node`. On a loaded machine a raylet can miss Ray's fixed 30 s registration wait, so
starting the head is tried again, after killing what the failed try left running.
"""

from __future__ import annotations

import os

# Before Ray is imported: address discovery gives loopback, with no probe to the outside.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")

import contextlib
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

NODE_CPUS = 2
NODE_MEMORY = 1 << 30
#: Fast node-death detection, so a lost node is noticed in seconds (Ray's default is ~30 s).
HEALTH = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
START_TRIES = 3


def node_args(name: str) -> dict[str, Any]:
    return {
        "num_cpus": NODE_CPUS,
        "memory": NODE_MEMORY,
        "resources": {"sandbox_node": 1},
        "node_name": name,
        "node_ip_address": "127.0.0.1",
        "object_store_memory": 200 << 20,
    }


class LocalRay:
    """A head (sandbox node n1) and further sandbox nodes, all on this host."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.cluster = self._start_head()
        self.nodes: dict[str, Any] = {"n1": self.cluster.head_node}

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def _start_head(self) -> Cluster:
        for attempt in range(1, START_TRIES + 1):
            cluster = Cluster(initialize_head=False)
            try:
                cluster.add_node(
                    **node_args("n1"),
                    include_dashboard=False,
                    temp_dir=self.temp_dir,
                    _system_config=HEALTH,
                )
                return cluster
            except Exception:
                self._kill_leftovers()
                if attempt == START_TRIES:
                    raise
        raise AssertionError("unreachable")

    def add_node(self, name: str) -> Any:
        self.nodes[name] = self.cluster.add_node(**node_args(name))
        self.cluster.wait_for_nodes()
        return self.nodes[name]

    def kill_node(self, name: str) -> None:
        """Kill a (non-head) node at once, as a crash would."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            ray.shutdown()
        with contextlib.suppress(Exception):
            self.cluster.shutdown()
        self._kill_leftovers()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """Kill the Ray processes this cluster started: their command lines name its temp dir."""
        for pid in _pids_naming(self.temp_dir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _pids_naming(text: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
    return out
