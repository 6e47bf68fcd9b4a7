"""Cluster gateway vs one node's engine directly, measured in the same run.

Starts the namespace lab of tests/cluster (N nodes, each its own Docker engine and Ray
node, and the gateway: `sandboxd serve` with `engine = "cluster"`), plus a plain
`sandboxd serve` on node 0's engine (`engine = "docker"`, its DOCKER_HOST). Then, in
alternating rounds so both see the same machine load:

- sandboxes per second: create, exec `true`, destroy, from `--clients` threads;
- exec latency: `true` in one existing sandbox, p50/p95;
- create latency p50 (the gateway's extra part is placement plus the hop to the agent).

Prints each figure and the gateway/direct ratio. Needs root (it makes network
namespaces) and Ray (the `cluster` extra).

    python benchmarks/cluster.py --nodes 2 --clients 4 --sandboxes 24 --execs 100
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "cluster"), str(ROOT / "tests" / "load")]

import plumbing  # noqa: E402
from lab import Lab, LabSpec  # noqa: E402

from sandboxd.api import SandboxRequest, requested_limits  # noqa: E402
from sandboxd.client import SandboxClient  # noqa: E402
from sandboxd.limits import MiB  # noqa: E402

#: Small sandboxes: Ray's room per node (--num-cpus) must hold `--clients` of them.
LIMITS = requested_limits(cpus=0.25, memory_bytes=64 * MiB, pids=32, timeout_seconds=60.0)


@dataclass
class Figures:
    """What one target measured, over all rounds."""

    create_seconds: list[float] = field(default_factory=list)
    exec_seconds: list[float] = field(default_factory=list)
    cycles: int = 0
    cycle_wall: float = 0.0
    #: CPU seconds the service process (gateway or direct sandboxd) spent measuring.
    cpu: float = 0.0

    def per_second(self) -> float:
        return self.cycles / self.cycle_wall if self.cycle_wall else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cycle(client: SandboxClient, figures: Figures) -> None:
    """One sandbox's life: create, exec `true`, destroy."""
    started = time.perf_counter()
    box = client.create_sandbox(SandboxRequest(limits=LIMITS))
    figures.create_seconds.append(time.perf_counter() - started)
    try:
        client.exec(box.id, ["true"], timeout=30.0)
    finally:
        client.destroy_sandbox(box.id)


def churn(client: SandboxClient, figures: Figures, clients: int, sandboxes: int) -> None:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: cycle(client, figures), range(sandboxes)))
    figures.cycle_wall += time.perf_counter() - started
    figures.cycles += sandboxes


def exec_latency(client: SandboxClient, figures: Figures, execs: int) -> None:
    box = client.create_sandbox(SandboxRequest(limits=LIMITS))
    try:
        client.exec(box.id, ["true"], timeout=30.0)  # warm: the first exec sets things up
        for _ in range(execs):
            started = time.perf_counter()
            client.exec(box.id, ["true"], timeout=30.0)
            figures.exec_seconds.append(time.perf_counter() - started)
    finally:
        client.destroy_sandbox(box.id)


def alternate(
    lab: Lab,
    targets: dict[str, SandboxClient],
    rounds: int,
    step: Callable[[SandboxClient, Figures], None],
) -> dict[str, Figures]:
    figures = {name: Figures() for name in targets}
    for _ in range(rounds):
        for name, client in targets.items():
            before = cpu_seconds(lab, name)
            step(client, figures[name])
            figures[name].cpu += cpu_seconds(lab, name) - before
    return figures


def cpu_seconds(lab: Lab, name: str) -> float:
    """CPU time (user + system) so far of the lab process `name` (its cgroup's processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in plumbing.cgroup_pids(f"{lab.id}/{name}/procs"):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def report(figures: dict[str, Figures]) -> None:
    gw, direct = figures["gateway"], figures["direct"]

    def ms(q: float) -> tuple[float, float]:
        return 1e3 * percentile(gw.exec_seconds, q), 1e3 * percentile(direct.exec_seconds, q)

    rows = [
        ("sandboxes/s (create+exec+destroy)", (gw.per_second(), direct.per_second())),
        ("create p50 (s)", tuple(statistics.median(f.create_seconds) for f in (gw, direct))),
        ("exec `true` p50 (ms)", ms(0.5)),
        ("exec `true` p95 (ms)", ms(0.95)),
    ]
    print(f"\n{'':36} {'gateway':>10} {'direct':>10} {'ratio':>7}")
    for label, (g, d) in rows:
        print(f"{label:36} {g:10.3f} {d:10.3f} {g / d if d else float('nan'):7.2f}")
    extra_exec = percentile(gw.exec_seconds, 0.5) - percentile(direct.exec_seconds, 0.5)
    extra_create = statistics.median(gw.create_seconds) - statistics.median(direct.create_seconds)
    print(f"\ngateway cost per exec call (p50 difference): {1e3 * extra_exec:.1f} ms")
    print(f"placement + hop per create (p50 difference): {1e3 * extra_create:.1f} ms")
    for name, f in figures.items():
        calls = 3 * f.cycles + len(f.exec_seconds)  # create, exec, destroy per cycle
        per_call = 1e3 * f.cpu / calls
        print(f"{name} process CPU: {f.cpu:.1f} s for {f.cycles} sandboxes and "
              f"{len(f.exec_seconds)} more execs, {per_call:.1f} ms per call")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4, help="threads cycling sandboxes")
    parser.add_argument("--sandboxes", type=int, default=24, help="sandboxes per round")
    parser.add_argument("--execs", type=int, default=100, help="execs per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    args = parser.parse_args()

    spec = LabSpec(nodes=args.nodes, node_cpus=4.0, node_memory_bytes=2 << 30,
                   gateway_settings={"pool_max_per_key": 0})  # fmt: skip
    started = time.perf_counter()
    with Lab(spec) as lab:
        print(f"lab of {args.nodes} nodes up in {time.perf_counter() - started:.1f}s")
        direct = {"engine": "docker", "docker_host": lab.nodes[0].docker_host,
                  "instance_id": f"{lab.id}direct", "pool_max_per_key": 0}  # fmt: skip
        lab.start_sandboxd("direct", direct)
        targets = {
            "gateway": SandboxClient(lab.gateway_address, retry_seconds=10.0),
            "direct": SandboxClient(f"unix:{lab.root / 'direct'}.sock", retry_seconds=10.0),
        }
        try:
            for client in targets.values():  # warm-up: agents, images, first placement
                cycle(client, Figures())
            figures = alternate(
                lab, targets, args.rounds, lambda c, f: churn(c, f, args.clients, args.sandboxes)
            )
            latency = alternate(
                lab, targets, args.rounds, lambda c, f: exec_latency(c, f, args.execs)
            )
            for name in figures:
                figures[name].exec_seconds = latency[name].exec_seconds
                figures[name].cpu += latency[name].cpu
            report(figures)
        finally:
            for client in targets.values():
                client.close()
    left = lab.leftovers()
    print(f"\nlab removed: {left or 'nothing left'}")
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
