"""Side-by-side timings, all measured in one run on this machine, printed with ratios.

    .venv/bin/python benchmarks/bench.py [-n 60] [--out benchmarks/results/bench.json]

(a) local pytest on N trivial tests
(b) naive: one `docker run --rm IMAGE python3 -m pytest NODEID` per test (autoload off)
(c) pytest --sandbox=all, scope test (a fresh container per test)
(d) pytest --sandbox=all, scope module and session
(e) the engine's churn: N x `docker run --rm IMAGE python3 -c "import pytest"`, best parallelism
(f) CreateSandbox latency, warm pool and cold
(g) BuildImage latency on a cache hit
plus the time from launching `pytest --sandbox` to the first routed test starting.
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
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_sandbox import snapshot  # noqa: E402
from sandboxd.api import SandboxRequest  # noqa: E402
from sandboxd.client import SandboxClient  # noqa: E402
from sandboxd.config import ServerConfig  # noqa: E402
from sandboxd.server import start_embedded  # noqa: E402

PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def make_project(n: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="sandbox-bench-"))
    tests = "\n".join(f"def test_{i}():\n    assert {i} + 1 == {i + 1}\n" for i in range(n))
    (root / "test_trivial.py").write_text(tests)
    double = "\n".join(f"def test_{i}():\n    assert {i} + 1 == {i + 1}\n" for i in range(2 * n))
    (root / "test_double.py").write_text(double)
    (root / "test_first.py").write_text(
        textwrap.dedent(
            """
            import time

            def test_first(record_property):
                record_property("started_unix", repr(time.time()))
            """
        )
    )
    (root / "pytest.ini").write_text("[pytest]\n")
    return root


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}")
    return wall, proc.stdout


def bench_image(client: SandboxClient, project: Path) -> tuple[str, str]:
    """The same image the plugin runs tests in: base + pytest + the project."""
    snap = snapshot.take(project)
    built = client.build_image(snap.fragment(""), context_files=snap.context)
    return built.image.tag, snap.pythonpath()


def time_creates(
    client: SandboxClient, spec: SandboxRequest, count: int, pause: float = 0.0
) -> dict[str, float]:
    """p50 and p95 of CreateSandbox; each sandbox is destroyed after its create is timed."""
    latencies = []
    for _ in range(count):
        time.sleep(pause)
        started = time.perf_counter()
        sandbox = client.create_sandbox(spec)
        latencies.append(time.perf_counter() - started)
        client.destroy_sandbox(sandbox.id)
    return {"p50": pct(latencies, 0.5), "p95": pct(latencies, 0.95)}


def docker_run_all(cmds: list[list[str]], parallel: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        codes = list(pool.map(lambda c: subprocess.run(c, capture_output=True).returncode, cmds))
    wall = time.perf_counter() - started
    if any(codes):
        raise SystemExit(f"docker run failed: exit codes {sorted(set(codes))}")
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-n", type=int, default=60, help="number of trivial tests (default 60)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench.json")
    parser.add_argument("--parallel", default="2,4,8", help="parallelism levels tried for (b)/(e)")
    args = parser.parse_args()
    n = args.n
    levels = [int(x) for x in args.parallel.split(",")]
    project = make_project(n)
    results: dict[str, object] = {"n": n, "cpus": os.cpu_count()}

    emb = start_embedded(ServerConfig())
    client = SandboxClient(emb.address)
    try:
        image, pythonpath = bench_image(client, project)

        # (g) BuildImage on a cache hit.
        snap = snapshot.take(project)
        hits = []
        for _ in range(20):
            t = time.perf_counter()
            r = client.build_image(snap.fragment(""), context_files=snap.context)
            hits.append(time.perf_counter() - t)
            assert r.cache_hit
        results["g_build_cache_hit"] = {"p50": pct(hits, 0.5), "p95": pct(hits, 0.95)}

        # (f) CreateSandbox, warm (pool) and cold (pool off, below).
        spec = SandboxRequest(
            image=image, preload_argv=("python3", "-c", "import sys; sys.stdin.read()")
        )
        client.destroy_sandbox(client.create_sandbox(spec).id)  # the miss that starts the pool
        # The pause lets the pool refill: we time a hand-out, not the engine.
        results["f_create_warm"] = time_creates(client, spec, 20, pause=0.6)
    finally:
        client.close()
        emb.stop()

    emb = start_embedded(ServerConfig(pool_max_per_key=0))
    client = SandboxClient(emb.address)
    try:
        results["f_create_cold"] = time_creates(client, spec, 10)
    finally:
        client.close()
        emb.stop()

    # (e) engine churn at the best parallelism.
    churn = {}
    for p in levels:
        cmd = [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "-e",
            f"PYTHONPATH={pythonpath}",
            image,
            "python3",
            "-c",
            "import pytest",
        ]
        churn[p] = docker_run_all([cmd] * n, p)
    best_p = min(churn, key=lambda p: churn[p])
    results["e_churn"] = {
        "by_parallelism": churn,
        "best_parallelism": best_p,
        "wall": churn[best_p],
    }

    # (b) naive per-test docker run, plugin autoload off, same parallelism as (e)'s best.
    nodeids = [f"{snapshot.PROJECT}/test_trivial.py::test_{i}" for i in range(n)]
    naive_cmds = [
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "-e",
            f"PYTHONPATH={pythonpath}",
            "-e",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1",
            "-w",
            snapshot.PROJECT,
            image,
            "python3",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            nodeid,
        ]
        for nodeid in nodeids
    ]
    # The naive way as a loop runs it (one container after the other), and at (e)'s best
    # parallelism, its fastest form.
    results["b_naive_serial"] = {"wall": docker_run_all(naive_cmds, 1), "parallelism": 1}
    results["b_naive"] = {"wall": docker_run_all(naive_cmds, best_p), "parallelism": best_p}

    # (a) local.
    local, _ = timed([*PYTEST, "test_trivial.py"], project)
    results["a_local"] = {"wall": local}
    results["a_local_2n"] = {"wall": timed([*PYTEST, "test_double.py"], project)[0]}

    # (c)/(d) through the plugin; one untimed run first so the image is a cache hit.
    jobs = str(best_p)
    timed([*PYTEST, "--sandbox=all", "--sandbox-scope=session", "test_first.py"], project)
    for scope in ("test", "module", "session"):
        wall, _ = timed(
            [
                *PYTEST,
                "--sandbox=all",
                f"--sandbox-scope={scope}",
                f"--sandbox-jobs={jobs}",
                "test_trivial.py",
            ],
            project,
        )
        results[f"sandbox_{scope}"] = {"wall": wall}
    # Twice the tests in one module: the difference is the marginal cost of a test.
    wall, _ = timed([*PYTEST, "--sandbox=all", "--sandbox-scope=module", "test_double.py"], project)
    results["sandbox_module_2n"] = {"wall": wall}

    # First routed test: launch to start, read back from the junit xml.
    xml = project.parent / f"{project.name}-first.xml"
    launched = time.time()
    timed([*PYTEST, "--sandbox=all", f"--junitxml={xml}", "test_first.py"], project)
    started_prop = next(
        p.get("value") for p in ET.parse(xml).iter("property") if p.get("name") == "started_unix"
    )
    results["first_test_start"] = {"seconds": float(started_prop or "nan") - launched}

    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return 0


def report(r: dict[str, object]) -> None:
    def wall(key: str) -> float:
        value = r[key]
        assert isinstance(value, dict)
        return float(value["wall"])

    n = int(r["n"])  # type: ignore[call-overload]
    a, b, e = wall("a_local"), wall("b_naive"), wall("e_churn")
    bs, a2, dm2 = wall("b_naive_serial"), wall("a_local_2n"), wall("sandbox_module_2n")
    c, dm, ds = wall("sandbox_test"), wall("sandbox_module"), wall("sandbox_session")
    g, fw, fc = r["g_build_cache_hit"], r["f_create_warm"], r["f_create_cold"]
    first = r["first_test_start"]
    assert isinstance(g, dict) and isinstance(fw, dict) and isinstance(fc, dict)
    assert isinstance(first, dict)
    bp = r["b_naive"]["parallelism"]  # type: ignore[index]
    marginal = ((dm2 - dm) - (a2 - a)) / n * 1e3
    rows = [
        ("(a) local pytest", a, n, ""),
        ("(a) local pytest, 2N tests", a2, 2 * n, ""),
        ("(b) naive docker run, one at a time", bs, n, f"(c) is {bs / c:.2f}x faster [>= 1.8x]"),
        (f"(b) naive docker run, {bp} at once", b, n, f"(c) is {b / c:.2f}x faster"),
        ("(c) --sandbox scope=test", c, n, f"{c / e:.2f}x of (e)  [<= 1.3x]"),
        ("(d) --sandbox scope=module", dm, n, f"{(dm - a) / n * 1e3:+.1f} ms/test over (a)"),
        ("(d) --sandbox scope=module, 2N tests", dm2, 2 * n, f"marginal {marginal:+.1f} ms/test"),
        ("(d) --sandbox scope=session", ds, n, f"{(ds - a) / n * 1e3:+.1f} ms/test over (a)"),
        ("(e) engine churn, best parallelism", e, n, ""),
    ]
    print(f"\nN = {n} trivial tests, {r['cpus']} CPUs\n")
    print(f"{'':40} {'wall s':>8}  {'per test ms':>11}  note")
    for name, value, count, note in rows:
        print(f"{name:40} {value:8.2f}  {value / count * 1e3:11.1f}  {note}")
    print("(d)'s marginal cost: ((d with 2N) - (d with N)) - ((a with 2N) - (a with N)), per test")
    print()
    for name, m, note in (
        ("(f) CreateSandbox warm  ", fw, "[target p50 < 20]"),
        ("(f) CreateSandbox cold  ", fc, ""),
        ("(g) BuildImage cache hit", g, "[target p50 < 20]"),
    ):
        print(f"{name} p50 {m['p50'] * 1e3:7.1f} ms  p95 {m['p95'] * 1e3:7.1f} ms  {note}")
    print(f"first routed test starts {first['seconds']:.2f} s after launch  [target <= 1.5]")


if __name__ == "__main__":
    raise SystemExit(main())
