"""The in-sandbox plugin, run by a local pytest: per-test timer and the framed results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sandboxd

PLUGIN_DIR = Path(sandboxd.__file__).parent


def test_each_test_is_logged_and_a_sleeper_ends_the_process(tmp_path: Path) -> None:
    (tmp_path / "sandboxd_grading_plugin.py").write_bytes(
        (PLUGIN_DIR / "grading_plugin.py").read_bytes()
    )
    (tmp_path / "test_x.py").write_text(
        "import time\n\ndef test_big():\n    assert len(bytearray(64 << 20)) > 0\n\n"
        "def test_ok():\n    print('noise')\n\n"
        "def test_bad():\n    assert 1 == 2\n\n"
        "def test_sleeps():\n    time.sleep(30)\n\ndef test_after():\n    pass\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "GRADER_NONCE": "n1",
           "GRADER_TEST_SECONDS": "1"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "sandboxd_grading_plugin",
         "-p", "no:cacheprovider", str(tmp_path / "test_x.py")],
        capture_output=True, env=env, timeout=60, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == -14  # SIGALRM, the default action: no Python code ran
    records = [json.loads(line[3:]) for line in proc.stderr.splitlines() if line.startswith(b"n1 ")]
    (collected,) = [r["collected"] for r in records if "collected" in r]
    assert [n.split("::")[1] for n in collected] == [
        "test_big",
        "test_ok",
        "test_bad",
        "test_sleeps",
        "test_after",
    ]
    started = [r["start"].split("::")[1] for r in records if "start" in r]
    ended = [r["end"].split("::")[1] for r in records if "end" in r]
    assert started == ["test_big", "test_ok", "test_bad", "test_sleeps"]
    assert ended == ["test_big", "test_ok", "test_bad"]
    outcomes = {r["result"].split("::")[1]: r for r in records if "result" in r}
    assert outcomes["test_ok"]["outcome"] == "passed"
    assert outcomes["test_bad"]["outcome"] == "failed"
    assert "assert 1 == 2" in outcomes["test_bad"]["message"]
    # Each end record says what the test cost; the peak is the test's own where the
    # kernel lets the mark be reset (here: not the 64 MiB of test_big before it).
    costs = {r["end"].split("::")[1]: (r["cpu"], r["peak"]) for r in records if "end" in r}
    assert costs["test_big"][1] >= 64 << 20
    assert 0 < costs["test_ok"][1] < 64 << 20
    assert all(cpu >= 0 for cpu, _ in costs.values())
