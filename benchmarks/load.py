"""Load benchmark: N concurrent gRPC clients cycle a few hundred sandboxes through sandboxd.

Runs `sandboxd serve` in a child process, so its RSS, open fds and threads are read from
/proc before and after. Prints throughput, p50/p99 per RPC and the resource figures.

    python benchmarks/load.py --clients 16 --rounds 20
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "load"))

from sandboxd_process import BASE_IMAGE, SandboxdProcess, containers_of, wait_until
from workload import run_load, snapshot


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20, help="sandboxes per client")
    parser.add_argument("--slots", type=int, default=64, help="caps.sandboxes")
    parser.add_argument("--pool", type=int, default=4, help="pool_max_per_key (0: no pool)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="sbx-bench-", dir="/tmp"))
    proc = SandboxdProcess(
        root, {"caps": {"sandboxes": args.slots}, "pool_max_per_key": args.pool}, grace=10
    )
    try:
        proc.start()
        print(f"sandboxd pid {proc.pid}, base {BASE_IMAGE}, started in {proc.started_seconds:.2f}s")
        run_load(proc.address, clients=args.clients, rounds=1)  # warm-up
        time.sleep(1)
        before = snapshot(proc)
        result = run_load(proc.address, clients=args.clients, rounds=args.rounds)
        time.sleep(1)
        after = snapshot(proc)
        print(
            f"\n{result.sandboxes} sandboxes, {args.clients} clients, "
            f"{result.wall_seconds:.1f}s: {result.throughput():.2f} sandboxes/s"
        )
        print(result.table())
        print(f"\nfailures: {len(result.failures)} (undocumented: {len(result.undocumented())})")
        print(f"wrong results: {len(result.wrong)}")
        print(f"RESOURCE_EXHAUSTED retries: {result.resource_exhausted_retries}")
        print(f"RSS     before {_mib(before['rss'])}  after {_mib(after['rss'])}")
        print(f"fds     before {before['fds']}  after {after['fds']}")
        print(f"threads before {before['threads']}  after {after['threads']}")
        code = proc.terminate()
        gone = wait_until(lambda: containers_of(proc.instance_id) == [], 30)
        print(f"sandboxd exit code {code}; containers left after stop: {0 if gone else 'some'}")
        ok = not result.undocumented() and not result.wrong and code == 0 and gone
        return 0 if ok else 1
    finally:
        proc.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
