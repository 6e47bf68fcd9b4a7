"""One node of the lab: its namespace, its Docker engine and its Ray node."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import plumbing

if TYPE_CHECKING:
    from lab import Lab

HOST_DAEMON_JSON = Path("/etc/docker/daemon.json")


class LabNode:
    """Node `index` of a lab; the lab decides when each part starts and stops."""

    def __init__(self, lab: Lab, index: int) -> None:
        from lab import SUBNET

        self.lab = lab
        self.index = index
        #: Ray's --node-name: stable across a restart, so the new agent reaps the old
        #: agent's containers (labelled with it).
        self.name = f"{lab.id}-n{index}"
        self.netns = self.name
        self.ip = f"{SUBNET}.{10 + index}"
        self.dir = lab.root / f"n{index}"
        self.cgroup = f"{lab.id}/n{index}"
        self.ray_log = f"n{index}-ray"
        self.engine_log = f"n{index}-dockerd"
        self._dockerd: subprocess.Popen[bytes] | None = None
        self._ray: subprocess.Popen[bytes] | None = None

    @property
    def docker_host(self) -> str:
        return f"unix://{self.dir}/docker.sock"

    def docker(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        """The docker CLI against this node's engine; its stdout."""
        return plumbing.run(["docker", "-H", self.docker_host, *args], timeout=timeout, check=check)

    # -- engine ------------------------------------------------------------------------

    def _daemon_config(self) -> Path:
        """The host's registered runtimes (gVisor) and nothing else of its daemon.json."""
        runtimes: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError):
            runtimes = json.loads(HOST_DAEMON_JSON.read_text()).get("runtimes", {})
        path = self.dir / "daemon.json"
        path.write_text(json.dumps({"runtimes": runtimes} if runtimes else {}))
        return path

    def start_engine(self, timeout: float = 60.0) -> None:
        """`dockerd` in the node's namespace with its own roots, socket and cgroup parent.

        Raises:
            RuntimeError: it exited or did not answer within `timeout`.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [
            "dockerd",
            f"--config-file={self._daemon_config()}",
            f"--data-root={self.dir}/data",
            f"--exec-root={self.dir}/exec",
            f"--host={self.docker_host}",
            f"--pidfile={self.dir}/docker.pid",
            f"--cgroup-parent=/{self.cgroup}/docker",
            "--exec-opt=native.cgroupdriver=cgroupfs",
        ]
        self._dockerd = self.lab.spawn(
            self.engine_log, f"{self.cgroup}/engine", self.netns, argv, {}
        )
        deadline = time.monotonic() + timeout
        while self.docker("version", "--format", "{{.Server.Version}}", check=False).strip() == "":
            if self._dockerd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"dockerd of {self.name} did not come up:\n{self.lab.log(self.engine_log)}"
                )
            time.sleep(0.2)

    def load_image(self, tar: Path) -> None:
        self.docker("load", "-q", "-i", str(tar), timeout=300)

    def has_runsc(self) -> bool:
        return "runsc" in self.docker("info", "--format", "{{json .Runtimes}}", check=False)

    # -- Ray ---------------------------------------------------------------------------

    def start_ray(self, *, head: bool) -> None:
        """`ray start --block` in the node's namespace, pointed at the node's engine."""
        from lab import HEAD_SYSTEM_CONFIG, RAY_PORT

        spec = self.lab.spec
        resources = {"sandbox_node": 1, **({"sandbox_runsc": 1} if self.has_runsc() else {})}
        argv = [
            str(Path(sys.executable).with_name("ray")), "start", "--block",
            f"--node-ip-address={self.ip}", f"--node-name={self.name}",
            f"--num-cpus={spec.node_cpus:g}", f"--memory={spec.node_memory_bytes}",
            f"--object-store-memory={spec.object_store_bytes}",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={self.dir}/ray", "--disable-usage-stats",
            "--include-log-monitor=false",
        ]  # fmt: skip
        if head:
            argv += ["--head", f"--port={RAY_PORT}", "--include-dashboard=false",
                     f"--system-config={json.dumps(HEAD_SYSTEM_CONFIG)}"]  # fmt: skip
        else:
            argv += [f"--address={self.lab.ray_address}"]
        env = {"DOCKER_HOST": self.docker_host}
        self._ray = self.lab.spawn(self.ray_log, f"{self.cgroup}/ray", self.netns, argv, env)

    def stop_ray(self) -> None:
        """Kill what is left of a `ray start` that failed (its raylet may still run)."""
        plumbing.kill_until_gone([f"{self.cgroup}/ray/procs"])
        if self._ray is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._ray.wait(timeout=10)
        self._ray = None

    def running(self) -> bool:
        """Whether the node's engine and Ray node are up (not killed)."""
        return all(p is not None and p.poll() is None for p in (self._dockerd, self._ray))

    def ray_exited(self) -> bool:
        """Whether this node's `ray start --block` has ended (it failed to join)."""
        return self._ray is not None and self._ray.poll() is not None

    # -- loss ----------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the node's Ray processes, engine and containers; unmount what they left.

        The data root stays, as on a machine that lost power: the engine finds its old
        containers (dead) when it starts again.
        """
        plumbing.kill_until_gone(
            [f"{self.cgroup}/ray/procs", f"{self.cgroup}/engine/procs", f"{self.cgroup}/docker"],
            netns=[self.netns],
        )
        for proc in (self._ray, self._dockerd):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        self._ray = self._dockerd = None
        plumbing.kill_until_gone([self.cgroup])
        plumbing.unmount_under(str(self.dir))

    def containers(self, *filters: str) -> list[str]:
        """Ids of the containers (any state) on this node's engine matching `filters`."""
        args = [a for f in filters for a in ("--filter", f)]
        return self.docker("ps", "-aq", "--no-trunc", *args).split()
