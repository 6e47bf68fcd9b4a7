"""A 20-submission grading batch: the right verdict each, nothing left behind, same twice."""

from __future__ import annotations

import json
import subprocess
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
from abuse import SecureService

from sandboxd import cli, grading, submissions
from sandboxd.client import SandboxClient
from sandboxd.engine.base import LABEL_INSTANCE
from sandboxd.gradebook import load_course

TESTS = {
    "test_calc.py": """
from calc import add, fact

def test_add():
    assert add(2, 3) == 5

def test_add_negative():
    assert add(-2, -3) == -5

def test_fact():
    assert fact(5) == 120
""",
    "test_words.py": """
import pytest
from calc import shout

@pytest.mark.parametrize("word", ["a", "hi"])
def test_shout(word):
    assert shout(word) == word.upper() + "!"
""",
}
ALL = [
    "test_calc::test_add",
    "test_calc::test_add_negative",
    "test_calc::test_fact",
    "test_words::test_shout[a]",
    "test_words::test_shout[hi]",
]
CORRECT = """
def add(a, b):
    return a + b

def fact(n):
    return 1 if n <= 1 else n * fact(n - 1)

def shout(w):
    return w.upper() + "!"
"""
# (name, source, verdict, tests that pass)
CASES: list[tuple[str, str, str, list[str]]] = [
    *[(f"correct{i}", CORRECT, "passed", ALL) for i in range(5)],
    ("correct_zip", CORRECT, "passed", ALL),
    ("wrong_add", CORRECT.replace("a + b", "a - b"), "failed", ALL[2:]),
    ("wrong_fact", CORRECT.replace("n * fact", "n + fact"), "failed", [*ALL[:2], *ALL[3:]]),
    ("wrong_shout", CORRECT.replace(' + "!"', ""), "failed", ALL[:3]),
    ("wrong_all", "add = fact = shout = lambda *a: None\n", "failed", []),
    ("raises", CORRECT.replace("return a + b", "raise ValueError('no')"), "failed", ALL[2:]),
    ("segfault", CORRECT + "import ctypes\nctypes.string_at(0)\n", "crashed", []),
    ("aborts", CORRECT.replace("return a + b", "import os; os.abort()"), "crashed", []),
    ("import_error", "import no_such_module\n" + CORRECT, "error", []),
    ("loop_import", "while True:\n    pass\n", "timed_out", []),
    (
        "loop_fact",
        CORRECT.replace("return 1 if", "while True: pass\n    return 1 if"),
        "timed_out",
        [],
    ),
    (
        "loop_shout",
        CORRECT.replace('return w.upper() + "!"', "while True:\n        pass"),
        "timed_out",
        [],
    ),
    ("hog_import", "x = bytearray(1 << 30)\n" + CORRECT, "out_of_memory", []),
    (
        "hog_fact",
        CORRECT.replace(
            "return 1 if", "x = [bytearray(1 << 20) for _ in range(4096)]\n    return 1 if"
        ),
        "out_of_memory",
        [],
    ),
    # Prints a pass and quits before pytest can write anything: no results, no pass.
    (
        "forger",
        "import os, sys\nprint('5 passed in 0.01s')\nsys.stdout.flush()\nos._exit(0)\n",
        "error",
        [],
    ),
]


def _write_tests(root: Path) -> Path:
    tests = root / "tests"
    tests.mkdir()
    for name, text in TESTS.items():
        (tests / name).write_text(text)
    return tests


def _untrusted(runtime: str, *, cpu_seconds: float, memory_bytes: int) -> grading.GradeSettings:
    return grading.GradeSettings(
        profile="untrusted",
        runtime=runtime,
        cpu_seconds=cpu_seconds,
        timeout_seconds=60.0,
        memory_bytes=memory_bytes,
        jobs=2,
    )


def _write_submissions(root: Path) -> Path:
    subs = root / "submissions"
    subs.mkdir()
    for name, source, _, _ in CASES:
        if name.endswith("_zip"):
            with zipfile.ZipFile(subs / f"{name}.zip", "w") as zf:
                zf.writestr(f"{name}/calc.py", source)
            continue
        (subs / name).mkdir()
        (subs / name / "calc.py").write_text(source)
    return subs


