"""Re-grading the same batch gives the same results, everything but what was measured,
also when the second run is `sandboxd grade --address` against a separate `sandboxd
serve` on a unix socket (as against a remote server: the CLI does not change)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from courses import GOOD, PARTIAL, TESTS, write_tree

from sandboxd import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "load"))

from sandboxd_process import SandboxdProcess

SUBMISSIONS = {
    "good/calc.py": GOOD,
    # add is wrong too: every kind of per-test result.
    "partial/calc.py": PARTIAL.replace("return a + b", "return a + b + (a == 2)"),
    "broken/calc.py": "import nope\n",
}
#: What a run measured, and where it wrote: the only fields allowed to differ.
MEASURED = {"cpu_seconds", "peak_memory_bytes", "wall_seconds", "junit", "execution_time"}
FLAGS = ("--runtime", "runc", "--test-timeout", "1", "--memory", "96m")


def _without(value: Any, keys: set[str]) -> Any:
    """`value` with `keys` dropped from every mapping in it."""
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def _outputs(root: Path) -> dict[str, Any]:
    """Everything one grading wrote under `root`, measurements left out."""
    found: dict[str, Any] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        if path.suffix == ".json":
            found[rel] = _without(json.loads(text), MEASURED)
        elif path.suffix == ".csv":
            found[rel] = _without(list(csv.DictReader(io.StringIO(text))), MEASURED)
        elif path.suffix == ".xml":
            found[rel] = text  # the per-submission JUnit records no timings
    return found


@pytest.mark.docker
def test_regrading_gives_identical_results_also_through_a_separate_serve(
    tmp_path: Path, address: str, instance_id_factory: Callable[[], str], short_tmp: Path
) -> None:
    tests = write_tree(tmp_path / "tests", TESTS)
    subs = write_tree(tmp_path / "subs", SUBMISSIONS)
    first, second = tmp_path / "first", tmp_path / "second"
    code = cli.main([
        "grade", "--tests", str(tests), "--submissions", str(subs), *FLAGS,
        "--out", str(first / "results.json"), "--reports", str(first), "--address", address,
    ])  # fmt: skip
    assert code == 0

    server = SandboxdProcess(short_tmp, {"instance_id": instance_id_factory()}, name="grade")
    try:
        server.start()
        proc = subprocess.run(
            [sys.executable, "-m", "sandboxd.cli", "grade", "--tests", str(tests),
             "--submissions", str(subs), *FLAGS, "--out", str(second / "results.json"),
             "--reports", str(second), "--address", server.address],
            capture_output=True, text=True, timeout=600, check=False, env=dict(os.environ),
        )  # fmt: skip
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert "[3/3]" in proc.stderr and "Traceback" not in proc.stderr

    document = json.loads((first / "results.json").read_text())
    subs_by_name = {s["name"]: s for s in document["submissions"]}
    partial = {r["test_id"]: r for r in subs_by_name["partial"]["results"]}
    assert partial["test_calc::test_add"]["message"].startswith("assert 6 == 5")
    assert partial["test_calc::test_fib_big"]["message"] == "timed out after 1.0s"
    assert partial["test_calc::test_grow"]["message"] == "out of memory (limit 96 MiB)"
    assert subs_by_name["partial"]["points"] == 2.0  # test_fib_small, test_secret[1]
    # Every result says what made it: the image, the limits, the runtime.
    for sub in document["submissions"]:
        assert sub["image_digest"] == document["image"]["digest"] != ""
        assert sub["runtime"] == "runc"
        assert sub["limits"]["memory_bytes"] == 96 << 20 and sub["limits"]["test_seconds"] == 1.0

    before, after = _outputs(first), _outputs(second)
    names = ("broken", "good", "partial")
    assert sorted(before) == sorted(after) == sorted([
        "gradebook.csv", "results.json", "tests.csv",
        *(f"gradescope/{n}/results.json" for n in names), *(f"junit/{n}.xml" for n in names),
    ])  # fmt: skip
    for name in before:
        assert after[name] == before[name], name
