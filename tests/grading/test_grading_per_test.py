"""Partial credit under limits: one test loops, one eats memory, the others keep their
results and their points, under runc and under gVisor, at the default settings (no
per-test flag: staff need not know one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from courses import GOOD, PARTIAL, TESTS, write_tree

from sandboxd import cli

ALL = [
    "test_calc::test_add",
    "test_calc::test_fib_big",
    "test_calc::test_fib_small",
    "test_calc::test_grow",
    "test_calc::test_secret[1]",
    "test_calc::test_secret[2]",
]


def _grade(tmp_path: Path, address: str, runtime: str) -> dict[str, object]:
    tests = write_tree(tmp_path / "tests", TESTS)
    subs = write_tree(
        tmp_path / "subs",
        {"good/calc.py": GOOD, "partial/calc.py": PARTIAL, "broken/calc.py": "import nope\n"},
    )
    results = tmp_path / "grades" / "results.json"
    code = cli.main([
        "grade", "--tests", str(tests), "--submissions", str(subs), "--runtime", runtime,
        "--out", str(results), "--reports", str(results.parent), "--address", address,
    ])  # fmt: skip
    assert code == 0
    return json.loads(results.read_text())  # type: ignore[no-any-return]


@pytest.mark.docker
@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_a_looping_and_a_hungry_test_fail_alone(tmp_path: Path, address: str, runtime: str) -> None:
    document = _grade(tmp_path, address, runtime)
    subs = {s["name"]: s for s in document["submissions"]}  # type: ignore[attr-defined]

    good = subs["good"]
    assert good["verdict"] == "passed", good
    assert sorted(good["tests"]) == ALL
    assert (good["points"], good["max_points"], good["score"]) == (9.0, 9.0, 1.0)

    partial = subs["partial"]
    assert partial["verdict"] == "failed", partial
    results = {r["test_id"]: r for r in partial["results"]}
    assert sorted(results) == ALL
    # The defaults: 5 s per test (half of the 10 CPU seconds at most), 256 MiB.
    assert results["test_calc::test_fib_big"]["outcome"] == "failed"
    assert results["test_calc::test_fib_big"]["message"] == "timed out after 5.0s"
    assert results["test_calc::test_grow"]["outcome"] == "failed"
    assert results["test_calc::test_grow"]["message"] == "out of memory (limit 256 MiB)"
    # What each test cost is in its result; the hungry one's peak is the limit's.
    assert results["test_calc::test_fib_big"]["cpu_seconds"] > 0
    assert results["test_calc::test_grow"]["peak_memory_bytes"] >= 250 << 20
    assert all(r["peak_memory_bytes"] > 0 for r in results.values())
    passing = [t for t, r in results.items() if r["outcome"] == "passed"]
    assert passing == [ALL[0], ALL[2], ALL[4], ALL[5]]
    # 2 + 1 + 1 + 1 of 2 + 3 + 1 + 1 + 1 + 1 points.
    assert (partial["points"], partial["max_points"]) == (5.0, 9.0)
    assert results["test_calc::test_secret[1]"]["hidden"] is True
    assert partial["runtime"] == runtime
    assert partial["image_digest"] == document["image"]["digest"]  # type: ignore[index]
    assert partial["limits"]["memory_bytes"] == 256 << 20
    assert (partial["limits"]["test_seconds"], partial["limits"]["cpu_seconds"]) == (5.0, 10.0)
    # The memory kill is in the peak, also when it took the container's cgroup with it.
    assert partial["peak_memory_bytes"] >= 250 << 20, partial["peak_memory_bytes"]

    broken = subs["broken"]
    assert broken["verdict"] == "error"
    assert "No module named 'nope'" in broken["message"], broken["message"]

    # Students see the looping test's message, and nothing of the hidden ones.
    gradescope = json.loads(
        (tmp_path / "grades" / "gradescope" / "partial" / "results.json").read_text()
    )
    by_name = {t["name"]: t for t in gradescope["tests"]}
    assert by_name["test_calc::test_fib_big"]["output"].startswith("timed out after 5.0s")
    assert by_name["test_calc::test_secret[1]"]["visibility"] == "hidden"
    assert by_name["test_calc::test_secret[1]"]["output"] == ""
    assert gradescope["score"] == 5.0
