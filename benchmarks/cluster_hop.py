"""What the cluster engine's extra hop costs, measured against the plain Docker engine in one run.

    .venv/bin/python benchmarks/cluster_hop.py [-n 30]

Two gateways on this host, both driving the host's Docker engine: one with the Docker
engine directly, one with the cluster engine over a local Ray cluster (two sandbox nodes
on loopback, tests/cluster/local_ray.py). Printed side by side: create + destroy per
sandbox (sequential), exec latency of `true` (p50/p95), a 1 MiB stdout exec, and
sandboxes per second with 4 clients creating at once.
The multi-node version with an engine per node is benchmarks/cluster.py.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandboxd.api import SandboxRequest, requested_limits  # noqa: E402
from sandboxd.client import SandboxClient  # noqa: E402
from sandboxd.config import ServerConfig  # noqa: E402
from sandboxd.limits import MiB  # noqa: E402
from sandboxd.server import create_server  # noqa: E402
from tests.cluster.local_ray import LocalRay  # noqa: E402

REQUEST = SandboxRequest(
    limits=requested_limits(cpus=0.25, memory_bytes=64 * MiB, pids=64, timeout_seconds=60)
)


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(client: SandboxClient, n: int) -> dict[str, float]:
    def cycle() -> None:
        box = client.create_sandbox(REQUEST)
        client.destroy_sandbox(box.id)

    cycle()  # warm: images resolved, agents started
    create = timed(cycle, n)
    box = client.create_sandbox(REQUEST)
    try:
        client.exec(box.id, ["true"])
        execs = timed(lambda: client.exec(box.id, ["true"]), n)
        start = time.perf_counter()
        client.exec(box.id, ["head", "-c", str(1 << 20), "/dev/zero"])
        stream = time.perf_counter() - start
    finally:
        client.destroy_sandbox(box.id)
    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: cycle(), range(n)))
    parallel = n / (time.perf_counter() - start)
    return {
        "create+destroy s": statistics.median(create),
        "exec p50 ms": 1e3 * pct(execs, 0.5),
        "exec p95 ms": 1e3 * pct(execs, 0.95),
        "1 MiB exec s": stream,
        "sandboxes/s (4 clients)": parallel,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=30)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hop-", dir="/tmp"))
    local = LocalRay()
    local.add_node("n2")
    common = {"pool_max_per_key": 0, "reap_interval_seconds": 3600.0, "state_dir": tmp}
    direct, _ = create_server(ServerConfig(**common), f"unix:{tmp}/direct.sock")  # type: ignore[arg-type]
    gateway, _ = create_server(
        ServerConfig(engine="cluster", cluster_address=local.address, **common),  # type: ignore[arg-type]
        f"unix:{tmp}/gateway.sock",
    )
    results = {}
    try:
        for name, service in (("docker", direct), ("cluster", gateway)):
            with SandboxClient(service.address) as client:
                client.wait_ready(timeout=60)
                results[name] = measure(client, args.n)
    finally:
        gateway.stop(grace=2.0)
        direct.stop(grace=2.0)
        local.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'':26}{'docker':>10}{'cluster':>10}{'ratio':>8}")
    for key in results["docker"]:
        d, c = results["docker"][key], results["cluster"][key]
        print(f"{key:26}{d:10.3f}{c:10.3f}{c / d:8.2f}")


if __name__ == "__main__":
    main()
