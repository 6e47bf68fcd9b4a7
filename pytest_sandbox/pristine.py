"""Runs INSIDE the sandbox: the sandbox's pristine state, put back and verified between tests.

Stand-alone like the worker (shipped next to it as `pytest_sandbox_pristine.py`):
it imports nothing from the controller side. With isolation="fork" the worker
records the state once, before the first test, and after every test kills what
the test left running, empties every place the sandbox's user can write and
removes IPC objects; then it checks the result against the record. What it
cannot put back (a changed file it has no copy of, a process that will not die)
is reported, and the worker hands the container back for a fresh one.

Size: one stand-alone file on purpose, like the worker (shipped alone, imports nothing of
ours): finding the writable places, recording them, putting them back and the fork per
test that needs it are one mechanism, and a second shipped module would have to be found
by name on both sides of the wire.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import shutil
import signal
import stat
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from _pytest import runner as pytest_runner
from _pytest.warnings import catch_warnings_for_item

# The worker's clock, out of reach of a test that moves time.monotonic (see worker.py).
_clock_gettime = time.clock_gettime


def _monotonic() -> float:
    return _clock_gettime(time.CLOCK_MONOTONIC)


# Kernel views, not storage; under /dev only these two hold what a test can create.
SKIP_TREES = ("/proc", "/sys")
DEV_KEEP = ("/dev/shm", "/dev/mqueue")
SYSV = {"shm": "shmctl", "sem": "semctl", "msg": "msgctl"}
IPC_RMID = 0
KILL_ROUNDS = 200

#: (mode, size, mtime_ns, inode) of a file; directories keep only mode and inode,
#: since adding and removing an entry changes their size and mtime.
Entry = tuple[int, int, int, int]
ProcessKey = tuple[int, str]  # pid and start time: a reused pid is another process


def _entry(st: os.stat_result) -> Entry:
    if stat.S_ISDIR(st.st_mode):
        return (st.st_mode, 0, 0, st.st_ino)
    return (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)


def _listing(directory: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError:
        return []


def _walk(root: str, skip: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every path under root (not root itself), parents first, never following links."""
    stack = [root]
    while stack:
        for e in _listing(stack.pop()):
            if e.path == skip or e.path.startswith(skip + "/"):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            yield e.path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(e.path)


def trees(roots: tuple[str, ...] | list[str], keep: str) -> dict[str, Entry]:
    """Every path under the roots, and the roots themselves, except `keep`'s tree."""
    found: dict[str, Entry] = {}
    for root in roots:
        with contextlib.suppress(OSError):
            found[root] = _entry(os.lstat(root))
        found.update((p, _entry(st)) for p, st in _walk(root, keep))
    return found


def restore(roots: tuple[str, ...], base: dict[str, Entry], keep: str) -> list[str]:
    """Remove what was not there at the record and check the rest against it, in one walk.

    Returns how the roots still differ from the record: changed, gone or unremovable
    paths (empty when they are as recorded).
    """
    problems = []
    seen = set()
    stack = []
    for root in roots:
        try:
            now: Entry | None = _entry(os.lstat(root))
        except OSError:
            now = None
        if root in base:
            seen.add(root)
            if now != base[root]:
                problems.append(f"{root} {'changed' if now else 'is gone'}")
        if now is not None and stat.S_ISDIR(now[0]):
            stack.append(root)
    while stack:
        for e in _listing(stack.pop()):
            path = e.path
            if path == keep or path.startswith(keep + "/"):
                continue
            if path not in base:
                _remove(path)  # a new tree goes whole: nothing under it is walked
                if os.path.lexists(path):
                    problems.append(f"{path} could not be removed")
                continue
            try:
                entry = _entry(e.stat(follow_symlinks=False))
            except OSError:
                continue  # gone: said below
            seen.add(path)
            if entry != base[path]:
                problems.append(f"{path} changed")
            if stat.S_ISDIR(entry[0]):
                stack.append(path)
    return problems + [f"{path} is gone" for path in base if path not in seen]


def writable_places(top: str = "/") -> tuple[list[str], list[str]]:
    """(directories the sandbox's user can write, writable files in directories it cannot).

    One walk at the first test; read-only mounts and root-owned directories are not
    writable, so on a hardened sandbox this finds only the scratch. Under a read-only
    root only what is mounted writable can be written, so only those mounts are walked,
    not the whole image.
    """
    roots: list[str] = []
    files: list[str] = []
    starts = _writable_mounts() if top == "/" else None
    stack = [top] if starts is None else starts
    while stack:
        current = stack.pop()
        if os.access(current, os.W_OK):
            if os.path.isdir(current) and not os.path.islink(current):
                roots.append(current)
            elif os.path.isfile(current):  # a file mounted on its own (/etc/hosts)
                files.append(current)
            continue
        for e in _listing(current):
            if e.path in SKIP_TREES or (current == "/dev" and e.path not in DEV_KEEP):
                continue
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif e.is_file(follow_symlinks=False) and os.access(e.path, os.W_OK):
                files.append(e.path)
    return sorted(roots), sorted(files)


