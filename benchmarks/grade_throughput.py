"""Submissions per minute of `sandboxd grade` for a 100-submission batch, at the default
limits, against plain local pytest on the same submissions, measured in one run.

    .venv/bin/python benchmarks/grade_throughput.py [--submissions 100] [--jobs N]
        [--runtime runc|runsc] [--profile]

The course is a small pytest suite (8 tests, points on one); three of four submissions
are correct, one in four fails two tests. The grading image is built (or found) before
the clock starts, as a second batch of the same course would find it. Local: pytest run
on each submission in its own process, as many at once as the grader's jobs, with the
course's tests and the submission on the path. `--profile` adds where a submission's
time goes on the client's side (create, put files, the test run, destroy).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandboxd import grading  # noqa: E402
from sandboxd.client import SandboxClient, SandboxHandle  # noqa: E402
from sandboxd.config import ServerConfig  # noqa: E402
from sandboxd.gradebook import load_course  # noqa: E402
from sandboxd.server import start_embedded  # noqa: E402
from sandboxd.submissions import load_submissions  # noqa: E402

TESTS = """
import pytest
from stats import mean, median, mode

@pytest.mark.points(2)
def test_mean():
    assert mean([1, 2, 3, 4]) == 2.5

def test_mean_one():
    assert mean([7]) == 7

def test_median_odd():
    assert median([3, 1, 2]) == 2

def test_median_even():
    assert median([4, 1, 3, 2]) == 2.5

def test_mode():
    assert mode([1, 2, 2, 3]) == 2

@pytest.mark.parametrize("n", [1, 10, 100])
def test_mean_range(n):
    assert mean(list(range(n + 1))) == n / 2
"""
GOOD = """
def mean(xs):
    return sum(xs) / len(xs)

def median(xs):
    s, n = sorted(xs), len(xs)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2

def mode(xs):
    return max(sorted(set(xs)), key=xs.count)
"""
WRONG = GOOD.replace("if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2", "")


def make_batch(root: Path, count: int) -> tuple[Path, Path]:
    tests = root / "tests"
    tests.mkdir()
    (tests / "test_stats.py").write_text(TESTS)
    subs = root / "submissions"
    for i in range(count):
        (subs / f"s{i:03d}").mkdir(parents=True)
        (subs / f"s{i:03d}" / "stats.py").write_text(WRONG if i % 4 == 3 else GOOD)
    return tests, subs


class Phases:
    """Seconds spent per phase of a submission, summed over the batch (client's view)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.lock = threading.Lock()

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            with self.lock:
                self.seconds[phase] += time.monotonic() - started

    def wrap(self, cls: Any, name: str, phase: str) -> None:
        original: Callable[..., Any] = getattr(cls, name)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            with self.timed(phase):
                return original(*args, **kwargs)

        setattr(cls, name, timed_call)


def profile_phases() -> Phases:
    """Time the per-submission path's calls: create (+ put files), exec, fetch, destroy."""
    phases = Phases()
    phases.wrap(SandboxClient, "create_sandbox", "create")
    phases.wrap(SandboxHandle, "put_files", "put files")
    phases.wrap(SandboxHandle, "exec", "test run (exec)")
    phases.wrap(SandboxHandle, "destroy", "destroy")
    return phases


def grade(
    client: SandboxClient, tests: Path, subs: Path, out: Path, jobs: int, rt: str
) -> tuple[float, int, float]:
    """Seconds the batch took, how many submissions it graded at once, and the CPU seconds
    its test runs used (measured by the service, inside the sandboxes)."""
    course = load_course(tests)
    settings = grading.GradeSettings(jobs=jobs, runtime=rt)
    started = time.monotonic()
    batch = load_submissions(subs)
    document = grading.grade_all(client, tests, batch, settings, out, course=course)
    seconds = time.monotonic() - started
    verdicts = [s["verdict"] for s in document["submissions"]]
    expected = ["failed" if i % 4 == 3 else "passed" for i in range(len(verdicts))]
    assert verdicts == expected, [v for v in verdicts if v not in ("passed", "failed")]
    cpu = sum(s["cpu_seconds"] for s in document["submissions"])
    return seconds, int(document["settings"]["jobs"]), cpu


def local(tests: Path, subs: Path, jobs: int) -> tuple[float, float]:
    """Plain pytest on each submission, `jobs` at once: seconds, and CPU seconds used."""

    def one(sub: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(sub), "PYTHONDONTWRITEBYTECODE": "1"}
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # plain pytest, as in the sandbox
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
            cwd=sub, env=env, capture_output=True, check=False,
        )  # fmt: skip

    started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, sorted(subs.iterdir())))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return time.monotonic() - started, cpu


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--submissions", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=0, help="default: the grader's")
    parser.add_argument("--runtime", default="", help="default: the untrusted profile's")
    parser.add_argument("--profile", action="store_true", help="time each phase")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="grade-throughput-"))
    tests, subs = make_batch(root, args.submissions)
    emb = start_embedded(ServerConfig())
    client = SandboxClient(emb.address)
    try:
        one = root / "one"
        (one / "s000").mkdir(parents=True)
        (one / "s000" / "stats.py").write_text(GOOD)
        grade(client, tests, one, root / "warm", 1, args.runtime)  # the image, made once
        phases = profile_phases() if args.profile else None
        graded, jobs, graded_cpu = grade(
            client, tests, subs, root / "junit", args.jobs, args.runtime
        )
        profiles = {p.name: p.runtime for p in client.server_info().profiles}
        runtime = args.runtime or profiles.get("untrusted", "") or "the engine's default"
    finally:
        client.close()
        emb.stop()
    plain, plain_cpu = local(tests, subs, jobs)
    n = args.submissions
    print(f"{n} submissions x 8 tests, {jobs} at a time, default limits, {runtime}")
    print(f"{'sandboxd grade':24} {graded:7.1f} s  {60 * n / graded:6.1f} submissions/min")
    print(f"{'local pytest':24} {plain:7.1f} s  {60 * n / plain:6.1f} submissions/min")
    overhead = (graded - plain) / n
    print(f"{'overhead per submission':24} {overhead:7.2f} s  (wall, at {jobs} at a time)")
    print(f"{'ratio grade / local':24} {graded / plain:7.2f}")
    print(
        f"{'CPU s per submission':24} {graded_cpu / n:7.2f} in the sandbox, "
        f"{plain_cpu / n:.2f} local (ratio {graded_cpu / plain_cpu:.2f}; the test "
        "processes only, not the engine's)"
    )
    if phases is not None:
        print("client-side seconds per submission, by phase (summed over jobs):")
        for phase, seconds in sorted(phases.seconds.items(), key=lambda kv: -kv[1]):
            print(f"  {phase:22} {seconds / n:6.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
