"""Side-by-side timings, all measured in one run on this machine, printed with ratios.

    .venv/bin/python benchmarks/bench.py [-n 60] [--out benchmarks/results/bench.json]

(a) local pytest on N trivial tests
(b) naive: one `docker run --rm IMAGE python3 -m pytest NODEID` per test (autoload off)
(c) pytest --sandbox=all, scope test (a fresh container per test)
(d) pytest --sandbox=all, scope module and session
(e) the engine's churn: N x `docker run --rm IMAGE python3 -c "import pytest"`, best parallelism
(f) CreateSandbox latency, warm pool and cold
(g) BuildImage latency on a cache hit
(h) pytest --sandbox=all, scope test, isolation fork (a recycled container, reset
    between tests), and (c) again, each on N and 2N tests: the marginal cost per test
    over local, next to the engine's churn per container
(i) the local daemon: a one-test project under `pytest --sandbox` with the daemon warm,
    over local, and the time from launch to the first routed test starting, with the
    daemon warm and with none running (the session starts it; images already built)
plus the time from launching `pytest --sandbox` to the first routed test starting.

    .venv/bin/python benchmarks/bench.py --isolation-only [-n 60]

measures (a), (e) at one parallelism and (c)/(h) on N and 2N only, and

    .venv/bin/python benchmarks/bench.py --fork-only [-n 60] [--rounds 3]

(a) and (h) only, alternated over rounds (the machine is shared: one round is noise),

    .venv/bin/python benchmarks/bench.py --daemon-only [-n 60] [--rounds 5]

(i) and (d)'s module-scope marginal cost only. Plugin runs use a daemon on a socket of
the benchmark's own, stopped at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
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
from sandboxd import daemon  # noqa: E402
from sandboxd.api import SandboxRequest  # noqa: E402
from sandboxd.client import SandboxClient  # noqa: E402
from sandboxd.config import ServerConfig  # noqa: E402
from sandboxd.server import start_embedded  # noqa: E402

PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
#: Pause before each of (i)'s runs (see bench_daemon).
SETTLE_SECONDS = 1.5


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def make_project(n: int, parent: Path | None = None) -> Path:
    root = Path(tempfile.mkdtemp(prefix="sandbox-bench-", dir=parent))
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
    built = client.build_image(
        snap.fragment(), base=env_base(client, snap), context_files=snap.context
    )
    return built.image.tag, snap.pythonpath()


def env_base(client: SandboxClient, snap: snapshot.Snapshot) -> str:
    """The mirrored environment's images, built in order as the plugin does; the last tag."""
    base = ""
    for fragment, files in snap.environment(""):
        base = client.build_image(fragment, base=base, context_files=files).image.tag
    return base


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
    parser.add_argument(
        "--isolation-only", action="store_true", help="only (a), (e), (c) and (h) on N and 2N"
    )
    parser.add_argument(
        "--daemon-only", action="store_true", help="only (i) and the module-scope marginal cost"
    )
    parser.add_argument("--fork-only", action="store_true", help="only (a) and (h), in rounds")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of --fork-only; (i) runs at least 5"
    )
    args = parser.parse_args()
    # The daemon's socket, the project and its reports live here, removed at the end.
    work = Path(tempfile.mkdtemp(prefix="sbxb-", dir="/tmp"))
    paths = daemon.DaemonPaths(work / "d.sock")
    os.environ[daemon.SOCKET_ENV] = str(paths.socket)
    os.environ.pop(daemon.EMBEDDED_ENV, None)
    try:
        return run(args, paths)
    finally:
        daemon.stop(paths)
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, paths: daemon.DaemonPaths) -> int:
    n = args.n
    levels = [int(x) for x in args.parallel.split(",")]
    project = make_project(n, paths.socket.parent)
    results: dict[str, object] = {"n": n, "cpus": os.cpu_count()}
    if args.isolation_only:
        return isolation_only(project, n, levels[0], results)
    if args.fork_only:
        return fork_only(project, n, levels[0], args.rounds)
    if args.daemon_only:
        results.update(bench_daemon(project, paths, max(args.rounds, 5)))
        results.update(bench_module(project))
        report_daemon(results)
        return 0

    emb = start_embedded(ServerConfig())
    client = SandboxClient(emb.address)
    try:
        image, pythonpath = bench_image(client, project)

        # (g) BuildImage on a cache hit.
        snap = snapshot.take(project)
        base = env_base(client, snap)
        hits = []
        for _ in range(20):
            t = time.perf_counter()
            r = client.build_image(snap.fragment(), base=base, context_files=snap.context)
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

    results.update(bench_isolation(project, best_p))
    results.update(bench_daemon(project, paths, max(args.rounds, 5)))
    report(results)
    report_isolation(results)
    report_daemon(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return 0


def churn_wall(image: str, pythonpath: str, n: int, parallel: int) -> float:
    """(e): N x `docker run --rm IMAGE python3 -c "import pytest"` at `parallel` at once."""
    cmd = ["docker", "run", "--rm", "--network", "none", "-e", f"PYTHONPATH={pythonpath}"]
    return docker_run_all([[*cmd, image, "python3", "-c", "import pytest"]] * n, parallel)


def bench_isolation(project: Path, jobs: int) -> dict[str, object]:
    """(c) and (h) on N and 2N trivial tests, the image already built."""
    out: dict[str, object] = {}
    for isolation in ("container", "fork"):
        for name, file in (("", "test_trivial.py"), ("_2n", "test_double.py")):
            args = ["--sandbox=all", "--sandbox-scope=test", f"--sandbox-jobs={jobs}"]
            wall, _ = timed(
                [*PYTEST, *args, f"--sandbox-isolation={isolation}", file],
                project,
            )
            out[f"isolation_{isolation}{name}"] = {"wall": wall}
    return out


def isolation_only(project: Path, n: int, parallel: int, results: dict[str, object]) -> int:
    """The per-test isolation figures alone: (a), (e) at one parallelism, (c) and (h)."""
    emb = start_embedded(ServerConfig())
    client = SandboxClient(emb.address)
    try:
        image, pythonpath = bench_image(client, project)
    finally:
        client.close()
        emb.stop()
    results["e_churn"] = {"wall": churn_wall(image, pythonpath, n, parallel)}
    results["a_local"] = {"wall": timed([*PYTEST, "test_trivial.py"], project)[0]}
    results["a_local_2n"] = {"wall": timed([*PYTEST, "test_double.py"], project)[0]}
    timed([*PYTEST, "--sandbox=all", "--sandbox-scope=session", "test_first.py"], project)
    results.update(bench_isolation(project, parallel))
    report_isolation(results)
    return 0


def fork_only(project: Path, n: int, jobs: int, rounds: int) -> int:
    """(h)'s marginal cost per test over local, once per round, local and fork alternated."""
    timed([*PYTEST, "--sandbox=all", "--sandbox-scope=session", "test_first.py"], project)
    args = ["--sandbox=all", "--sandbox-scope=test", f"--sandbox-jobs={jobs}"]
    fork = [*PYTEST, *args, "--sandbox-isolation=fork"]
    marginals = []
    for _ in range(rounds):
        walls = {
            (name, size): timed([*cmd, file], project)[0]
            for size, file in ((1, "test_trivial.py"), (2, "test_double.py"))
            for name, cmd in (("local", PYTEST), ("fork", fork))
        }
        local = walls["local", 2] - walls["local", 1]
        marginals.append(((walls["fork", 2] - walls["fork", 1]) - local) / n * 1e3)
    shown = " ".join(f"{m:.1f}" for m in marginals)
    print(f"(h) isolation=fork marginal over local, N = {n} vs 2N, {jobs} jobs: {shown} ms/test")
    print(f"    median {pct(marginals, 0.5):.1f} ms/test  [target <= 25 ms]")
    return 0


def first_start(project: Path) -> float:
    """Seconds from launching `pytest --sandbox` to its one routed test starting."""
    xml = project.parent / f"{project.name}-first.xml"
    launched = time.time()
    timed([*PYTEST, "--sandbox=all", f"--junitxml={xml}", "test_first.py"], project)
    started = next(
        p.get("value") for p in ET.parse(xml).iter("property") if p.get("name") == "started_unix"
    )
    return float(started or "nan") - launched


def bench_daemon(project: Path, paths: daemon.DaemonPaths, rounds: int) -> dict[str, object]:
    """(i): a one-test project, local and with the daemon warm; first routed test, warm
    and with no daemon running (its images built: what a developer's next day looks like).

    Interleaved over `rounds` (local, warm, first warm, cold in each): a shared machine
    drifts by tenths of a second between minutes, so each round's warm run is compared
    with the local run next to it, and medians are reported next to the best round.
    """
    timed([*PYTEST, "--sandbox=all", "test_first.py"], project)  # builds, leaves it warm
    local, warm, first_warm, cold = [], [], [], []

    def settled() -> None:
        # A developer's next run is not 50 ms after the last: the daemon's replacement
        # for the sandbox the last run took (a create and a preload, ~0.5 s of CPU on
        # two cores) would otherwise still be under way and be counted in this one.
        time.sleep(SETTLE_SECONDS)

    for _ in range(rounds):
        settled()
        local.append(timed([*PYTEST, "test_first.py"], project)[0])
        settled()
        warm.append(timed([*PYTEST, "--sandbox=all", "test_first.py"], project)[0])
        settled()
        first_warm.append(first_start(project))
        daemon.stop(paths)
        cold.append(first_start(project))
    return {
        "i_local_one": {"wall": min(local), "all": local},
        "i_daemon_warm_one": {"wall": min(warm), "all": warm},
        "i_warm_over_local": {
            "median": statistics.median(w - loc for w, loc in zip(warm, local, strict=True)),
            "best": min(warm) - min(local),
        },
        "i_first_warm": {"seconds": statistics.median(first_warm), "best": min(first_warm)},
        "i_first_cold": {"seconds": statistics.median(cold), "best": min(cold)},
        "i_rounds": rounds,
    }


def bench_module(project: Path) -> dict[str, object]:
    """(d)'s module scope on N and 2N tests, and local on both."""
    out: dict[str, object] = {}
    for name, file in (("", "test_trivial.py"), ("_2n", "test_double.py")):
        out[f"a_local{name}"] = {"wall": timed([*PYTEST, file], project)[0]}
        args = ["--sandbox=all", "--sandbox-scope=module", file]
        out[f"sandbox_module{name}"] = {"wall": timed([*PYTEST, *args], project)[0]}
    return out


def report_daemon(r: dict[str, object]) -> None:
    wall = functools.partial(_wall, r)
    over = r["i_warm_over_local"]
    first_warm = r["i_first_warm"]
    first_cold = r["i_first_cold"]
    assert isinstance(over, dict) and isinstance(first_warm, dict) and isinstance(first_cold, dict)
    print(f"\nthe local daemon ({r['i_rounds']} interleaved rounds: median [best])")
    print(f"{'(i) one test, local':40} {wall('i_local_one'):8.2f} s (best)")
    print(
        f"{'(i) one test, --sandbox, daemon warm':40} {wall('i_daemon_warm_one'):8.2f} s (best)  "
        f"{over['median']:+.2f} s [{over['best']:+.2f}] over local  [target <= +0.6]"
    )
    for label, figures, target in (
        ("(i) first routed test, daemon warm", first_warm, "[target <= 1.0]"),
        ("(i) first routed test, no daemon", first_cold, "[target <= 1.5]"),
    ):
        print(
            f"{label:40} {figures['seconds']:8.2f} s [{figures['best']:.2f}] after launch  {target}"
        )
    if "sandbox_module_2n" in r:
        n = int(r["n"])  # type: ignore[call-overload]
        local = wall("a_local_2n") - wall("a_local")
        marginal = ((wall("sandbox_module_2n") - wall("sandbox_module")) - local) / n * 1e3
        print(f"{'(d) scope=module marginal':40} {marginal:8.1f} ms/test  [target <= 5]")


def _wall(r: dict[str, object], key: str) -> float:
    value = r[key]
    assert isinstance(value, dict)
    return float(value["wall"])


def report_isolation(r: dict[str, object]) -> None:
    """Marginal cost per test over local: (x with 2N - x with N) - (a with 2N - a with N)."""

    wall = functools.partial(_wall, r)
    n = int(r["n"])  # type: ignore[call-overload]
    local = wall("a_local_2n") - wall("a_local")
    churn = wall("e_churn") / n * 1e3
    print(f"\nper-test isolation, N = {n} vs 2N trivial tests, {r['cpus']} CPUs")
    for label, key, target in (
        ("(h) isolation=fork", "isolation_fork", "[target <= 25 ms]"),
        ("(c) isolation=container", "isolation_container", ""),
    ):
        marginal = ((wall(f"{key}_2n") - wall(key)) - local) / n * 1e3
        print(
            f"{label:26} marginal {marginal:7.1f} ms/test over local  "
            f"{marginal / churn:5.2f}x of (e)  {target}"
        )
    print(f"{'(e) engine churn':26} {churn:7.1f} ms/container (the fresh-container floor)")


def report(r: dict[str, object]) -> None:
    wall = functools.partial(_wall, r)
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