def _writable_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str] | None:
    """Where a walk for writable places starts under a read-only root: the mounts that
    are writable (outermost only); None when the root is writable or the table unread."""
    try:
        with open(mountinfo) as f:
            rows = [line.split() for line in f]
    except OSError:
        return None
    mounts: dict[str, bool] = {}
    for row in rows:
        if len(row) < 6:
            return None
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), row[4])  # \040 is " "
        mounts[point] = row[5].split(",")[0] == "rw"  # the last mount on a point wins
    if mounts.get("/", True):
        return None
    kept = sorted(
        point
        for point, writable in mounts.items()
        if writable
        and not any(point == t or point.startswith(t + "/") for t in SKIP_TREES)
        and not (point.startswith("/dev/") and point not in DEV_KEEP)
    )
    outermost = [
        p for p in kept if not any(p.startswith(o.rstrip("/") + "/") for o in kept if o != p)
    ]
    return outermost


class _Prefetch(threading.Thread):
    """writable_places() on a thread, while the preloaded worker waits for its request."""

    def __init__(self) -> None:
        super().__init__(name="writable-places", daemon=True)
        self.places: tuple[list[str], list[str]] | None = None

    def run(self) -> None:
        with contextlib.suppress(Exception):  # None: the record walks again itself
            self.places = writable_places()


_prefetch: list[_Prefetch] = []


def prefetch_places() -> None:
    """Start the walk for writable places before the worker's request arrives (with
    isolation="fork"): it depends only on the image and, at 0.4-0.8 s on two busy cores,
    is the longest step between the request and the first test."""
    started = _Prefetch()
    _prefetch.append(started)
    started.start()


def _prefetched() -> tuple[list[str], list[str]] | None:
    if not _prefetch:
        return None
    started = _prefetch.pop()
    started.join()
    return started.places


def processes() -> dict[int, ProcessKey]:
    """Live (non-zombie) processes of the sandbox's pid namespace, by pid."""
    found: dict[int, ProcessKey] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X"):
            found[int(name)] = (int(name), fields[19])
    return found


def _sysv_ids() -> dict[str, list[int]]:
    return {kind: [int(r[1]) for r in _rows(f"/proc/sysvipc/{kind}") if r] for kind in SYSV}


