"""A local multi-node Ray cluster for tests and benchmarks of the cluster engine (not product
code): `ray.cluster_utils.Cluster` with every node on loopback and a private temp dir.

The head is sandbox node n1 (one raylet fewer on a 2-core machine); more nodes join with
`add_node`. On a loaded machine a raylet can take longer than Ray's fixed 30 s wait for it
to register with the head (it registers once its agents, slow Python imports, are up): the
wait is made patient instead (`patient_registration`), which costs nothing when the node is
quick. Should the head fail anyway, starting it is tried again, after killing what the
failed try left running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
import ray._private.services
from ray.cluster_utils import Cluster

#: What this cluster's processes (and this one, the tests' driver and gateway) are started
#: with, and only while it runs: address discovery gives loopback, with no probe of the
#: host's outside address (where nothing of ours listens and no test may send); a raylet
#: waits long for its agents. Later clusters of the same session (the namespace lab) get
#: their own settings back.
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_agent_register_timeout_ms": "300000"}

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
#: How long a new node may take to register with the head before its start has failed.
REGISTER_SECONDS = 180.0


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
        self._saved_env = {name: os.environ.get(name) for name in LOCAL_ENV}
        self._saved_cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
        os.environ.update(LOCAL_ENV)
        # Read once, when Ray was imported (maybe before this module): set it here too.
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            self.cluster = self._start_head()
        except BaseException:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self._restore_env()
            raise
        self.nodes: dict[str, Any] = {"n1": self.cluster.head_node}

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def _start_head(self) -> Cluster:
        for attempt in range(1, START_TRIES + 1):
            cluster = Cluster(initialize_head=False)
            try:
                with patient_registration():
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
        with patient_registration():
            self.nodes[name] = self.cluster.add_node(**node_args(name))
        self.cluster.wait_for_nodes(timeout=REGISTER_SECONDS)
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
        self._restore_env()

    def _restore_env(self) -> None:
        ray_constants.ENABLE_RAY_CLUSTER = self._saved_cluster_flag
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def _kill_leftovers(self) -> None:
        """Kill the Ray processes this cluster started: their command lines name its temp dir."""
        for pid in _pids_naming(self.temp_dir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@contextlib.contextmanager
def patient_registration() -> Iterator[None]:
    """Within the block, a starting node waits up to `REGISTER_SECONDS` for its raylet to
    register, instead of Ray's fixed 30 s: `Node()` polls `services.get_node` in a loop
    that gives up after 30 s, so each poll here waits on until the node is there."""
    services = ray._private.services
    get_node = services.get_node

    def patient(gcs_address: str, node_id: str) -> Any:
        deadline = time.monotonic() + REGISTER_SECONDS
        while True:
            try:
                return get_node(gcs_address, node_id)
            except RuntimeError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    services.get_node = patient
    try:
        yield
    finally:
        services.get_node = get_node


def _pids_naming(text: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
    return out
