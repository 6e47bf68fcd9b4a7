"""Where a routed test's time goes, split from the worker's record timestamps.

    .venv/bin/python benchmarks/pertest.py [-n 60] [--isolation fork|container]
        [--scope test|module] [--jobs 1] [--profile FILE]

Runs `pytest --sandbox=all` in this process on N trivial tests (the image is built
by a first, untimed run) and prints, per test (p50 and p95):
- in the sandbox, from the records' own times (`ts`): the test itself (start record to
  finish record: with fork, the fork, the child's run and its reports) and the gap from
  one finish to the next start (with fork, the reset and its verification);
- the stream: from a record's time in the sandbox to its arrival at the host;
- the host: the queue hop from a finish's arrival to the main thread firing its
  reports, and the firing itself (deserialisation, hooks, terminal).
`--profile FILE` writes a cProfile of the host side of the timed run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandboxd import daemon  # noqa: E402

# The project's conftest times the host side when OUT_ENV names a file (only in the timed
# run on the host: the variable does not reach the sandbox, where the conftest is inert).
OUT_ENV = "SANDBOX_PERTEST_OUT"
CONFTEST = textwrap.dedent(
    """
    import json, os, time

    ARRIVALS, FIRED = [], []


    def pytest_configure(config):
        if not os.environ.get("OUT_ENV"):
            return
        from pytest_sandbox import controller, records

        feed, fire = records.RecordReader.feed, controller.Controller._fire

        def timed_feed(self, data):
            for record in feed(self, data):
                ARRIVALS.append((time.time(), record))
                yield record

        def timed_fire(self, item, result):
            started = time.time()
            fire(self, item, result)
            FIRED.append((item.nodeid, started, time.time()))

        records.RecordReader.feed = timed_feed
        controller.Controller._fire = timed_fire


    def pytest_unconfigure(config):
        out = os.environ.get("OUT_ENV")
        if out:
            with open(out, "w") as f:
                json.dump({"arrivals": ARRIVALS, "fired": FIRED}, f)
    """
).replace("OUT_ENV", OUT_ENV)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def line(label: str, values: list[float]) -> None:
    ms = [v * 1e3 for v in values]
    print(
        f"{label:44} p50 {pct(ms, 0.5):7.2f} ms  p95 {pct(ms, 0.95):7.2f} ms"
        f"  sum {sum(ms):8.1f} ms  ({len(ms)})"
    )


def analyse(wall: float, n: int, data: dict[str, Any]) -> None:
    """Print the split of the timed run."""
    said = [(arrived, r) for arrived, r in data["arrivals"] if "ts" in r]
    fired = data["fired"]
    starts = {r["nodeid"]: r["ts"] for _, r in said if r["t"] == "start"}
    finishes = {r["nodeid"]: r["ts"] for _, r in said if r["t"] == "finish"}
    arrived_finish = {r["nodeid"]: a for a, r in said if r["t"] == "finish"}
    inside = [finishes[k] - starts[k] for k in finishes if k in starts]
    gaps: list[float] = []
    last_finish: float | None = None
    for _, r in sorted(said, key=lambda ar: ar[1]["ts"]):
        if r["t"] == "finish":
            last_finish = r["ts"]
        elif r["t"] == "start" and last_finish is not None:
            gaps.append(r["ts"] - last_finish)
            last_finish = None
    kinds: dict[str, int] = {}
    for _, r in said:
        kinds[r["t"]] = kinds.get(r["t"], 0) + 1
    print(f"\n{n} tests, wall {wall:.2f} s ({wall / n * 1e3:.1f} ms/test); records {kinds}")
    line("sandbox: start -> finish (the test)", inside)
    line("sandbox: finish -> next start (between)", gaps)
    line("stream: said in the sandbox -> at the host", [a - r["ts"] for a, r in said])
    line("host: finish arrived -> firing starts", [s - arrived_finish[k] for k, s, _ in fired])
    line("host: firing the reports", [e - s for _, s, e in fired])
    line("end to end: finish said -> fired", [e - finishes[k] for k, _, e in fired])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-n", type=int, default=60)
    parser.add_argument("--isolation", default="fork")
    parser.add_argument("--scope", default="test")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args()
    project = Path(tempfile.mkdtemp(prefix="sandbox-pertest-"))
    body = "\n".join(f"def test_{i}():\n    assert {i} + 1 == {i + 1}\n" for i in range(args.n))
    (project / "test_trivial.py").write_text(body)
    (project / "test_one.py").write_text("def test_one():\n    pass\n")
    (project / "conftest.py").write_text(CONFTEST)
    (project / "pytest.ini").write_text("[pytest]\n")
    paths = daemon.DaemonPaths(Path(tempfile.mkdtemp(prefix="sbxp-", dir="/tmp")) / "d.sock")
    env = {**os.environ, daemon.SOCKET_ENV: str(paths.socket)}
    env.pop(daemon.EMBEDDED_ENV, None)
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox=all"]
    pytest += [f"--sandbox-scope={args.scope}", f"--sandbox-isolation={args.isolation}"]
    pytest += [f"--sandbox-jobs={args.jobs}"]
    out = project.parent / f"{project.name}.json"
    try:
        # Untimed: builds the image and warms the daemon's pool.
        subprocess.run([*pytest, "test_one.py"], cwd=project, env=env, check=True)
        timed = [*pytest, "test_trivial.py"]
        if args.profile:
            timed[1:1] = ["-m", "cProfile", "-o", str(args.profile)]
        started = time.perf_counter()
        done = subprocess.run(timed, cwd=project, env={**env, OUT_ENV: str(out)}, check=False)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"the timed run failed ({done.returncode})")
        analyse(wall, args.n, json.loads(out.read_text()))
    finally:
        daemon.stop(paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
