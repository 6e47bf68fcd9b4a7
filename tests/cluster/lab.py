"""A multi-node sandbox cluster on one machine, for tests and benchmarks (not product code).

Each node is a network namespace joined to a hub namespace's bridge by a veth pair, with
a private address and no route out; in it run the node's own Docker engine (own data
root, exec root, socket, pid file and cgroup parent) and a Ray node (`ray start --block`
with DOCKER_HOST naming that engine). Node 0 is the Ray head; the gateway (`sandboxd
serve` with `engine = "cluster"`) runs in its namespace and listens on a unix socket, so
the test process reaches it without any network. Nothing is added to the host's network
namespace: every interface is created inside the lab's namespaces.

Every process runs under `supervisor.py` in a cgroup named after the lab, so killing a
node (its Ray processes, its engine and its containers) or tearing down the lab finds
them by cgroup and namespace, also after a failed test; `leftovers()` lists whatever is
still there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import TimeoutExpired
from typing import Any

import plumbing
from lab_node import LabNode

SUPERVISOR = Path(__file__).resolve().parent / "supervisor.py"
SUBNET = "10.77.0"  # inside the lab's own namespaces: two labs never share a link
RAY_PORT = 6379
#: Fast node-death detection on the head (the default takes about 30 s).
HEAD_SYSTEM_CONFIG = {
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
    "health_check_timeout_ms": 1000,
}
#: Ray must never phone home (no route out anyway), nor start idle workers on 2 cores.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_prestart_worker_first_driver": "0"}


@dataclass(frozen=True)
class LabSpec:
    """What a lab is made of; the defaults suit a 2-core CI machine."""

    nodes: int = 2
    #: Ray's --num-cpus / --memory per node: the room sandboxes reserve their limits from.
    node_cpus: float = 2.0
    node_memory_bytes: int = 1 << 30
    object_store_bytes: int = 256 << 20
    #: Node indexes whose engine gets the base image loaded (the others get it through
    #: the cluster, from the gateway).
    image_on: tuple[int, ...] | None = None
    base_image: str = "sandbox-base:bookworm"
    #: Extra settings for the gateway's config file (caps, timeouts, ...).
    gateway_settings: Mapping[str, Any] = field(default_factory=dict)
    gateway: bool = True


class Lab:
    """N network namespaces, each with a Docker engine and a Ray node, and a gateway."""

    def __init__(self, spec: LabSpec | None = None, *, instance_id: str | None = None) -> None:
        self.spec = spec or LabSpec()
        self.id = "sbl" + uuid.uuid4().hex[:6]
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.id}-", dir="/tmp"))
        (self.root / "owner").write_text(str(os.getpid()))
        self.hub = f"{self.id}-hub"
        self.instance_id = instance_id or f"{self.id}gw"
        self.nodes = [LabNode(self, i) for i in range(self.spec.nodes)]
        self.gateway_socket = self.root / "gateway.sock"
        self._gateway: subprocess.Popen[bytes] | None = None

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> Lab:
        """Make the network, start the engines, the Ray nodes and the gateway.

        Raises:
            RuntimeError: a part did not come up (its log is in the message).
        """
        sweep_stale_labs()
        self._make_network()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: n.start_engine(), self.nodes))
            wanted = self.spec.image_on
            loaded = self.nodes if wanted is None else [self.nodes[i] for i in wanted]
            if loaded:
                image = self._saved_base_image()
                list(pool.map(lambda n: n.load_image(image), loaded))
                image.unlink()
        # A worker's `ray start` gives up at once when the head's GCS does not answer yet.
        self.join_ray(self.nodes[:1], head=True)
        self.join_ray(self.nodes[1:], head=False)
        if self.spec.gateway:
            self.start_gateway()
        return self

    def close(self) -> None:
        """Stop everything and remove every trace; safe to call twice.

        With SANDBOX_LAB_LOGS=DIR set, the processes' logs are kept there first.
        """
        self.stop_gateway()
        keep = os.environ.get("SANDBOX_LAB_LOGS")
        if keep and self.root.is_dir():
            target = Path(keep) / self.id
            target.mkdir(parents=True, exist_ok=True)
            for log in self.root.glob("*.log"):
                shutil.copy(log, target / log.name)
        destroy_lab(self.id, self.root)

    def __enter__(self) -> Lab:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- network -----------------------------------------------------------------------

    def _make_network(self) -> None:
        """A hub namespace with a bridge; a veth from it into each node, made in place."""
        ns = plumbing.run
        ns(["ip", "netns", "add", self.hub])
        ns(["ip", "-n", self.hub, "link", "set", "lo", "up"])
        ns(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        ns(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for node in self.nodes:
            port = f"v{node.index}"
            ns(["ip", "netns", "add", node.netns])
            ns(["ip", "-n", node.netns, "link", "set", "lo", "up"])
            ns(["ip", "-n", self.hub, "link", "add", port, "type", "veth",
                "peer", "name", "eth0", "netns", node.netns])  # fmt: skip
            ns(["ip", "-n", self.hub, "link", "set", port, "master", "br0", "up"])
            ns(["ip", "-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", "eth0"])
            ns(["ip", "-n", node.netns, "link", "set", "eth0", "up"])

    def _saved_base_image(self) -> Path:
        path = self.root / "base-image.tar"
        plumbing.run(["docker", "save", "-o", str(path), self.spec.base_image], timeout=300)
        return path

    # -- processes ---------------------------------------------------------------------

    def spawn(
        self, name: str, cgroup: str, netns: str, argv: Sequence[str], env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in `netns` under a supervisor; output to ROOT/NAME.log."""
        own = plumbing.make_cgroup(f"{cgroup}/super")
        child = plumbing.make_cgroup(f"{cgroup}/procs")
        command = [sys.executable, str(SUPERVISOR), str(own), str(child), "--",
                   "nsenter", f"--net=/run/netns/{netns}", *argv]  # fmt: skip
        with (self.root / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **RAY_ENV, **env},
                cwd=self.root,
                start_new_session=True,
            )

    def log(self, name: str, chars: int = 4000) -> str:
        try:
            return (self.root / f"{name}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def in_head(self, argv: Sequence[str], timeout: float = 60.0) -> str:
        """Run a short command in the head's namespace; its stdout."""
        env = {**os.environ, **RAY_ENV}
        done = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.nodes[0].netns}", *argv],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=self.root, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} in the head failed: {done.stderr[-2000:]}")
        return done.stdout

    # -- Ray -----------------------------------------------------------------------------

    @property
    def ray_address(self) -> str:
        return f"{self.nodes[0].ip}:{RAY_PORT}"

    def join_ray(self, nodes: Sequence[LabNode], *, head: bool, attempts: int = 3) -> None:
        """Start the nodes' Ray and wait until they are alive, again for those that failed.

        `ray start` gives up when its raylet has not registered within 30 s, which on a
        loaded 2-core machine happens now and then.

        Raises:
            RuntimeError: a node still failed after `attempts` starts.
        """
        pending = list(nodes)
        for attempt in range(1, attempts + 1):
            for node in pending:
                node.start_ray(head=head)
            try:
                self.wait_nodes_alive([n.name for n in pending])
                return
            except RuntimeError:
                failed = [n for n in pending if n.ray_exited()]
                if attempt == attempts or not failed:
                    raise
            for node in failed:
                node.stop_ray()
            pending = failed

    def alive_nodes(self) -> list[str]:
        """Names of the Ray nodes the head counts alive (asked through a short driver)."""
        probe = (
            f"import json, ray; ray.init(address={self.ray_address!r}, logging_level='ERROR');"
            "print(json.dumps(sorted(n['NodeName'] for n in ray.nodes() if n['Alive'])))"
        )
        return list(json.loads(self.in_head([sys.executable, "-c", probe]).splitlines()[-1]))

    def wait_nodes_alive(self, names: Sequence[str], timeout: float = 180.0) -> None:
        """Wait until every named node is alive in Ray.

        Raises:
            RuntimeError: a node did not join in time.
        """
        deadline = time.monotonic() + timeout
        alive: list[str] = []
        while time.monotonic() < deadline:
            exited = [n.name for n in self.nodes if n.name in names and n.ray_exited()]
            if exited:
                break
            # A driver started before the head's GCS answers may wait long: ask again.
            with contextlib.suppress(RuntimeError, ValueError, IndexError, TimeoutExpired):
                alive = self.alive_nodes()
                if set(names) <= set(alive):
                    return
            time.sleep(1.0)
        logs = "\n".join(f"--- {n.name}\n{self.log(n.ray_log)}" for n in self.nodes)
        raise RuntimeError(f"Ray nodes {list(names)} not all alive (alive: {alive}):\n{logs}")

    # -- gateway -----------------------------------------------------------------------

    @property
    def gateway_address(self) -> str:
        return f"unix:{self.gateway_socket}"

    def start_gateway(self) -> None:
        """`sandboxd serve` with the cluster engine, in the head's namespace.

        Raises:
            RuntimeError: it exited or did not serve in time.
        """
        settings = {"engine": "cluster", "cluster_address": self.ray_address,
                    "instance_id": self.instance_id, **self.spec.gateway_settings}  # fmt: skip
        self._gateway = self.start_sandboxd("gateway", settings)

    def start_sandboxd(
        self, name: str, settings: Mapping[str, Any], timeout: float = 120.0
    ) -> subprocess.Popen[bytes]:
        """`sandboxd serve` in the head's namespace on ROOT/NAME.sock, once it serves.

        The lab kills it at `close()`; the caller may stop it earlier.

        Raises:
            RuntimeError: it exited or did not serve within `timeout`.
        """
        from sandboxd_process import write_config

        from sandboxd.client import SandboxClient

        base = {"base_image": self.spec.base_image, "state_dir": str(self.root / f"{name}-state")}
        config = write_config(self.root / f"{name}.toml", {**base, **settings})
        address = f"unix:{self.root / name}.sock"
        argv = [sys.executable, "-m", "sandboxd.cli", "--config", str(config),
                "serve", "--listen", address, "--grace", "5"]  # fmt: skip
        env = {"TMPDIR": str(self.root), "PYTHONUNBUFFERED": "1"}
        proc = self.spawn(name, f"{self.id}/{name}", self.nodes[0].netns, argv, env)
        deadline = time.monotonic() + timeout
        with SandboxClient(address, retry_seconds=1.0) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{self.log(name)}")
                with contextlib.suppress(Exception):
                    if client.health(timeout=1.0) == "SERVING":
                        return proc
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not serve:\n{self.log(name)}")
                time.sleep(0.2)

    def stop_gateway(self, grace: float = 20.0) -> None:
        """SIGTERM the gateway (it removes its sandboxes), then kill what is left of it."""
        proc, self._gateway = self._gateway, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        plumbing.kill_until_gone([f"{self.id}/gateway/procs"])
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        plumbing.kill_until_gone([f"{self.id}/gateway"])

    # -- nodes ---------------------------------------------------------------------------

    def kill_node(self, index: int) -> None:
        """Kill node `index` at once: its Ray processes, its engine and its containers."""
        self.nodes[index].kill()

    def restart_node(self, index: int) -> None:
        """Start node `index` again on the same data root: engine, then its Ray node."""
        node = self.nodes[index]
        node.kill()  # whatever is left of it, e.g. an engine started without its Ray node
        node.start_engine()
        self.join_ray([node], head=index == 0)

    def node_of_container(self, docker_id: str) -> LabNode | None:
        """The node whose engine holds this container (docker id or its prefix)."""
        for node in self.nodes:
            if node.docker("inspect", "--format", "{{.Id}}", docker_id, check=False).strip():
                return node
        return None

    # -- leftovers ---------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Everything of this lab still on the machine; empty after `close()`."""
        return lab_leftovers(self.id, self.root)