def _instance_containers(instance: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={LABEL_INSTANCE}={instance}"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return out.stdout.split()


def test_a_batch_of_20_gets_the_right_verdicts_twice(
    operator: SandboxClient,
    secure: SecureService,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert len(CASES) == 20
    tests = _write_tests(tmp_path)
    subs = _write_submissions(tmp_path)
    settings = _untrusted("runc", cpu_seconds=3.0, memory_bytes=96 << 20)
    # The whole suite in one run per submission (per-test limits are tests/grading's).
    first = grading.grade_all(
        operator, tests, submissions.load_submissions(subs), settings, tmp_path / "junit1",
        course=load_course(tests, test_timeout=0),
    )  # fmt: skip
    by_name = {s["name"]: s for s in first["submissions"]}
    for name, _, expected, passing in CASES:
        got = by_name[name]
        assert got["verdict"] == expected, (name, got)
        assert got["image_digest"] == first["image"]["digest"]
        if expected in ("passed", "failed"):
            assert sorted(got["tests"]) == ALL, (name, got["tests"])
            assert [t for t, o in got["tests"].items() if o == "passed"] == passing, name
            assert got["score"] == round(len(passing) / len(ALL), 4)
        else:
            assert got["score"] == 0.0 and got["tests"] == {}, (name, got)
        cases = list(ET.parse(got["junit"]).getroot().iter("testcase"))
        assert cases, name
        if expected in ("passed", "failed"):
            # The file on disk says what the results say, test by test.
            assert grading.parse_junit(Path(got["junit"]).read_bytes()) == got["tests"], name
        else:
            assert any(c.find("error") is not None for c in cases), name
    # Measured, not zero: the hog reached its 96 MiB limit; the tests burned some CPU.
    assert 48 << 20 <= by_name["hog_import"]["peak_memory_bytes"] <= 100 << 20
    assert by_name["correct0"]["cpu_seconds"] > 0.05
    assert by_name["correct0"]["peak_memory_bytes"] >= 4 << 20

    # The same batch through the CLI: the same per-test results.
    out = tmp_path / "again" / "results.json"
    out.parent.mkdir()
    code = cli.main([
        "grade", "--tests", str(tests), "--submissions", str(subs), "--profile", "untrusted",
        "--runtime", "runc", "--test-timeout", "0", "--cpu-time", "3", "--timeout", "60",
        "--memory", "96m", "--jobs", "2",
        "--out", str(out), "--address", secure.unix,
    ])  # fmt: skip
    assert code == 0
    second = json.loads(out.read_text())
    assert list(grading.per_test_results(second)) == list(grading.per_test_results(first))
    assert second["image"] == first["image"]
    assert len(list((out.parent / "junit").glob("*.xml"))) == 20
    progress = capsys.readouterr().err
    assert "[20/20]" in progress and "grading 20 submissions" in progress

    # Nothing left: every sandbox of the batch is gone from the engine.
    instance = secure.service.config.instance_id
    deadline = time.monotonic() + 15
    while _instance_containers(instance) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert operator.list_sandboxes() == []
    assert _instance_containers(instance) == []


# One of each kind of outcome the batch above covers, small: runsc on ptrace is slow.
RUNSC_CASES = {"correct0", "wrong_add", "import_error", "loop_import", "hog_import"}


def test_a_small_batch_gets_the_same_verdicts_under_runsc(
    operator: SandboxClient, secure: SecureService, tmp_path: Path
) -> None:
    """`untrusted` means gVisor: grading must give the same verdicts there as on runc."""
    tests = _write_tests(tmp_path)
    everything = submissions.load_submissions(_write_submissions(tmp_path))
    subs = [s for s in everything if s.name in RUNSC_CASES]
    assert len(subs) == len(RUNSC_CASES)
    # gVisor's own kernel counts against the memory limit: a little more room than on runc.
    settings = _untrusted("runsc", cpu_seconds=5.0, memory_bytes=128 << 20)
    report = grading.grade_all(
        operator, tests, subs, settings, tmp_path / "junit",
        course=load_course(tests, test_timeout=0),
    )  # fmt: skip
    by_name = {s["name"]: s for s in report["submissions"]}
    for name, _, expected, passing in CASES:
        if name not in RUNSC_CASES:
            continue
        got = by_name[name]
        assert got["verdict"] == expected, (name, got)
        if expected in ("passed", "failed"):
            assert [t for t, o in got["tests"].items() if o == "passed"] == passing, name
    assert by_name["correct0"]["cpu_seconds"] > 0.05
    assert by_name["correct0"]["peak_memory_bytes"] >= 4 << 20
    assert operator.list_sandboxes() == []
    assert by_name["hog_import"]["peak_memory_bytes"] >= 48 << 20
