"""Reading a container's cgroup counters and process tree, from made-up /proc and /sys trees."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sandboxd import cgroups
from sandboxd.engine.base import CgroupSample


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v1_dirs_and_counters(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    box = "docker/abc"
    _write(proc / "42" / "cgroup", f"4:memory:/{box}\n3:cpu,cpuacct:/{box}\n2:pids:/{box}\n0::/\n")
    _write(root / "memory" / box / "memory.max_usage_in_bytes", "1048576\n")
    _write(root / "memory" / box / "memory.oom_control", "oom_kill_disable 0\noom_kill 2\n")
    _write(root / "cpu" / box / "cpuacct.usage", "5000\n")
    (root / "cpuacct" / box).mkdir(parents=True)
    _write(root / "cpuacct" / box / "cpuacct.usage", "7000\n")
    _write(root / "pids" / box / "pids.events", "max 3\n")
    dirs = cgroups.cgroup_dirs(42, root=root, proc=proc)
    assert dirs["memory"] == root / "memory" / box
    assert "" not in dirs  # gVisor-style empty v2 line "0::/": the root, no container's cgroup
    assert cgroups.sample(dirs) == CgroupSample(
        cpu_ns=7000, memory_peak_bytes=1 << 20, oom_kills=2, pids_max_events=3
    )
    cgroups.reset_peak(dirs)
    assert (root / "memory" / box / "memory.max_usage_in_bytes").read_text() == "0"


def test_v2_counters(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    box = "system.slice/docker-abc.scope"
    _write(proc / "7" / "cgroup", f"0::/{box}\n")
    _write(root / box / "cpu.stat", "usage_usec 12\nuser_usec 10\n")
    _write(root / box / "memory.peak", "4096\n")
    _write(root / box / "memory.events", "low 0\noom 1\noom_kill 1\n")
    _write(root / box / "pids.events", "max 0\n")
    dirs = cgroups.cgroup_dirs(7, root=root, proc=proc)
    assert dirs == {"": root / box}
    assert cgroups.sample(dirs) == CgroupSample(
        cpu_ns=12_000, memory_peak_bytes=4096, oom_kills=1, pids_max_events=0
    )
    cgroups.reset_peak(dirs)  # v2 has nothing to reset; it must not fail
    assert (root / box / "memory.peak").read_text() == "4096\n"


def test_unknown_processes_have_no_dirs_and_no_sample(tmp_path: Path) -> None:
    assert cgroups.cgroup_dirs(0, proc=tmp_path) == {}
    assert cgroups.cgroup_dirs(99, proc=tmp_path) == {}
    assert cgroups.sample({}) is None
    assert not cgroups.process_exists(0, proc=tmp_path)
    assert not cgroups.process_exists(99, proc=tmp_path)


def test_descendants_follow_parents_and_skip_zombies(tmp_path: Path) -> None:
    def proc(pid: int, ppid: int, state: str = "S", comm: str = "sh") -> None:
        _write(tmp_path / str(pid) / "stat", f"{pid} ({comm}) {state} {ppid} 0 0\n")

    proc(10, 1)
    proc(11, 10, comm="a) S 1 (b")  # a name with spaces and parentheses
    proc(12, 11)
    proc(13, 10, state="Z")
    proc(20, 1)
    (tmp_path / "self").mkdir()
    assert sorted(cgroups.descendants(10, proc=tmp_path)) == [10, 11, 12]
    assert cgroups.descendants(13, proc=tmp_path) == []
    assert cgroups.process_exists(20, proc=tmp_path)


def test_a_child_is_found_below_this_process_on_the_real_host() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in cgroups.descendants(os.getpid())
        assert cgroups.process_exists(child.pid)
    finally:
        child.kill()
        child.wait()
