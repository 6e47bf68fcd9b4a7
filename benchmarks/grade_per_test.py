"""What per-test limits cost in `sandboxd grade`, measured in one run on this machine.

    .venv/bin/python benchmarks/grade_per_test.py [-n 20] [--submissions 4]

For a course of N trivial tests and S correct submissions, graded twice:
(a) the whole suite in one run per submission (no per-test limits),
(b) per-test limits (`--test-timeout`), no test killed,
(c) per-test limits where one test of each submission loops (one kill and a fresh
    sandbox per submission),
and local pytest of the same suite for scale (one submission, times S). Prints
seconds and the cost per test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandboxd import grading  # noqa: E402
from sandboxd.client import SandboxClient  # noqa: E402
from sandboxd.config import ServerConfig  # noqa: E402
from sandboxd.gradebook import load_course  # noqa: E402
from sandboxd.server import start_embedded  # noqa: E402
from sandboxd.submissions import load_submissions  # noqa: E402

GOOD = "def add(a, b):\n    return a + b\n"
LOOPS = "def add(a, b):\n    while a == 0:\n        pass\n    return a + b\n"


def make_course(root: Path, n: int, subs: int) -> tuple[Path, Path, Path]:
    tests = root / "tests"
    tests.mkdir()
    body = "".join(f"def test_{i}():\n    assert add({i + 1}, 1) == {i + 2}\n\n" for i in range(n))
    (tests / "test_add.py").write_text("from calc import add\n\n" + body)
    (tests / "test_zero.py").write_text("from calc import add\n\ndef test_zero():\n    add(0, 1)\n")
    good, loops = root / "good", root / "loops"
    for folder, source in ((good, GOOD), (loops, LOOPS)):
        for i in range(subs):
            (folder / f"s{i:03d}").mkdir(parents=True)
            (folder / f"s{i:03d}" / "calc.py").write_text(source)
    return tests, good, loops


def timed(client: SandboxClient, tests: Path, subs: Path, timeout: float, out: Path) -> float:
    course = load_course(tests, test_timeout=timeout)
    settings = grading.GradeSettings(jobs=2, runtime="runc")
    started = time.monotonic()
    grading.grade_all(client, tests, load_submissions(subs), settings, out, course=course)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20, help="tests in the course")
    parser.add_argument("--submissions", type=int, default=4)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="grade-bench-"))
    tests, good, loops = make_course(root, args.n, args.submissions)
    emb = start_embedded(ServerConfig(pool_max_per_key=0))
    client = SandboxClient(emb.address)
    try:
        timed(client, tests, good, 0.0, root / "warm")  # builds the image
        suite = timed(client, tests, good, 0.0, root / "a")
        per_test = timed(client, tests, good, 1.0, root / "b")
        killed = timed(client, tests, loops, 1.0, root / "c")
    finally:
        client.close()
        emb.stop()
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--deselect",
         "test_zero.py::test_zero", str(tests)],
        cwd=good / "s000", env={"PYTHONPATH": str(good / "s000")}, capture_output=True,
        check=False,
    )  # fmt: skip
    local = time.monotonic() - started
    s, n = args.submissions, args.n + 1
    rows = [
        ("(local) pytest, all S submissions in turn", local * s),
        ("(a) whole suite per submission", suite),
        ("(b) per-test limits, nothing killed", per_test),
        ("(c) per-test limits, one 1 s loop each", killed),
    ]
    print(f"{s} submissions x {n} tests, 2 at a time, runc")
    for label, seconds in rows:
        print(f"{label:42} {seconds:7.2f} s  {seconds / s:5.2f} s per submission")
    print(f"{'per-test limits, per test (b - a) / tests':42} {(per_test - suite) / (s * n):7.3f} s")
    print(f"{'a kill, per submission (c - b)':42} {(killed - per_test) / s:7.2f} s")
    print(f"{'ratio (b) / (a)':42} {per_test / suite:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