def lab_leftovers(lab_id: str, root: Path) -> list[str]:
    """Namespaces, processes, mounts, cgroups and files the lab `lab_id` left."""
    left = [f"netns {n}" for n in plumbing.lab_netns(lab_id)]
    left += [f"process {p}" for p in plumbing.processes_mentioning(str(root))]
    left += [f"process {p}" for p in sorted(plumbing.cgroup_pids(lab_id))]
    left += [f"mount {m}" for m in plumbing.mounts_under(str(root))]
    left += [f"cgroup {c}" for c in plumbing.cgroup_trees(lab_id)]
    if root.exists():
        left.append(f"directory {root}")
    return left


def destroy_lab(lab_id: str, root: Path) -> None:
    """Kill every process of the lab, unmount, delete its namespaces, cgroups and files.

    Needs nothing but the lab's id and directory, so it also clears a lab whose test
    process died.
    """
    # The commands first, then their supervisors: those reap the orphans and leave.
    top = plumbing.tracking_hierarchy()
    commands = (
        [
            str(d.relative_to(top))
            for d in (top / lab_id).rglob("*")
            if d.is_dir() and d.name in ("procs", "docker")
        ]
        if (top / lab_id).is_dir()
        else []
    )
    plumbing.kill_until_gone(commands, netns=plumbing.lab_netns(lab_id))
    deadline = time.monotonic() + 10
    while plumbing.cgroup_pids(lab_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    plumbing.kill_until_gone([lab_id])
    plumbing.unmount_under(str(root))
    for name in plumbing.lab_netns(lab_id):
        plumbing.delete_netns(name)
    plumbing.remove_cgroups(lab_id)
    shutil.rmtree(root, ignore_errors=True)


def sweep_stale_labs() -> None:
    """Destroy labs whose test process is gone (a run killed before its teardown)."""
    names = plumbing.run(["ip", "netns", "list"], check=False).split()
    ids = {n.split("-", 1)[0] for n in names if n.startswith("sbl") and n.endswith("-hub")}
    for lab_id in ids:
        for root in Path("/tmp").glob(f"{lab_id}-*"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((root / "owner").read_text()), 0)
                break  # its owner is alive: not stale
        else:
            roots = list(Path("/tmp").glob(f"{lab_id}-*"))
            destroy_lab(lab_id, roots[0] if roots else Path("/nonexistent"))
