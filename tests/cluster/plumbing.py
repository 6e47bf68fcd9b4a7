"""The host plumbing the lab stands on: network namespaces, cgroups, mounts, processes.

Everything here is named by the lab's id, so a teardown (also of a lab whose test process
died) finds exactly what that lab made and nothing of anyone else's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")


def run(argv: Sequence[str], *, timeout: float = 60.0, check: bool = True) -> str:
    """Run a command; its stdout. Raises RuntimeError with its stderr when it fails."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


# -- cgroups -----------------------------------------------------------------------------


def tracking_hierarchy() -> Path:
    """The hierarchy that lists every lab process: v1's pids controller, else v2's root."""
    if (CGROUP_ROOT / "pids" / "cgroup.procs").exists():
        return CGROUP_ROOT / "pids"
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return CGROUP_ROOT
    raise RuntimeError("no pids cgroup controller (v1) nor a cgroup v2 hierarchy is mounted")


def make_cgroup(relative: str) -> Path:
    """Create a cgroup in the tracking hierarchy; the path of its cgroup.procs."""
    path = tracking_hierarchy() / relative
    path.mkdir(parents=True, exist_ok=True)
    return path / "cgroup.procs"


def cgroup_pids(relative: str) -> set[int]:
    """Every process in the cgroup and its descendants."""
    top = tracking_hierarchy() / relative
    pids: set[int] = set()
    if not top.is_dir():
        return pids
    for procs in top.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(line) for line in procs.read_text().split())
    return pids


def cgroup_trees(lab_id: str) -> list[Path]:
    """The lab's cgroup directory in every hierarchy where one exists."""
    found = [d for d in CGROUP_ROOT.glob(f"*/{lab_id}") if d.is_dir()]
    if (CGROUP_ROOT / lab_id).is_dir():
        found.append(CGROUP_ROOT / lab_id)
    return found


def remove_cgroups(lab_id: str) -> None:
    """rmdir the lab's cgroups, deepest first (they must be empty of processes)."""
    for top in cgroup_trees(lab_id):
        dirs = sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts))
        for d in [*dirs, top]:
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()


# -- processes ---------------------------------------------------------------------------


def netns_pids(netns: str) -> set[int]:
    """Processes in a network namespace (empty when it does not exist)."""
    out = run(["ip", "netns", "pids", netns], check=False)
    return {int(p) for p in out.split() if p.isdigit()}


def kill_until_gone(
    find: Iterable[str], *, netns: Iterable[str] = (), timeout: float = 30.0
) -> None:
    """SIGKILL every process in the cgroups `find` and namespaces `netns`, until none is left.

    Repeats, since a process may fork between one listing and the kill.

    Raises:
        RuntimeError: processes survive `timeout` seconds (e.g. stuck in the kernel).
    """
    cgroups, namespaces = list(find), list(netns)
    deadline = time.monotonic() + timeout
    while True:
        pids: set[int] = set()
        for cg in cgroups:
            pids |= cgroup_pids(cg)
        for ns in namespaces:
            pids |= netns_pids(ns)
        pids = {p for p in pids if not _is_zombie(p)}
        if not pids:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes survive SIGKILL: {sorted(pids)}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line contains `text`, as 'PID CMDLINE'."""
    found: list[str] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and not _is_zombie(int(entry.name)):
            found.append(f"{entry.name} {cmdline.strip()[:160]}")
    return found


# -- namespaces and mounts ---------------------------------------------------------------


def lab_netns(lab_id: str) -> list[str]:
    """The lab's network namespaces that exist."""
    out = run(["ip", "netns", "list"], check=False)
    names = (line.split()[0] for line in out.splitlines() if line.strip())
    return sorted(n for n in names if n.startswith(f"{lab_id}-"))


def delete_netns(name: str) -> None:
    run(["ip", "netns", "delete", name], check=False)


def mounts_under(*prefixes: str) -> list[str]:
    """Mount points (this mount namespace) at or below any of `prefixes`, deepest first."""
    points: list[str] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
            points.append(point)
    return sorted(set(points), key=lambda p: -p.count("/"))


def unmount_under(*prefixes: str) -> None:
    """Detach every mount below `prefixes` (an engine killed mid-run leaves its overlays)."""
    for _ in range(3):  # a mount may be stacked on another at the same point
        points = mounts_under(*prefixes)
        if not points:
            return
        for point in points:
            run(["umount", "-l", point], check=False)
