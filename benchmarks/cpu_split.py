"""Where the CPU goes: `pytest --sandbox` scope test against the engine's own churn.

    .venv/bin/python benchmarks/cpu_split.py [-n 60] [--jobs 2] [--parallel 4]

Both runs are CPU-bound on a small machine, so wall time follows CPU time. For each run
it prints the machine's CPU seconds (from /proc/stat), dockerd's and containerd's, and
those of this script's children (the pytest process with its embedded service, or the
docker CLIs); the rest is shims, runc, the containers' own processes and the kernel.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402

from sandboxd.client import SandboxClient  # noqa: E402
from sandboxd.server import start_embedded  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / TICK


def process_cpu(name: str) -> float:
    """CPU seconds of every process called `name`, its reaped children included."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != name:
                continue
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in stat[11:15]) / TICK
    return total


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def measure(label: str, run: Callable[[], object]) -> None:
    before = (machine_cpu(), process_cpu("dockerd"), process_cpu("containerd"), children_cpu())
    wall = time.perf_counter()
    run()
    wall = time.perf_counter() - wall
    after = (machine_cpu(), process_cpu("dockerd"), process_cpu("containerd"), children_cpu())
    machine, dockerd, containerd, children = (b - a for a, b in zip(before, after, strict=True))
    rest = machine - dockerd - containerd - children
    print(
        f"{label:34} wall {wall:6.1f} s  cpu {machine:6.1f} s  dockerd {dockerd:5.1f}  "
        f"containerd {containerd:5.1f}  client side {children:5.1f}  rest {rest:5.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-n", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2, help="--sandbox-jobs for the plugin run")
    parser.add_argument("--parallel", type=int, default=4, help="docker runs at once")
    args = parser.parse_args()
    project = bench.make_project(args.n)
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox=all"]
    # Build the image first, so neither run pays for it.
    subprocess.run([*pytest_cmd, "test_first.py"], cwd=project, capture_output=True, check=True)
    embedded = start_embedded()
    try:
        with SandboxClient(embedded.address) as client:
            image, pythonpath = bench.bench_image(client, project)
    finally:
        embedded.stop()
    plugin = [*pytest_cmd, "--sandbox-scope=test", f"--sandbox-jobs={args.jobs}", "test_trivial.py"]
    measure(
        f"pytest --sandbox, {args.jobs} jobs",
        lambda: subprocess.run(plugin, cwd=project, capture_output=True, check=True),
    )
    churn = ["docker", "run", "--rm", "--network", "none", "-e", f"PYTHONPATH={pythonpath}"]
    churn += [image, "python3", "-c", "import pytest"]
    measure(
        f"docker run x{args.n}, {args.parallel} at once",
        lambda: bench.docker_run_all([churn] * args.n, args.parallel),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
