"""The in-sandbox worker's own logic, run here against fake cgroup files."""

from __future__ import annotations

from pathlib import Path

from pytest_sandbox.worker import Cgroup, read_capture


def test_cgroup_v1_names_the_limit_that_was_hit(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    (tmp_path / "pids").mkdir()
    (tmp_path / "memory/memory.oom_control").write_text("oom_kill_disable 0\noom_kill 1\n")
    (tmp_path / "memory/memory.limit_in_bytes").write_text(str(64 << 20))
    (tmp_path / "pids/pids.events").write_text("max 0\n")
    (tmp_path / "pids/pids.max").write_text("32\n")
    cg = Cgroup(str(tmp_path))
    assert cg.counters() == (1, 0)
    assert cg.explain((0, 0), cg.counters()) == "out of memory (limit 64 MiB)"
    assert cg.explain((0, 0), (0, 3)) == "process limit (32) reached"
    assert cg.explain((1, 0), (1, 0)) is None


def test_cgroup_v2_reads_the_unified_files(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 2\n")
    (tmp_path / "pids.events").write_text("max 5\n")
    (tmp_path / "memory.max").write_text(str(96 << 20))
    cg = Cgroup(str(tmp_path))
    assert cg.counters() == (2, 5)
    assert cg.explain((1, 5), (2, 5)) == "out of memory (limit 96 MiB)"


def test_read_capture_tolerates_missing_files(tmp_path: Path) -> None:
    (tmp_path / "stdout").write_bytes(b"printed\n")
    assert read_capture(str(tmp_path)) == {"stdout": "printed\n", "stderr": ""}