def _rows(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [line.split() for line in f.read().splitlines()[1:]]
    except OSError:
        return []


def _remove(path: str) -> None:
    """Remove a file or a tree the test made, even one it made unreadable to its owner."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    for dirpath, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o700)
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Baseline:
    """The sandbox as it was before the first test."""

    me: int
    processes: frozenset[ProcessKey]
    roots: tuple[str, ...]
    trees: dict[str, Entry]  # everything under the writable roots, and the roots
    files: dict[str, Entry]  # writable files outside them
    sysv: dict[str, list[int]]


class Pristine:
    """Records the sandbox once; puts it back and checks it after every test."""

    def __init__(self, keep: str) -> None:
        self.keep = keep  # the worker's own capture files: written by every test
        self.base = self._record()

    def _record(self) -> Baseline:
        roots, files = _prefetched() or writable_places()
        me = os.getpid()
        return Baseline(
            me=me,
            processes=frozenset(k for pid, k in processes().items() if pid != me),
            roots=tuple(roots),
            trees=trees(roots, self.keep),
            files={p: _entry(os.lstat(p)) for p in files},
            sysv=_sysv_ids(),
        )

    def strangers(self) -> list[int]:
        """Processes that are neither the worker nor there before the first test."""
        return [
            pid
            for pid, key in processes().items()
            if pid != self.base.me and key not in self.base.processes
        ]

    def kill_strangers(self) -> list[int]:
        """SIGKILL until none is left: setsid'd, double-forked and forking ones too.
        Returns the strangers still alive after every round (none, normally)."""
        for _ in range(KILL_ROUNDS):
            victims = self.strangers()
            for pid in victims:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            if not victims:
                return []
            time.sleep(0.002)
        return self.strangers()

    def reset(self) -> list[str]:
        """Put the sandbox back and verify it; returns what could not be (empty when
        pristine). Each step checks its own result: no second pass over the sandbox."""
        problems = [f"process {pid} survived" for pid in self.kill_strangers()]
        if not self._remove_ipc():
            problems.append("SysV IPC objects remain")
        problems += restore(self.base.roots, self.base.trees, self.keep)
        for path, entry in self.base.files.items():
            try:
                changed = _entry(os.lstat(path)) != entry
            except OSError:
                changed = True
            if changed:
                problems.append(f"{path} changed")
        return problems

    def _remove_ipc(self) -> bool:
        """Remove the SysV IPC objects made since the record; False if some remain."""
        found = _sysv_ids()
        if found == self.base.sysv:
            return True
        libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own libc: no search
        for kind, ids in found.items():
            call = getattr(libc, SYSV[kind])
            for ident in ids:
                if ident not in self.base.sysv.get(kind, []):
                    if kind == "sem":
                        call(ident, 0, IPC_RMID)
                    else:
                        call(ident, IPC_RMID, None)
        return _sysv_ids() == self.base.sysv


def _ended(read_fd: int) -> dict[str, object]:
    """What the child said before it exited; empty if it died first."""
    os.set_blocking(read_fd, False)
    data = b""
    with contextlib.suppress(OSError):
        data = os.read(read_fd, 65536)
    os.close(read_fd)
    try:
        said = json.loads(data.decode() or "{}")
    except ValueError:
        return {}
    return said if isinstance(said, dict) else {}


class Forker:
    """The worker's per-test fork: the test runs in a child, the worker survives it.

    Registered as a pytest plugin next to the worker's own, only with isolation="fork".
    The child runs pytest's own protocol with no next item, so every fixture it set up
    is torn down in the child; the worker never sets up a fixture itself.
    """

    def __init__(self, worker: Any, recycle_after: int, deadline: float) -> None:
        self.worker = worker
        self.recycle_after = max(1, recycle_after)
        # The exec's own deadline covers the whole run: a fresh sandbox before it nears.
        self.deadline = _monotonic() + deadline if deadline > 0 else float("inf")
        self.pristine: Pristine | None = None
        self.count = 0
        self.records = os.pipe()  # a test child's held records (see Channel.hold)
        for fd in self.records:
            os.set_blocking(fd, False)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: Any, nextitem: Any) -> bool:
        if self.pristine is None:
            self.pristine = Pristine(keep=self.worker.capture_dir)
            # Collected objects move out of the collector's reach: a child's collections
            # then neither walk nor write to (copy) the pages it shares with the worker.
            gc.freeze()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            self._child(item, write_fd)
        os.close(write_fd)
        status = os.waitpid(pid, 0)[1]
        self.worker.channel.hold_taken(self.records[0])  # out with the next start
        said = _ended(read_fd)
        if said.get("end") == "ok":
            item.session.shouldfail = item.session.shouldfail or said.get("shouldfail") or False
            item.session.shouldstop = item.session.shouldstop or said.get("shouldstop") or False
        elif said.get("end") != "timeout":
            self._die_like(status)
        return True

    def _child(self, item: Any, pipe: int) -> None:
        """The test, in the forked child; never returns."""
        code = 0
        try:
            os.setsid()  # the child's own strays, not the worker, are its session

            def expired(nodeid: str, seconds: float) -> None:
                self.worker.channel.flush()  # held records before the timeout's
                os.write(pipe, b'{"end": "timeout"}')
                self.worker.expired(nodeid, seconds)

            self.worker.enter_child(expired, self.records)
            # The worker's own catch (around this hook) records in the worker, whose copy
            # of the list this child cannot fill: the child records and reports its own.
            with catch_warnings_for_item(item.config, item.ihook, "runtest", item):
                pytest_runner.pytest_runtest_protocol(item, None)
            self.worker.watchdog.disarm(exiting=True)
            session = item.session
            said = {"end": "ok", "shouldfail": session.shouldfail, "shouldstop": session.shouldstop}
            os.write(pipe, json.dumps(said, default=str).encode())
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _die_like(self, status: int) -> None:
        """The child crashed: the worker ends the same way, so the verdict is today's."""
        assert self.pristine is not None
        self.pristine.kill_strangers()
        with contextlib.suppress(Exception):
            self.worker.channel.flush()
            sys.stderr.flush()
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)

    def after(self, nextitem: Any, limit_hit: bool) -> None:
        """Between two tests: reset and verify, or hand the container back for a fresh one."""
        assert self.pristine is not None
        if nextitem is None:  # the container is removed next, or kept as the test left it
            return
        problems = self.pristine.reset()
        if limit_hit:  # the service's own counters for this exec would blame a later test
            problems.append("a limit was hit")
        self.count += 1
        if self.count >= self.recycle_after:
            problems.append(f"{self.count} tests ran in it")
        if _monotonic() + 2 * self.worker.timeout + 10 > self.deadline:
            problems.append("the exec's deadline is near")
        if problems:
            self.worker.channel.send("recycle", reason="; ".join(problems))
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os._exit(0)
