"""This host's view of a container: its cgroup counters and its process tree.

Read from /sys/fs/cgroup and /proc, so it works only when the engine runs on this
host; engines fall back to their own stats API otherwise. Both cgroup versions are
read: v1 (one directory per controller) and v2 (one unified directory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

from sandboxd.engine.base import CgroupSample

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")

#: Controller name -> the cgroup directory; "" names the v2 unified hierarchy.
CgroupDirs = Mapping[str, Path]


def cgroup_dirs(pid: int, *, root: Path = CGROUP_ROOT, proc: Path = PROC) -> dict[str, Path]:
    """The cgroup directories of process `pid` on this host; empty when unknown."""
    dirs: dict[str, Path] = {}
    if pid <= 0:
        return dirs
    with contextlib.suppress(OSError, ValueError):
        for line in (proc / str(pid) / "cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if not path.strip("/"):
                # A hierarchy's root is no container's cgroup: an exited process (a removed
                # container's init, not yet reaped) shows "/", and the root's counters are
                # the whole host's.
                continue
            for name in controllers.split(",") if controllers else [""]:
                candidate = (root / name if name else root) / path.lstrip("/")
                if candidate.is_dir():
                    dirs[name] = candidate
    return dirs


def sample(dirs: CgroupDirs) -> CgroupSample | None:
    """The counters in `dirs`, or None when they name no memory cgroup to read."""
    # v1 first: on a v1 host gVisor's sandbox process also lists an empty v2 hierarchy
    # ("0::/"), which would point the v2 reader at the root and measure nothing.
    if "memory" in dirs:
        return _sample_v1(dirs)
    if "" in dirs:
        return _sample_v2(dirs[""])
    return None


def reset_peak(dirs: CgroupDirs) -> None:
    """Start the peak-memory count afresh (v1 only: v2's memory.peak cannot be reset)."""
    if "memory" in dirs:
        with contextlib.suppress(OSError):
            (dirs["memory"] / "memory.max_usage_in_bytes").write_text("0")


def process_exists(pid: int, *, proc: Path = PROC) -> bool:
    """Whether `pid` is a process this host can see (False for another host's)."""
    return pid > 0 and (proc / str(pid)).exists()


def descendants(root: int, *, proc: Path = PROC) -> list[int]:
    """`root` and every live process below it, from this host's /proc."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry / "stat")
        if len(fields) > 1 and fields[0] != "Z":  # a zombie is already dead
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    alive = {pid for kids in children.values() for pid in kids}
    stack = [root] if root in alive else []
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _stat_fields(path: Path) -> list[str]:
    """The fields of a /proc/PID/stat after the command name: state, ppid, ..."""
    try:
        stat = path.read_text()
    except OSError:
        return []
    # The command name may hold spaces and parentheses: parse after the last ")".
    return stat[stat.rfind(")") + 2 :].split()


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def _sample_v1(dirs: CgroupDirs) -> CgroupSample:
    memory = dirs["memory"]
    cpu = dirs.get("cpuacct") or dirs.get("cpu")
    pids = dirs.get("pids")
    return CgroupSample(
        cpu_ns=_read_int(cpu / "cpuacct.usage") if cpu else None,
        memory_peak_bytes=_read_int(memory / "memory.max_usage_in_bytes"),
        oom_kills=_read_keyed(memory / "memory.oom_control", "oom_kill"),
        pids_max_events=_read_keyed(pids / "pids.events", "max") if pids else None,
    )


def _sample_v2(path: Path) -> CgroupSample:
    usec = _read_keyed(path / "cpu.stat", "usage_usec")
    return CgroupSample(
        cpu_ns=usec * 1000 if usec is not None else None,
        memory_peak_bytes=_read_int(path / "memory.peak"),
        oom_kills=_read_keyed(path / "memory.events", "oom_kill"),
        pids_max_events=_read_keyed(path / "pids.events", "max"),
    )
